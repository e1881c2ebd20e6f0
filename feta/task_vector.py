"""Task vectors of a merged LoRA, and what the merge precision does to them.

A known trap: merging a LoRA in fp16 rounds every weight of the model, so the task vector
τ = W_merged − W_base is nonzero also in tensors the LoRA never touched, and ‖τ‖ looks larger than
the adapter. This module merges a saved LoRA (a LoRA run or a compiled prefix) in a chosen
precision and compares τ, per parameter tensor, with the exact LoRA delta ΔW = scale · B·A,
computed in float64 from the adapter's fp32 factors. Nothing is hidden: every tensor gets a row.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from feta import runs, storage
from feta.adapters import lora_delta_weights, merged_copy
from feta.errors import UserError
from feta.kinds import KINDS
from feta.models import load_base_model

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Pure math: tensors in, numbers out.


def compare_task_vector(tau: Tensor, delta: Tensor) -> dict[str, float]:
    """τ against the exact delta, both promoted to float64 (fp32 dot products of 10^6 terms lose
    enough digits to report a cosine above 1)."""
    tau, delta = tau.double().flatten(), delta.double().flatten()
    err = tau - delta
    n_tau, n_delta = float(tau.norm()), float(delta.norm())
    cos = float(tau @ delta) / (n_tau * n_delta) if n_tau > 0 and n_delta > 0 else math.nan
    return {
        "changed": bool((tau != 0).any()),
        "tau_norm": n_tau,
        "delta_norm": n_delta,
        "max_abs_tau": float(tau.abs().max()) if tau.numel() else 0.0,
        "max_abs_diff": float(err.abs().max()) if err.numel() else 0.0,  # vs B·A·scale (0 where untouched)
        "rel_diff": float(err.norm()) / n_delta if n_delta > 0 else math.nan,
        # Cauchy–Schwarz holds up to float64 rounding (~1e-16); clip only that, never a real excess.
        "cosine": min(cos, 1.0) if cos <= 1.0 + 1e-12 else cos,
    }


# ---------------------------------------------------------------------------------------------
# Model walking: exact deltas from the adapter, the merged model's parameters.


def task_vector_table(base_model, lora_model, precision: str) -> pd.DataFrame:
    """One row per parameter tensor of the merged model: τ = merged(precision) − base(fp32).
    `precision` is a key of PRECISIONS (analysis.precision, checked by its schema)."""
    deltas = lora_delta_weights(lora_model)
    merged = merged_copy(copy.deepcopy(lora_model).to(PRECISIONS[precision]))
    base = dict(base_model.named_parameters())
    rows = []
    for name, w in merged.named_parameters():
        w_base = base[name].detach() if name in base else torch.zeros_like(w, dtype=torch.float32)
        tau = w.detach().double() - w_base.double()
        delta = deltas.get(name, torch.zeros_like(tau))
        rows.append({"tensor": name, "shape": "x".join(map(str, w.shape)), "numel": w.numel(),
                     "lora": name in deltas, **compare_task_vector(tau, delta)})
    missing = sorted(set(deltas) - {r["tensor"] for r in rows})
    if missing:
        raise ValueError(f"LoRA deltas without a merged parameter: {missing[:3]}; the merge lost them")
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, precision: str) -> dict[str, Any]:
    lora, other = table[table["lora"]], table[~table["lora"]]
    tau_norm = math.sqrt(float((table["tau_norm"] ** 2).sum()))
    delta_norm = math.sqrt(float((table["delta_norm"] ** 2).sum()))
    return {
        "precision": precision,
        "tensors": len(table),
        "lora_tensors": len(lora),
        "untouched_changed": int(other["changed"].sum()),  # spurious: the LoRA never wrote these
        "untouched_max_abs_tau": float(other["max_abs_tau"].max()) if len(other) else 0.0,
        "lora_max_abs_diff": float(lora["max_abs_diff"].max()) if len(lora) else math.nan,
        "lora_min_cosine": float(lora["cosine"].min()) if len(lora) else math.nan,
        # > 1: the task vector looks larger than the adapter it came from.
        "tau_to_delta_norm": tau_norm / delta_norm if delta_norm > 0 else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# Public entry: a LoRA or compiled run in, <run>/analysis/task_vector_<precision>.csv out.


def task_vector_analysis(ckpt: Path, precision: str, out_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    target = runs.resolve_run(ckpt)
    if not KINDS[target.kind].low_rank:
        hint = ("compile it first (compile.py ckpt=<run>) and pass the compiled-r* dir"
                if KINDS[target.kind].compilable else "only LoRA adapters have a B·A delta to compare with")
        raise UserError(f"ckpt={ckpt}", f"is a {target.kind} run; analysis=task_vector takes a LoRA run or a "
                        "compiled dir", hint)
    model_spec, _, _ = runs.run_specs(target.cfg)
    base, _ = load_base_model(model_spec)
    base = base.float()  # the reference: fp32 weights, as trained and saved
    lora_model = runs.adapted_model(target)[0].float()
    with torch.no_grad():
        table = task_vector_table(base, lora_model, precision)
    summary = {"ckpt": str(ckpt), **summarize(table, precision)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"task_vector_{precision}.csv"
    storage.write_text(path, table.to_csv(index=False))
    storage.write_json(out_dir / f"task_vector_{precision}.json", summary)
    summary["csv"] = str(path)
    return summary, table
