"""The compile pipeline: a resolved source (a feta run or a plain PEFT adapter, feta/compile/source.py)
in, a compiled directory out.

    <out>/adapter/       a standard PEFT LoRA (PeftModel.from_pretrained loads it)
    <out>/compile.json   method, rank, modules, where it came from, per-layer residuals and next-token
                         faithfulness on the held-out inputs, fit time, memory
    <out>/merged/        with a merge dtype: the full model with the LoRA merged, safetensors

One base model is held from start to end, on `device`: the source adapter and the compiled LoRA are views
of it (feta/compile/views.py), the fit runs it a layer at a time (feta/compile/sequential.py), and the
merge folds the LoRA into it in place, last.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feta import runs, storage
from feta.adapters import compiled_lora_config, load_adapter, merge_in_place
from feta.compile import memory
from feta.compile.calibration import Calibration, OwnOutputs, calibrate, continuations, resolve_decode
from feta.compile.distill import distill
from feta.compile.faithfulness import next_token
from feta.compile.fit import target_modules
from feta.compile.sequential import SinkPlan, fit_sequential
from feta.compile.sink import supports as sink_supports
from feta.compile.source import CompileSource, check_shapes
from feta.compile.spec import CalibDecode, CompileSpec
from feta.compile.tokens import find_sinks, fit_weights, micro_batches, sinks_in
from feta.compile.views import GATED, CompileModel
from feta.data import DataSpec, TaskKind
from feta.errors import UserError
from feta.metrics import generation_metrics
from feta.models import load_base_model
from feta.scoring import input_positions

log = logging.getLogger("feta")

# Calibration examples per micro-batch.
MICRO_BATCH = 32
# Held-out examples per forward of the measures, which keep every layer's hidden states of two models.
MEASURE_BATCH = 8
# Held-out inputs the merged model's logits are checked on.
MERGE_CHECK = 16
# method=sink needs the first token to be the sink in (nearly) every sequence.
SINK_AT_START = 0.9
# A compile recovers "clearly" when it closes at least this share of the gap between the base model's
# next-token agreement with the source and full agreement.
CLEARLY_ABOVE = 0.1


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}", "no CUDA device is visible to torch", "use device=cpu or device=auto")
    return device


def _hidden(model, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Every layer's output (B, T, d) at the input's own positions."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    return tuple(input_positions(x, batch["input_ids"]) for x in out.hidden_states[1:])


@torch.no_grad()
def layer_residuals(base_model, prefix_model, compiled_model, batches: list[dict[str, Tensor]], sink_ratio: float) -> dict:
    """Per-layer relative residuals ‖h_compiled − h_prefix‖ / ‖h_prefix − h_base‖ (0 = the prefix
    reproduced, 1 = no better than the base model) at the scored positions ("last"), over content tokens
    (no sinks), and over all tokens, pooled over held-out micro-batches. The all-token figure is dominated
    by the attention sink's change, so reports lead with the scored positions. Two models' hidden states
    are held at a time: the base model's go before the compiled model runs."""
    sums = {}  # (selection, layer) -> [‖h_compiled − h_prefix‖², ‖h_prefix − h_base‖²]
    for batch in batches:
        h_base = _hidden(base_model, batch)
        mask = batch["attention_mask"].bool()
        sinks = sinks_in(h_base, batch, sink_ratio)  # as in the fit (see find_sinks)
        selections = {"last": batch["scored"], "content": mask & ~sinks, "all": mask}
        h_prefix = _hidden(prefix_model, batch)
        for key, sel in selections.items():
            for layer, (p, b) in enumerate(zip(h_prefix, h_base)):
                sums.setdefault((key, layer), [0.0, 0.0])[1] += float((p - b)[sel].double().pow(2).sum())
        del h_base
        h_compiled = _hidden(compiled_model, batch)
        for key, sel in selections.items():
            for layer, (c, p) in enumerate(zip(h_compiled, h_prefix)):
                sums[key, layer][0] += float((c - p)[sel].double().pow(2).sum())
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


def _sink_fallback(source: CompileSource, sinks: list[Tensor]) -> tuple[str | None, float]:
    """Why method=sink falls back to the closed form alone (None: it does not), and the share of
    calibration sequences whose first token is a sink."""
    reason = sink_supports(source.peft_type, source.model.arch)
    share = float(torch.cat([s[:, 0] for s in sinks]).float().mean())
    if reason is None and share < SINK_AT_START:
        reason = (f"the first token is an attention sink in {share:.0%} of calibration sequences (needs "
                  f">= {SINK_AT_START:.0%}): no fixed sink slot to merge into")
    if reason is not None:
        warnings.warn(f"method=sink falls back to the closed form on `target` alone: {reason}")
    return reason, share


