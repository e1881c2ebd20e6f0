"""Sweep directory → one pandas row per evaluated run, checked against the eval.json contract.

Every row carries its run's main metric as `metric` (named by `metric_name`: accuracy in %, BLEU 0-100),
so the markdown and the plots read one column whatever the task. A table holds one task: a sweep mixing
classification and generation runs is refused unless `task=` picks one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from feta.errors import UserError, check_path
from feta.kinds import BASE_ROW, KINDS
from feta.storage import COMPILE, CONFIG, EVAL, is_finished, read_json, run_dirs

REQUIRED_KEYS = ("kind", "name", "model")
TASKS = ("classification", "generation")
# Deployed form first: a merged LoRA is what one ships; a prefix has only its adapter form.
DEPLOYED = ("merged", "adapter")
KIND_ORDER = (BASE_ROW, *KINDS)


@dataclass(frozen=True)
class Metric:
    """How a main metric reads: eval.json key, display name, scale to the table's unit, and that unit."""

    key: str
    name: str
    scale: float  # eval.json value × scale = the table's value
    unit: str
    slug: str  # W&B summary key part

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})"


METRICS = {
    "val_acc": Metric("val_acc", "accuracy", 100.0, "%", "acc"),
    "bleu": Metric("bleu", "BLEU", 1.0, "0-100", "bleu"),
}
BY_NAME = {m.name: m for m in METRICS.values()}


@dataclass(frozen=True)
class Latency:
    """The headline latency of a task: the column the plots put on x, its ratio to the base, and labels."""

    column: str
    ratio: str
    iqr: str
    unit: str
    phase: str


# Classification answers in one forward pass (prefill); generation pays per decoded token.
LATENCY = {
    "classification": Latency("latency_us", "latency_ratio", "latency_ratio_iqr", "µs/token", "prefill"),
    "generation": Latency("decode_ms", "decode_ratio", "decode_ratio_iqr", "ms/token", "decode"),
}

COLUMNS = [
    "name", "kind", "model", "task", "m", "r", "trainable_params", "metric", "metric_name",
    "val_acc", "macro_f1", "bleu", "rouge_l", "class_agreement", "identical_outputs", "token_agreement", "bleu_vs_source",
    "own_token_agreement", "gain_recovered",
    "latency_us", "latency_ratio", "latency_ratio_iqr", "decode_us", "decode_ms", "decode_ratio", "decode_ratio_iqr",
    "residual_last_mean", "residual_last_max", "residual_content_mean", "ref_metric", "ref_latency_us", "ref_note",
    "latency_form", "device", "dtype", "threads", "val_size", "val_limit", "val_seed", "run",
]


@cache
def reference() -> pd.DataFrame:
    """The reference run's figures (reference.csv): one row per (model, task, kind, m, r)."""
    with (files(__package__) / "reference.csv").open(encoding="utf-8") as f:
        return pd.read_csv(f, dtype={"m": "Int64", "r": "Int64"})


def _key(model: Any, task: Any, kind: Any, m: Any, r: Any) -> tuple:
    as_int = lambda v: None if v is None or pd.isna(v) else int(v)  # noqa: E731
    return str(model), str(task), str(kind), as_int(m), as_int(r)


@cache
def _reference_index() -> dict[tuple, dict[str, Any]]:
    return {_key(row["model"], row["task"], row["kind"], row["m"], row["r"]): row
            for row in reference().to_dict("records")}


def reference_residuals() -> str | None:
    """The range of the reference's compiled residuals, for the report's notes."""
    values = reference()["residuals"].dropna()
    return str(values.iloc[0]) if len(values) else None


def task_of(ev: dict[str, Any]) -> str:
    return str(ev.get("task") or "classification")


def metric_of(ev: dict[str, Any]) -> Metric:
    return METRICS[ev.get("main_metric") or "val_acc"]


