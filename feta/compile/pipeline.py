"""The compile pipeline: a prefix run directory in, a compiled directory out.

    <out>/adapter/       a standard PEFT LoRA (PeftModel.from_pretrained loads it)
    <out>/compile.json   method, rank, modules, per-layer residuals at the scored positions, fit time
    <out>/merged/        with merge=true: the full model with the LoRA merged, safetensors
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
from feta.adapters import TOKEN_KINDS, compiled_lora_config, load_adapter, merge_checked
from feta.compile.distill import distill
from feta.compile.fit import SinkPlan, fit_lstsq, prefix_stream, target_modules
from feta.compile.sink import prefix_key_values as sink_key_values
from feta.compile.sink import supports as sink_supports
from feta.compile.spec import CompileSpec, Method
from feta.compile.tokens import find_sinks, fit_weights, micro_batches, sinks_in
from feta.data import TaskDataModule, seeded_subset
from feta.errors import UserError
from feta.models import load_base_model
from feta.scoring import input_positions

# Calibration examples per micro-batch (see feta/compile/fit.py).
MICRO_BATCH = 32
# method=sink needs the first token to be the sink in (nearly) every sequence.
SINK_AT_START = 0.9


def check_source(run_dir: str | Path, model_override: str | None = None):
    """Validate a prefix run before anything is loaded or written; returns (run cfg, adapter dir)."""
    cfg = runs.load_run_config(run_dir)
    kind = cfg.adapter.kind
    if kind not in TOKEN_KINDS:
        raise UserError(f"ckpt={run_dir}", f"is a {kind} run; compile turns a token adaptation "
                        f"({', '.join(TOKEN_KINDS)}) into LoRA",
                        f"a {kind} adapter is already weight-space: merge it with PEFT's merge_and_unload")
    if model_override and model_override != cfg.model.name:
        raise UserError(f"base_model={model_override}", f"but the prefix in ckpt={run_dir} was trained on "
                        f"{cfg.model.name}", f"drop base_model or set base_model={cfg.model.name}")
    return cfg, runs.adapter_dir(run_dir)


def calibration_batches(datamodule: TaskDataModule, spec: CompileSpec, seed: int) -> tuple[dict, dict]:
    """A seeded sample of the run's training examples (the fit; for generation prompt + reference target,
    teacher-forced) and the first validation examples (held out for the residuals)."""
    datamodule.setup()
    # Seeded apart from the training subset's permutation.
    calib = seeded_subset(datamodule.splits["train"], spec.calib_size, 1000 + seed + spec.calib_seed)
    task = datamodule.task
    held_out = datamodule.splits["validation"][: spec.eval_size]
    return task.encode(calib, spec.calib_max_length), task.encode(held_out)


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


def _warn_absolute_positions(cfg, model_spec, base) -> None:
    if cfg.adapter.kind == "prompt" and hasattr(base.config, "n_positions"):
        warnings.warn(
            f"{model_spec.name} has absolute position embeddings: the soft prompt also moves every input token "
            f"{cfg.adapter.m} positions along them, which no LoRA reproduces; expect held-out residuals near 1 "
            "(on rotary models such as Llama the shift is invisible)"
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


def _fit(base, prefix_model, dm: TaskDataModule, calib: dict, spec: CompileSpec, arch: str, seed: int):
    """The compiled PEFT LoRA model and its fit statistics."""
    batches = micro_batches(calib, MICRO_BATCH)
    stats, positions = {}, {}
    sinks = [find_sinks(base, b, spec.sink_ratio) for b in batches] if spec.method is not Method.distill else []
    plan = None
    if spec.method is Method.sink:
        plan, stats["sink"] = _sink_plan(base, prefix_model, batches, sinks, arch)
    names = list(target_modules(base, arch, spec.target))
    kv = [n for n in target_modules(base, arch, "k+v")] if plan is not None else []
    compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(spec.rank, names + kv, spec.bias, arch, kv)).eval()
    if spec.method is not Method.distill:
        # method=sink with target=none fits no module from the streams: skip capturing them.
        streams = ([prefix_stream(prefix_model, b, arch, mlp="mlp" in spec.module_kinds) for b in batches]
                   if names else [{} for _ in batches])
        weights, positions = fit_weights(batches, sinks, spec)
        stats["modules"] = fit_lstsq(compiled, streams, batches, weights, arch, spec, sinks, plan)
    if spec.method in (Method.distill, Method.lstsq_distill):
        stats["distill"] = distill(compiled, prefix_model, dm, spec, seed)
    return compiled.eval(), stats, positions


def compile_run(run_dir: str | Path, spec: CompileSpec, out_dir: str | Path, model_override: str | None = None
                ) -> dict[str, Any]:
    """Compile the prefix of `run_dir` into a PEFT LoRA adapter at `out_dir`/adapter; returns compile.json."""
    cfg, adapter_path = check_source(run_dir, model_override)
    model_spec, data_spec, _ = runs.run_specs(cfg)
    base, tokenizer = load_base_model(model_spec)
    names = target_modules(base, model_spec.arch, spec.target)
    _check_rank(base, names, spec)
    _warn_absolute_positions(cfg, model_spec, base)
    start = time.perf_counter()
    dm = TaskDataModule(data_spec, tokenizer, seed=cfg.seed)
    calib, held_out = calibration_batches(dm, spec, cfg.seed)
    prefix_model = load_adapter(copy.deepcopy(base), adapter_path).eval()
    compiled, stats, positions = _fit(base, prefix_model, dm, calib, spec, model_spec.arch, cfg.seed)
    fit_time = time.perf_counter() - start
    residuals = layer_residuals(base, prefix_model, compiled, micro_batches(held_out, MICRO_BATCH), spec.sink_ratio)
    record = {
        "source_run": str(Path(run_dir).resolve()),
        "model": model_spec.name,
        "task": dm.task.kind.value,
        "method": spec.method.value,
        "rank": spec.rank,
        "bias": spec.bias,
        "target": spec.target,
        "target_modules": list(names),
        "calibration": {"examples": spec.calib_size, "max_length": spec.calib_max_length, **positions},
        "eval_examples": spec.eval_size,
        "residuals": residuals,
        "residual_last_final": residuals["last"][-1],
        "residual_last_mean": sum(residuals["last"]) / len(residuals["last"]),
        "residual_content_mean": sum(residuals["content"]) / len(residuals["content"]),
        "fit_stats": stats,
        "fit_time_s": fit_time,
        "spec": {k: getattr(v, "value", v) for k, v in vars(spec).items()},
    }
    with runs.atomic_dir(out_dir) as tmp:
        compiled.save_pretrained(str(tmp / runs.ADAPTER))
        runs.write_json(tmp / runs.COMPILE, record)
    return record


def merge_compiled(compiled_dir: str | Path, dtype: str) -> dict[str, Any]:
    """Merge the saved compiled adapter into a fresh base model (plain PEFT load), save `merged/`,
    and report the max abs logit difference between merged and unmerged."""
    compiled_dir = Path(compiled_dir)
    record = runs.read_json(compiled_dir / runs.COMPILE, "compile.py")
    cfg = runs.load_run_config(record["source_run"])
    model_spec, data_spec, _ = runs.run_specs(cfg)
    base, tokenizer = load_base_model(model_spec)
    dm = TaskDataModule(data_spec, tokenizer)
    dm.setup()
    batch = dm.collate(dm.splits["validation"][:16])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    merged, diff = merge_checked(base, compiled_dir / runs.ADAPTER, dtype, inputs)
    with runs.atomic_dir(compiled_dir / "merged") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
    return {"dtype": dtype, "max_abs_logit_diff": diff, "path": "merged"}
