"""The compile pipeline: a resolved source (a feta run or a plain PEFT adapter, feta/compile/source.py)
in, a compiled directory out.

    <out>/adapter/       a standard PEFT LoRA (PeftModel.from_pretrained loads it)
    <out>/compile.json   method, rank, modules, where it came from, per-layer residuals and next-token
                         faithfulness on the held-out inputs, fit time
    <out>/merged/        with a merge dtype: the full model with the LoRA merged, safetensors
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import Tensor

from feta import runs
from feta.adapters import compiled_lora_config, load_adapter, merge_checked
from feta.compile.calibration import Calibration, calibrate
from feta.compile.distill import distill
from feta.compile.faithfulness import next_token
from feta.compile.fit import PrefixStreams, SinkPlan, fit_lstsq, target_modules
from feta.compile.sink import prefix_key_values as sink_key_values
from feta.compile.sink import supports as sink_supports
from feta.compile.source import CompileSource, check_shapes
from feta.compile.spec import CompileSpec, Method
from feta.compile.tokens import find_sinks, fit_weights, micro_batches, sinks_in
from feta.errors import UserError
from feta.models import load_base_model
from feta.scoring import input_positions

# Calibration examples per micro-batch (see feta/compile/fit.py).
MICRO_BATCH = 32
# Held-out inputs the merged model's logits are checked on.
MERGE_CHECK = 16
# method=sink needs the first token to be the sink in (nearly) every sequence.
SINK_AT_START = 0.9


@torch.no_grad()
def layer_residuals(base_model, prefix_model, compiled_model, batches: list[dict[str, Tensor]], sink_ratio: float) -> dict:
    """Per-layer relative residuals ‖h_compiled − h_prefix‖ / ‖h_prefix − h_base‖ (0 = the prefix
    reproduced, 1 = no better than the base model) at the scored positions ("last"), over content tokens
    (no sinks), and over all tokens, pooled over held-out micro-batches. The all-token figure is dominated
    by the attention sink's change, so reports lead with the scored positions."""
    sums = {}  # (selection, layer) -> [‖h_compiled − h_prefix‖², ‖h_prefix − h_base‖²]
    for batch in batches:
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
        h = {k: torch.stack([input_positions(x, batch["input_ids"]) for x in m(**kw).hidden_states[1:]])
             for k, m in (("base", base_model), ("prefix", prefix_model), ("compiled", compiled_model))}  # (L, B, T, d)
        mask = batch["attention_mask"].bool()
        sinks = sinks_in(h["base"], batch, sink_ratio)  # as in the fit (see find_sinks)
        for key, sel in (("last", batch["scored"]), ("content", mask & ~sinks), ("all", mask)):
            for layer in range(h["base"].shape[0]):
                num = (h["compiled"][layer] - h["prefix"][layer])[sel].double().pow(2).sum()
                den = (h["prefix"][layer] - h["base"][layer])[sel].double().pow(2).sum()
                acc = sums.setdefault((key, layer), [0.0, 0.0])
                acc[0], acc[1] = acc[0] + float(num), acc[1] + float(den)
    n_layers = 1 + max(layer for _, layer in sums)
    return {key: [(sums[key, l][0] / max(sums[key, l][1], 1e-60)) ** 0.5 for l in range(n_layers)]
            for key in ("last", "content", "all")}


def _check_rank(base, names: dict, spec: CompileSpec) -> None:
    if not names:  # method=sink target=none: only the rank-1 sink edit
        return
    width = min(min(base.get_submodule(n).weight.shape) for n in names)
    if spec.rank > width:
        raise UserError("rank", f"rank={spec.rank} exceeds the width of {spec.target} ({width})", f"use rank <= {width}")


def _warn_absolute_positions(source: CompileSource, base) -> None:
    if source.kind == "prompt" and hasattr(base.config, "n_positions"):
        warnings.warn(
            f"{source.model.name} has absolute position embeddings: the soft prompt also moves every input token "
            f"{source.virtual_tokens} positions along them, which no LoRA reproduces; expect held-out residuals "
            "near 1 (on rotary models such as Llama the shift is invisible)"
        )


def _sink_plan(base, prefix_model, batches: list[dict], sinks: list[Tensor], arch: str) -> tuple[SinkPlan | None, dict]:
    """What method=sink needs, or None and the reason it falls back to the closed form alone."""
    reason = sink_supports(prefix_model, arch)
    share = float(torch.cat([s[:, 0] for s in sinks]).float().mean())  # sequences whose first token is a sink
    if reason is None and share < SINK_AT_START:
        reason = (f"the first token is an attention sink in {share:.0%} of calibration sequences (needs "
                  f">= {SINK_AT_START:.0%}): no fixed sink slot to merge into")
    if reason is not None:
        warnings.warn(f"method=sink falls back to the closed form on `target` alone: {reason}")
        return None, {"fallback": reason, "sink_at_start": share}
    m = prefix_model.active_peft_config.num_virtual_tokens
    content = [b["attention_mask"].bool() & ~s & (torch.arange(s.shape[1]) > 0) for b, s in zip(batches, sinks)]
    plan = SinkPlan(sink_key_values(prefix_model, m), base.model.rotary_emb, m, content)
    return plan, {"sink_at_start": share, "m": m}