def _to(batches: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _fit(base, source: CompileSource, calibration: Calibration, spec: CompileSpec, device: torch.device,
         store: str, precision: str) -> tuple[CompileModel, dict, dict]:
    """The one model with its compiled LoRA fitted in place, its fit statistics and the fitted positions."""
    arch = source.model.arch
    batches = _to(micro_batches(calibration.fit, MICRO_BATCH), device)
    names = list(target_modules(base, arch, spec.target))
    stats, positions, sinks, kv = {}, {}, [], []
    if spec.closed_form:
        sinks = [find_sinks(base, b, spec.sink_ratio) for b in batches]  # before any adapter: the base model
    if spec.folds_sink:
        reason, share = _sink_fallback(source, sinks)
        stats["sink"] = {"fallback": reason, "sink_at_start": share} if reason else {"sink_at_start": share}
        kv = [] if reason else list(target_modules(base, arch, "k+v"))
        if reason and not names:
            raise UserError("target=none", f"method=sink cannot apply ({reason}), and target=none leaves nothing "
                            "else to fit", "set target=o")
    cm = CompileModel(base, source.adapter_dir, source.peft_type, compiled_lora_config(spec.rank, names + kv, spec.bias, arch, kv))
    if spec.closed_form:
        plan = None
        if kv:
            stats["sink"]["m"] = cm.m
            content = [b["attention_mask"].bool() & ~s & (torch.arange(s.shape[1], device=s.device) > 0)
                       for b, s in zip(batches, sinks)]
            plan = SinkPlan(cm.prefix_key_values(), cm.model.model.rotary_emb, cm.m, content)
        weights, positions = fit_weights(batches, sinks, spec)
        stats["modules"] = fit_sequential(cm, batches, weights, sinks, arch, spec, store, plan)
    if spec.distills:
        stats["distill"] = distill(cm, calibration, spec, source.seed, device, precision)
    return cm, stats, positions


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


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """Lightning's precision for distillation: mixed 16-bit where the forwards are 16-bit (the LoRA's own
    parameters stay float32), full float32 otherwise."""
    if dtype == torch.bfloat16:
        return "bf16-mixed"
    return "16-mixed" if dtype == torch.float16 and device.type == "cuda" else "32-true"


def compile_run(source: CompileSource, spec: CompileSpec, out_dir: str | Path, merge_dtype: str | None = None,
                overwrite: bool = True) -> dict[str, Any]:
    """Compile the adapter of `source` into a PEFT LoRA adapter at `out_dir`/adapter (and, with a
    `merge_dtype`, the merged model at `out_dir`/merged); returns compile.json. `out_dir` is written by
    one process at a time and appears whole; without `overwrite`, a directory another compile wrote
    meanwhile is kept and this one stops."""
    spec = resolve_decode(spec, source)
    device = resolve_device(spec.device)
    base, tokenizer = load_base_model(source.model, keep=False)
    dtype = getattr(torch, spec.dtype) if spec.dtype else base.dtype
    base.to(device=device, dtype=dtype)
    check_shapes(source, base)
    names = target_modules(base, source.model.arch, spec.target)
    _check_rank(base, names, spec)
    _warn_absolute_positions(source, base)
    start = time.perf_counter()
    adapted = _decoder(base, source, spec)
    calibration = calibrate(source, tokenizer, spec, adapted)
    if adapted is not None and source.peft_type == GATED:
        adapted.base_model.disable_adapter_layers()  # its wrappers out of `base` again
    del adapted
    held_out = _to(micro_batches(calibration.held_out, MEASURE_BATCH), device)
    need = memory.plan(base, micro_batches(calibration.fit, MICRO_BATCH), micro_batches(calibration.held_out, MEASURE_BATCH),
                       spec, source.virtual_tokens, device)
    log.info(f"compile on {device} in {str(dtype).removeprefix('torch.')}: needs {need.describe()}")
    cm, stats, positions = _fit(base, source, calibration, spec, device, need.store, _precision(dtype, device))
    fit_time = time.perf_counter() - start - (calibration.own.seconds if calibration.own is not None else 0.0)
    residuals = layer_residuals(cm.base, cm.source, cm.compiled, held_out, spec.sink_ratio)
    record = _record(source, spec, list(names), calibration, positions, residuals, stats, fit_time)
    record["next_token"] = next_token(cm.base, cm.source, cm.compiled, held_out)
    if calibration.own is not None:
        record["own_outputs"] = own_output_measures(cm, calibration.own, tokenizer, device)
    record["device"], record["dtype"] = str(device), str(dtype).removeprefix("torch.")
    # Locked from here, not from the start: a compile refused while it checks its inputs leaves nothing.
    with storage.path_lock(f"out_dir={out_dir}", out_dir), storage.atomic_dir(out_dir) as tmp:
        if Path(out_dir).exists() and not overwrite:
            raise UserError(f"out_dir={out_dir}", "was written by another compile meanwhile",
                            "pass overwrite=true to replace it, or out_dir=<another dir>")
        cm.lora.save_pretrained(str(tmp / runs.ADAPTER))
        if merge_dtype is not None:
            check = {k: calibration.held_out[k][:MERGE_CHECK].to(device) for k in ("input_ids", "attention_mask")}
            merged, diff = merge_in_place(cm.lora, merge_dtype, check)
            with storage.atomic_dir(tmp / "merged") as merged_dir:
                merged.save_pretrained(str(merged_dir), safe_serialization=True)
            record["merge"] = {"dtype": merge_dtype, "max_abs_logit_diff": diff, "path": "merged"}
        record["memory"] = {"estimate_gb": round((need.total + _weights(cm)) / memory.GB, 3),
                            "caches_on": need.store, **memory.peak()}
        storage.write_json(tmp / runs.COMPILE, record)
    log.info(f"peak memory: {record['memory']}")
    _warn_if_unfaithful(record["next_token"])
    return record


def own_output_measures(cm: CompileModel, own: OwnOutputs, tokenizer, device: torch.device) -> dict[str, Any]:
    """How the compiled model follows its source where the model decodes: the share of held-out prompts
    whose greedy continuation is identical to the source's, BLEU against the source's continuations, and
    next-token agreement and KL at every token of the source's own continuations (teacher-forced)."""
    compiled = continuations(cm.lora, tokenizer, own.prompts, own.new_tokens)
    texts = [[tokenizer.decode(c, skip_special_tokens=True).strip() for c in rows] for rows in (compiled, own.continuations)]
    batches = _to(micro_batches(own.batch, MEASURE_BATCH), device)
    return {"prompts": len(own.prompts),
            "identical_outputs": sum(a == b for a, b in zip(compiled, own.continuations)) / len(own.prompts),
            "bleu_vs_source": generation_metrics(texts[0], [[t] for t in texts[1]])["bleu"],
            **next_token(cm.base, cm.source, cm.compiled, batches, "own_token")}


def _warn_if_unfaithful(agree: dict[str, float]) -> None:
    """One warning line when the compiled model predicts the source's next token barely more often than
    the base model does (where the source changes anything at all)."""
    ours, base = agree["next_token_agreement"], agree["base_next_token_agreement"]
    if 1.0 - base > 0.01 and ours - base < CLEARLY_ABOVE * (1.0 - base):
        log.warning(f"the compiled model barely follows its source: next-token agreement {ours:.3f}, "
                    f"the base model's {base:.3f}; try method=sink where the source has "
                    "key/value slots, a larger rank or calib_size, or preset=faithful")


def _decoder(base, source: CompileSource, spec: CompileSpec):
    """The source adapter as a PEFT model on `base`, to decode with: calib_decode's continuations, and the
    held-out continuations of a generation task or prompt file (None: nothing to decode). A
    prompt-learning wrapper leaves `base` as it was; a gated prefix's wrappers must be swapped out again
    once the calibration is decoded (CompileModel swaps them in for its source view alone)."""
    generates = source.prompts is not None or (isinstance(source.data, DataSpec) and source.data.task is TaskKind.generation)
    if spec.calib_decode is CalibDecode.reference and not generates:
        return None
    return load_adapter(base, source.adapter_dir).eval().to(device=next(base.parameters()).device, dtype=base.dtype)


def _weights(cm: CompileModel) -> float:
    return sum(p.numel() * p.element_size() for p in cm.model.parameters())
