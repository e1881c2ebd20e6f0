"""Sweep directory → pandas table → markdown/CSV and three seaborn plots, for classification or generation.

    from feta.report import build_report
    build_report(Path("multirun/2025-01-01/12-00-00"))   # writes <sweep>/report/

Reads the `eval.json` that evaluate.py writes in every run directory (training runs and their
`compiled-r<r>/` dirs); never reads tensors or loads models, so it runs in seconds anywhere.
The table's `metric` column is each run's main metric (accuracy in %, or BLEU 0-100), named in `metric_name`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns

from feta import storage

from feta.report.markdown import markdown
from feta.report.plots import plot_equiv_heatmap, plot_metric_summary, plot_metric_vs_latency
from feta.report.table import COLUMNS, collect, complete, reference, task_axes

__all__ = ["COLUMNS", "build_report", "collect", "log_to_wandb", "reference", "write_report"]


def write_report(df: pd.DataFrame, residuals: dict[str, dict], out_dir: Path, skipped: list[str],
                 *, position: str = "last") -> dict[str, Path]:
    """Write results.csv, results.md and the three PNGs into `out_dir`; returns {file stem: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A hand-made or filtered table may lack columns; absent ones read as "not measured".
    df = complete(df)
    files = {"csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    df.to_csv(files["csv"], index=False)
    files["md"].write_text(markdown(df, skipped))
    sns.set_theme(style="whitegrid", context="notebook")
    files["metric_vs_latency"] = plot_metric_vs_latency(df, out_dir / "metric_vs_latency.png")
    files["metric_summary"] = plot_metric_summary(df, out_dir / "metric_summary.png")
    files["equiv_heatmap"] = plot_equiv_heatmap(df, residuals, out_dir / "equiv_heatmap.png", position)
    return files


def build_report(sweep_dir: Path, out_dir: Path | None = None, task: str | None = None) -> dict[str, Any]:
    """collect + write_report into `sweep_dir/report/` by default: {"table": df, "files": {...}, "skipped": [...]}.

    `task` ("classification" or "generation") reports only that task's runs, for a sweep holding both.
    """
    sweep_dir = Path(sweep_dir)
    df, skipped = collect(sweep_dir, task=task)
    out = Path(out_dir or sweep_dir / "report")
    # Written whole or not at all, by one process at a time: a failed or concurrent write keeps the last report.
    with storage.path_lock(f"report {out}", out), storage.atomic_dir(out) as tmp:
        files = write_report(df, df.attrs.get("residuals", {}), tmp, skipped)
    files = {name: out / path.name for name, path in files.items()}
    return {"table": df, "files": files, "skipped": skipped}


def log_to_wandb(report: dict[str, Any], run) -> None:
    """Log the table (wandb.Table), the PNGs (wandb.Image) and the best main metric per kind to a W&B run."""
    import wandb  # optional at import time: the report itself needs no W&B

    df = complete(report["table"])
    _, metric, lat = task_axes(df)
    # wandb.Table rejects pandas' <NA>; plain objects with None log as empty cells.
    table = wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
    images = {f"report/{k}": wandb.Image(str(p), caption=k) for k, p in report["files"].items()
              if str(p).endswith(".png")}
    run.log({"report/results": table, **images})
    for (model, kind), g in df.dropna(subset=["metric"]).groupby(["model", "kind"]):
        best = g.loc[g["metric"].idxmax()]
        run.summary[f"best_{metric.slug}/{model}/{kind}"] = float(best["metric"])
        if not pd.isna(best[lat.ratio]):
            run.summary[f"latency_ratio/{model}/{kind}"] = float(best[lat.ratio])
    run.summary["report/n_runs"] = len(df)
    run.summary["report/n_skipped"] = len(report["skipped"])