def _fit(base, prefix_model, calibration: Calibration, spec: CompileSpec, arch: str, seed: int):
    """The compiled PEFT LoRA model and its fit statistics."""
    batches = micro_batches(calibration.fit, MICRO_BATCH)
    stats, positions = {}, {}
    sinks = [find_sinks(base, b, spec.sink_ratio) for b in batches] if spec.method is not Method.distill else []
    plan = None
    if spec.method is Method.sink:
        plan, stats["sink"] = _sink_plan(base, prefix_model, batches, sinks, arch)
    names = list(target_modules(base, arch, spec.target))
    kv = [n for n in target_modules(base, arch, "k+v")] if plan is not None else []
    compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(spec.rank, names + kv, spec.bias, arch, kv)).eval()
    if spec.method is not Method.distill:
        # Streams are computed when the fit asks for them: method=sink with target=none asks for none.
        streams = PrefixStreams(prefix_model, batches, arch, mlp="mlp" in spec.module_kinds,
                                max_bytes=spec.stream_memory_gb * 1e9)
        weights, positions = fit_weights(batches, sinks, spec)
        stats["modules"] = fit_lstsq(compiled, streams, batches, weights, arch, spec, sinks, plan)
        stats["streams"] = streams.record()
    if spec.method in (Method.distill, Method.lstsq_distill):
        stats["distill"] = distill(compiled, prefix_model, calibration, spec, seed)
    return compiled.eval(), stats, positions


def _record(source: CompileSource, spec: CompileSpec, names: list[str], calibration: Calibration, positions: dict,
            residuals: dict, stats: dict, fit_time: float) -> dict[str, Any]:
    """compile.json without its next-token numbers (and merge): what was compiled, how, and how closely."""
    return {
        "source_run": str(source.ckpt.resolve()),
        "source": source.description,
        "model": source.model.name,
        "task": calibration.task,
        "method": spec.method.value,
        "rank": spec.rank,
        "bias": spec.bias,
        "target": spec.target,
        "target_modules": names,
        "calibration": {"examples": int(calibration.fit["input_ids"].shape[0]),
                        "longest": int(calibration.fit["input_ids"].shape[1]),  # tokens, after calib_max_length
                        **calibration.record, **positions},
        "eval_examples": int(calibration.held_out["input_ids"].shape[0]),
        "residuals": residuals,
        "residual_last_final": residuals["last"][-1],
        "residual_last_mean": sum(residuals["last"]) / len(residuals["last"]),
        "residual_content_mean": sum(residuals["content"]) / len(residuals["content"]),
        "fit_stats": stats,
        "fit_time_s": fit_time,
        "spec": {k: getattr(v, "value", v) for k, v in vars(spec).items()},
    }


def compile_run(source: CompileSource, spec: CompileSpec, out_dir: str | Path, merge_dtype: str | None = None
                ) -> dict[str, Any]:
    """Compile the adapter of `source` into a PEFT LoRA adapter at `out_dir`/adapter (and, with a
    `merge_dtype`, the merged model at `out_dir`/merged); returns compile.json."""
    base, tokenizer = load_base_model(source.model)
    check_shapes(source, base)
    names = target_modules(base, source.model.arch, spec.target)
    _check_rank(base, names, spec)
    _warn_absolute_positions(source, base)
    start = time.perf_counter()
    calibration = calibrate(source, tokenizer, spec)
    prefix_model = load_adapter(copy.deepcopy(base), source.adapter_dir).eval()
    compiled, stats, positions = _fit(base, prefix_model, calibration, spec, source.model.arch, source.seed)
    fit_time = time.perf_counter() - start
    held_out = micro_batches(calibration.held_out, MICRO_BATCH)
    residuals = layer_residuals(base, prefix_model, compiled, held_out, spec.sink_ratio)
    record = _record(source, spec, list(names), calibration, positions, residuals, stats, fit_time)
    record["next_token"] = next_token(base, prefix_model, compiled, held_out)
    with runs.atomic_dir(out_dir) as tmp:
        compiled.save_pretrained(str(tmp / runs.ADAPTER))
        if merge_dtype is not None:
            check = {k: calibration.held_out[k][:MERGE_CHECK] for k in ("input_ids", "attention_mask")}
            record["merge"] = merge_compiled(tmp, merge_dtype, base, check)
        runs.write_json(tmp / runs.COMPILE, record)
    return record


def merge_compiled(compiled_dir: str | Path, dtype: str, base, check_inputs: dict[str, Tensor]) -> dict[str, Any]:
    """Merge the saved compiled adapter into a copy of `base` (plain PEFT load), save `merged/`, and report
    the max abs logit difference between merged and unmerged on `check_inputs`."""
    compiled_dir = Path(compiled_dir)
    merged, diff = merge_checked(copy.deepcopy(base), compiled_dir / runs.ADAPTER, dtype, check_inputs)
    with runs.atomic_dir(compiled_dir / "merged") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
    return {"dtype": dtype, "max_abs_logit_diff": diff, "path": "merged"}