def _check_eval(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(eval dict, "") for a valid evaluated run, else (None, reason)."""
    path = run_dir / EVAL
    try:  # a damaged file skips its run, as evaluate.py skips it in a sweep
        if (run_dir / CONFIG).is_file() and not is_finished(run_dir):
            return None, "training did not finish (no complete metrics.json); rerun train.py to resume it"
        if not path.is_file():
            return None, f"not evaluated (no {EVAL}); run evaluate.py ckpt={run_dir}"
        ev = read_json(path, f"evaluate.py ckpt={run_dir} overwrite=true")
    except UserError as e:
        return None, str(e)
    if task_of(ev) == "mixture":  # one row per run and task would be another table
        return None, f"a task mixture, scored per task in its {EVAL} (tasks) and in the sweep's multitask.md"
    if task_of(ev) not in TASKS:
        return None, f"{EVAL} task={ev['task']!r} is none of {', '.join(TASKS)}"
    if (ev.get("main_metric") or "val_acc") not in METRICS:
        return None, f"{EVAL} main_metric={ev['main_metric']!r} is none of {', '.join(METRICS)}"
    metric = metric_of(ev)
    missing = [k for k in (*REQUIRED_KEYS, metric.key) if ev.get(k) is None]
    if missing:
        return None, f"{EVAL} lacks {', '.join(missing)}; rerun evaluate.py ckpt={run_dir}"
    value, top = ev[metric.key], 100.0 / metric.scale
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
        return None, f"{EVAL} {metric.key}={value!r} is not in [0, {top:g}]"
    return ev, ""


def _latency(lat: dict | None, phase: str, names: tuple[str, ...]) -> tuple[float, float, float, str | None]:
    """(µs/token, ratio to base, IQR of that ratio, form) of the first form in `names` at batch 1 in `phase`."""
    rows = (lat or {}).get("rows") or []
    for name in names:
        for row in rows:
            if row.get("name") == name and row.get("phase") == phase and row.get("batch", 1) == 1:
                get = lambda k: float(row[k]) if isinstance(row.get(k), (int, float)) else math.nan  # noqa: E731
                return get("us_per_token"), get("ratio_to_base"), get("ratio_iqr"), name
    return math.nan, math.nan, math.nan, None


def _scaled(x: Any, scale: float = 100.0) -> float:
    return scale * float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _stat(values: Any, fn) -> float:
    arr = np.asarray(values if values else [], dtype=float)
    return float(fn(arr)) if arr.size else math.nan


def _row(ev: dict[str, Any], rel: str) -> dict[str, Any]:
    kind, model, task, metric = str(ev["kind"]), str(ev["model"]), task_of(ev), metric_of(ev)
    lat = ev.get("latency")
    # The base model's own eval has only "base" rows; an adapter never falls back to them.
    names = ("base",) if kind == "base" else DEPLOYED
    latency_us, latency_ratio, latency_ratio_iqr, prefill_form = _latency(lat, "prefill", names)
    decode_us, decode_ratio, decode_ratio_iqr, decode_form = _latency(lat, "decode", names)
    res = ev.get("residuals") or {}
    m, r = ev.get("m"), ev.get("r")
    ref = _reference_index().get(_key(model, task, kind, m, r))
    ref_residuals = ref.get("residuals") if ref else None
    return {
        "name": str(ev["name"]), "kind": kind, "model": model, "task": task, "m": m, "r": r,
        "trainable_params": ev.get("trainable_params"),
        "metric": _scaled(ev[metric.key], metric.scale), "metric_name": metric.name,
        "val_acc": _scaled(ev.get("val_acc")), "macro_f1": _scaled(ev.get("macro_f1")),
        "bleu": _scaled(ev.get("bleu"), 1.0), "rouge_l": _scaled(ev.get("rouge_l"), 1.0),
        "class_agreement": _scaled(ev.get("class_agreement")), "identical_outputs": _scaled(ev.get("identical_outputs")),
        "token_agreement": _scaled(ev.get("token_agreement")),
        "bleu_vs_source": _scaled(ev.get("bleu_vs_source"), 1.0),
        "own_token_agreement": _scaled(ev.get("own_token_agreement")), "gain_recovered": _scaled(ev.get("gain_recovered")),
        "latency_us": latency_us, "latency_ratio": latency_ratio, "latency_ratio_iqr": latency_ratio_iqr,
        "decode_us": decode_us, "decode_ms": decode_us / 1000.0, "decode_ratio": decode_ratio,
        "decode_ratio_iqr": decode_ratio_iqr,
        "residual_last_mean": _stat(res.get("last"), np.mean), "residual_last_max": _stat(res.get("last"), np.max),
        "residual_content_mean": _stat(res.get("content"), np.mean),
        "ref_metric": float(ref["metric"]) if ref else math.nan,
        "ref_latency_us": float(ref["latency_us"]) if ref else math.nan,
        "ref_note": (ref["note"] + (f"; its residuals were {ref_residuals}" if isinstance(ref_residuals, str) else ""))
        if ref else None,
        "latency_form": decode_form if LATENCY[task].phase == "decode" else prefill_form,
        "device": (lat or {}).get("device"), "dtype": (lat or {}).get("dtype"),
        "threads": (lat or {}).get("threads"), "val_size": ev.get("val_size"),
        "val_limit": ev.get("val_limit"), "val_seed": ev.get("val_seed"), "run": rel,
    }


def kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _one_task(rows: list[dict[str, Any]], sweep_dir: Path, task: str | None) -> list[dict[str, Any]]:
    """The rows of `task`, or all rows when they share one task and metric; refuses a mix otherwise."""
    if task is not None:
        if task not in TASKS:
            raise UserError("task", f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
        return [row for row in rows if row["task"] == task]
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["metric_name"]), []).append(row["run"])
    if len(groups) > 1:
        listing = "; ".join(f"{t} ({name}): {', '.join(runs)}" for (t, name), runs in groups.items())
        raise UserError(str(sweep_dir), f"the sweep mixes tasks, and one table compares one task's runs ({listing})",
                        "report each task on its own: build_report(sweep_dir, task='classification') and "
                        "build_report(sweep_dir, task='generation'), or evaluate each task's sweep directory apart")
    return rows


def collect(sweep_dir: Path, task: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per evaluated run below `sweep_dir` (compiled dirs included) and the skipped dirs with reasons.

    `task` keeps only that task's runs; without it a sweep of more than one task is refused.
    Per-layer residuals of compiled runs are in `df.attrs["residuals"]`, keyed by the row's `run`
    (its path relative to `sweep_dir`), ready for `write_report`.
    """
    sweep_dir = check_path(str(sweep_dir), sweep_dir, "directory", "pass a sweep directory written by train.py -m")
    rows, residuals, skipped = [], {}, []
    for run_dir in run_dirs(sweep_dir, (CONFIG, COMPILE, EVAL)):
        rel = run_dir.relative_to(sweep_dir).as_posix()
        rel = sweep_dir.name if rel == "." else rel
        ev, reason = _check_eval(run_dir)
        if ev is None:
            skipped.append(f"{rel}: {reason}")
            continue
        rows.append(_row(ev, rel))
        if ev.get("residuals"):
            residuals[rel] = ev["residuals"]
    rows = _one_task(rows, sweep_dir, task)
    _one_subset(rows, sweep_dir)
    if not rows:
        hint = f"run train.py -m … then evaluate.py ckpt={sweep_dir}"
        of = f" of task {task}" if task else ""
        if skipped:
            raise UserError(str(sweep_dir), f"holds no evaluated runs{of} ({len(skipped)} skipped: "
                            + "; ".join(skipped) + ")", hint)
        raise UserError(str(sweep_dir), f"holds no runs{of}", hint)
    if skipped:
        warnings.warn(f"{len(skipped)} run(s) under {sweep_dir} skipped as unfinished or broken:\n  "
                      + "\n  ".join(skipped), stacklevel=2)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("m", "r", "trainable_params", "threads", "val_size"):
        df[col] = df[col].astype("Int64")  # integers stay integers in the CSV, with <NA> where absent
    df = (df.assign(_k=df["kind"].map(kind_rank)).sort_values(["model", "_k", "kind", "m", "r", "name", "run"])
          .drop(columns="_k").reset_index(drop=True))
    models = df["model"].unique().tolist()
    if len(models) > 1:
        # A prefix on one model and a LoRA on another are not a comparison; say so wherever the table goes.
        warnings.warn(f"the sweep under {sweep_dir} mixes base models ({', '.join(models)}); "
                      "compare rows only within one model", stacklevel=2)
    df.attrs["residuals"] = {run: res for run, res in residuals.items() if run in set(df["run"])}
    return df, skipped


def _one_subset(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """Refuse a table whose rows were scored on different validation inputs: side by side they would
    compare the subsets, not the adapters."""
    subsets: dict[tuple, list[str]] = {}
    for row in rows:
        subsets.setdefault((row["val_size"], row["val_limit"], row["val_seed"]), []).append(row["run"])
    if len(subsets) > 1:
        said = "; ".join(f"{', '.join(runs[:3])}{' …' if len(runs) > 3 else ''} on {size} inputs (val_limit={limit}, "
                         f"val_seed={seed})" for (size, limit, seed), runs in subsets.items())
        raise UserError(str(sweep_dir), f"holds runs scored on different validation subsets: {said}",
                        f"score them on one: python evaluate.py ckpt={sweep_dir} overwrite=true [val_limit=N]")


def complete(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with every column of COLUMNS; a hand-made table without task or metric reads as classification."""
    df = df.reindex(columns=COLUMNS + [c for c in df.columns if c not in COLUMNS])
    df["task"] = df["task"].astype(object).fillna("classification")
    df["metric_name"] = df["metric_name"].astype(object)
    acc = df["metric"].isna() & df["val_acc"].notna()
    df.loc[acc, "metric"] = df.loc[acc, "val_acc"]
    df.loc[acc & df["metric_name"].isna(), "metric_name"] = METRICS["val_acc"].name
    return df


def task_axes(df: pd.DataFrame) -> tuple[str, Metric, Latency]:
    """The task, metric and headline latency of a one-task table."""
    tasks, names = df["task"].dropna().unique(), df["metric_name"].dropna().unique()
    if len(tasks) > 1 or len(names) > 1:
        raise ValueError(f"a report covers one task and one metric, this table holds {list(tasks)} / {list(names)}; "
                         "filter it to one task first (collect(..., task=...))")
    task = tasks[0] if len(tasks) else "classification"
    return task, (BY_NAME[names[0]] if len(names) else METRICS["val_acc"]), LATENCY[task]


def setups(df: pd.DataFrame) -> list[str]:
    """The latency setups of the table, each as "cpu, float32, 2 threads"; empty if none was measured."""
    rows = df.dropna(subset=["device"])[["device", "dtype", "threads"]].drop_duplicates()
    return [f"{s.device}, {s.dtype}, {'—' if pd.isna(s.threads) else s.threads} threads" for s in rows.itertuples()]
