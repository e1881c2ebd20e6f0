"""What a shared adapter costs each task: one row per configuration (an adapter trained on a task mixture,
or the same kind of adapter trained per task), one column per task, from the runs' metrics.json."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from feta.storage import METRICS, is_finished, read_json, write_text

MULTITASK = "multitask.md"  # beside a sweep's jobs


def _task_scores(metrics: dict) -> dict[str, float]:
    """task -> its main validation metric (accuracy; generation: target-token accuracy), in percent."""
    if metrics["task"] != "mixture":
        return {metrics["data"]: 100 * metrics[metrics["main_metric"]]}
    return {t: 100 * metrics.get(f"val_{t}_acc", metrics.get(f"val_{t}_token_acc", float("nan")))
            for t in metrics["tasks"]}


def multitask_table(run_dirs: list[Path]) -> pd.DataFrame:
    """Rows: each mixture run ("<adapter>, shared"), and each adapter name over its single-task runs
    ("<adapter>, per task", trainable parameters summed over the tasks). Columns: every task's score, their
    mean, trainable parameters and training time. Unfinished runs are left out."""
    rows: dict[str, dict] = {}
    for run_dir in run_dirs:
        if not is_finished(run_dir):
            continue
        metrics = read_json(run_dir / METRICS)
        shared = metrics["task"] == "mixture"
        label = f"{metrics['name']}, {'shared' if shared else 'per task'}"
        row = rows.setdefault(label, {"configuration": label, "trainable params": 0, "train time s": 0.0})
        row.update(_task_scores(metrics))
        row["trainable params"] += metrics["trainable_params"]
        row["train time s"] += metrics["train_time_s"]
    table = pd.DataFrame(list(rows.values()))
    if table.empty:
        return table
    tasks = [c for c in table.columns if c not in ("configuration", "trainable params", "train time s")]
    table["mean"] = table[tasks].mean(axis=1, skipna=False)
    return table[["configuration", *tasks, "mean", "trainable params", "train time s"]].sort_values(
        "configuration", kind="stable").reset_index(drop=True)


def is_multitask(run_dirs: list[Path]) -> bool:
    """Whether finished training runs among `run_dirs` cover several tasks: a mixture, or runs of different
    data sets (a sweep such as experiment=multitask), whose scores the multitask table sets side by side."""
    records = [read_json(d / METRICS) for d in run_dirs if (d / METRICS).is_file() and is_finished(d)]
    return any(r.get("task") == "mixture" for r in records) or len({r.get("data") for r in records}) > 1


def write_multitask(run_dirs: list[Path], path: Path) -> pd.DataFrame:
    """The table as markdown at `path` (scores in %, one decimal; a task a configuration has no finished
    run of, and then its mean, as —)."""
    table = multitask_table(run_dirs)
    text = table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".1f", intfmt=",",
                                                                       missingval="—")
    write_text(path, "Validation scores in % (generation: target-token accuracy), each task on its own split.\n\n"
               + text + "\n")
    return table
