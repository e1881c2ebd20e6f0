"""The public entry point: run the five measurements on a base model, a prefix and a LoRA, judge them,
draw the figures and write equivalence.json."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from feta.equivalence.attention import EPS, TARGETS, random_lowrank
from feta.equivalence.capture import (attention_modules, capture_inputs, geometry, lora_deltas_by_layer, math_weight,
                                      prefix_of, text_prefix)
from feta.equivalence.figures import draw_figures
from feta.equivalence.measures import (check_content_ratios, check_gating, check_linearity, conversion,
                                       prefix_spectrum, span_point)
from feta.equivalence.verdicts import gating_tol, grid_summary, verdicts
from feta.storage import write_json


def _finite(obj: Any) -> Any:
    """JSON-safe: tensors to lists, NaN and inf to None."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or abs(obj) == float("inf")):
        return None
    return obj


@torch.no_grad()  # forward-mode AD (jvp) still runs; no autograd graphs through the frozen weights
def analyze(base_model: torch.nn.Module, prefix_model: torch.nn.Module, lora_model: torch.nn.Module | None,
            input_ids: Tensor, attention_mask: Tensor, out_dir: Path, *, layers: list[int] | None = None,
            heads: list[int] | None = None, ms: Sequence[int] = (1, 2, 4, 8, 16, 32),
            rs: Sequence[int] = (1, 2, 4, 8, 16, 32), init_ids: Tensor | None = None, rtol: float = 1e-8,
            draws: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Run the five measurements; write out_dir/equivalence.json, linearity.png, span_grid.png and
    prefix_spectrum.png; print a verdict table; return the JSON's dict.

    base_model: the unadapted model. prefix_model: a PEFT prefix-tuning model. lora_model: a PEFT LoRA
    model, or None: then a random rank-4 LoRA with ‖ΔW‖ = 0.1‖W‖ on q, k, v, o stands in, and says so.
    input_ids, attention_mask (B, T): the fixed data (conversion: first half of the sentences fitted,
    the rest held out). layers: layer indices; heads: key/value head indices (GQA: each with its query
    heads); None = all. ms, rs: the grid's prefix lengths and LoRA ranks. init_ids: tokens of the text
    init (None: the analysis tokens). rtol: rank cut-off σ > rtol·σ_max. draws: random LoRA directions
    per grid cell. The models are cast in place to `dtype` and set to eval mode.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in (base_model, prefix_model, lora_model):
        if model is not None:
            model.to(dtype).eval()
    if any(hasattr(mod, "lora_A") for mod in base_model.modules()):
        raise ValueError("base_model has LoRA layers: pass an unadapted copy (PEFT's LoRA edits its base model in "
                         "place; feta.models.load_base_model returns a fresh copy on each call)")
    attns = attention_modules(base_model)
    H, kvH, dh = geometry(attns[0])
    layers = list(range(len(attns))) if layers is None else list(layers)
    heads = list(range(kvH)) if heads is None else list(heads)
    if not layers or not set(layers) <= set(range(len(attns))):
        raise ValueError(f"layers={layers}: must be a non-empty subset of 0…{len(attns) - 1}")
    if not heads or not set(heads) <= set(range(kvH)):
        raise ValueError(f"heads={heads}: must be a non-empty subset of the key/value heads 0…{kvH - 1}")
    valid = attention_mask.bool()
    N, d = int(valid.sum()), math_weight(attns[0], "o").shape[0]
    if N <= dh:
        raise ValueError(f"{N} real tokens ≤ d_head = {dh}: every per-head span would be exact (a vacuous pass); "
                         "pass more sentences")
    if int(valid[: (len(valid) + 1) // 2].sum()) <= d:
        warnings.warn(f"the conversion fits a full ΔW (d = {d} inputs) on ≤ {d} tokens: its fits are exact by counting; "
                      "the JSON marks them vacuous. Pass more sentences for a real test.")

    trained = prefix_of(prefix_model, dtype)
    m_P = trained[0][0].shape[1]
    init_ids = input_ids[valid] if init_ids is None else init_ids
    if init_ids.numel() < max(ms):
        raise ValueError(f"init_ids has {init_ids.numel()} tokens; the text init needs max(ms) = {max(ms)}")
    text = text_prefix(base_model, init_ids[: max(ms)])
    if lora_model is not None:
        source, lora_desc = lora_deltas_by_layer(lora_model), "trained LoRA"
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        source = [{t: 0.1 * math_weight(a, t).norm() * random_lowrank(math_weight(a, t).shape, 4, gen, dtype)
                   for t in TARGETS} for a in attns]
        lora_desc = "random rank-4, ‖ΔW‖ = 0.1‖W‖ (no LoRA given; at_lora inputs are the base model's)"

    base_in, _ = capture_inputs(base_model, input_ids, attention_mask)
    prefix_in, logits = capture_inputs(base_model, input_ids, attention_mask, trained)
    peft_logits = prefix_model(input_ids=input_ids, attention_mask=attention_mask).logits
    lora_in = capture_inputs(lora_model, input_ids, attention_mask)[0] if lora_model is not None else base_in
    impl = base_model.config._attn_implementation
    res: dict = {"setup": {
        "model": type(base_model).__name__, "attn_implementation": impl + (" (math backend)" if impl == "sdpa" else ""),
        "dtype": str(dtype), "d": d, "heads": H, "kv_heads": kvH, "d_head": dh, "layers": layers, "kv_heads_used": heads,
        "N_real_tokens": N, "sentences": int(input_ids.shape[0]), "m_trained": m_P, "lora": lora_desc, "rtol": rtol,
        "point": "the trained prefix (grid: also the text init) with base weights; at_lora: W + the LoRA's ΔW",
        "inputs": "each layer's input, captured from the model run at that point (its own inputs)",
        "outputs": "real tokens; spans and conversion per key/value head group before o_proj (LoRA on o as "
                   "W_o⁻¹ΔW_o); gating and linearity: the module's output",
        "peft_prefix_logits_match": float((peft_logits - logits)[valid].abs().max())}}

    gat = [dict(layer=l, **check_gating(attns[l], *prefix_in[l], trained[l], attention_mask)) for l in layers]
    eager_fp32 = impl == "eager" and not hasattr(attns[0], "c_attn")  # Llama's eager softmax runs in float32
    res["gating"] = {"per_layer": gat, "tol": gating_tol(dtype, eager_fp32),
                     **{k: f(g[k] for g in gat) for k, f in [("max_abs_err", max), ("pure_vs_module", max),
                                                             ("lam_min", min), ("lam_max", max)]}}
    lin: dict = {"eps": list(EPS), "at_prefix": {}, "at_lora": {}}
    for l in layers:
        for where, inp, P, ds in [("at_prefix", prefix_in, trained[l], {}), ("at_lora", lora_in, None, source[l])]:
            for k, r in check_linearity(attns[l], *inp[l], attention_mask, P, ds, seed + l).items():
                lin[where][k] = [max(a, b) for a, b in zip(lin[where].get(k, r), r)]  # the worst layer
    lin["decay"] = {k: float(torch.tensor(r[:-1]).div(torch.tensor(r[1:])).median()) for k, r in lin["at_prefix"].items()}
    res["linearity"] = lin
    res["content_ratios"] = [dict(layer=l, **check_content_ratios(attns[l], prefix_in[l], base_in[l], trained[l],
                                                                 attention_mask, source[l])) for l in layers]

    points = {"trained": lambda m: [(k[:, :m], v[:, :m]) for k, v in trained] if m <= m_P else None,
              "text": lambda m: [(k[:, :m], v[:, :m]) for k, v in text]}
    span = {"ms": list(ms), "rs": list(rs), "draws": draws,
            "trained_point": f"the trained prefix's first m tokens (m ≤ {m_P}); text: the text init of length m",
            "points": {p: span_point(base_model, input_ids, attention_mask, at, layers, heads, ms, rs, source, rtol,
                                     draws, seed) for p, at in points.items()}}
    grid_summary(span, ms, rs)
    res["span"] = span
    spectrum = dict(layer=layers[0], point="text", **prefix_spectrum(base_model, input_ids, attention_mask, points["text"],
                                                                     layers[0], heads, ms, rtol))
    res["spectrum"] = {k: v for k, v in spectrum.items() if k != "spectrum"}  # the σ themselves: figure only
    res["conversion"] = conversion(base_model, input_ids, attention_mask, trained, layers, heads, source, seed)
    res["verdicts"] = verdicts(res)
    res = _finite(res)
    draw_figures(res, spectrum, out_dir)
    write_json(out_dir / "equivalence.json", res)
    print(pd.DataFrame(res["verdicts"]).to_string(index=False))
    return res
