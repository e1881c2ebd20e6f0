"""What `train.py -m` prints when a sweep ends: each job's adapter and validation score, and the next command.

A Hydra callback (conf/train.yaml: hydra.callbacks.summary), so it runs once per sweep, after every job,
whichever launcher ran them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from feta.kinds import KINDS
from feta.report.multitask import MULTITASK, is_multitask, write_multitask
from feta.storage import CONFIG, METRICS, is_finished, read_json, run_dirs

log = logging.getLogger("feta")


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job directory of a sweep: job, adapter, validation score (or why there is none)."""
    rows = []
    for run_dir in run_dirs(sweep_dir, (CONFIG,)):
        job = run_dir.relative_to(sweep_dir).as_posix()
        if not is_finished(run_dir):
            rows.append({"job": job, "adapter": "", "score": "not finished", "kind": None})
            continue
        metrics = read_json(run_dir / METRICS)
        main = metrics["main_metric"]
        value = metrics[main]
        shown = f"{100 * value:.1f}%" if main.endswith("acc") else f"{value:.4f}"
        # A mixture's adapter compiles on no single task's data, so it is no next step's source.
        kind = None if metrics["task"] == "mixture" else metrics["adapter"]
        rows.append({"job": job, "adapter": metrics["name"], "score": f"{main} {shown}", "kind": kind})
    return pd.DataFrame(rows, columns=["job", "adapter", "score", "kind"])


def next_command(sweep_dir: Path, table: pd.DataFrame) -> str:
    """Compile the first finished token adaptation of the sweep; with none, evaluate the sweep."""
    for row in table.itertuples():
        if row.kind in KINDS and KINDS[row.kind].compilable:
            return f"python compile.py ckpt={sweep_dir / row.job}"
    return f"python evaluate.py ckpt={sweep_dir}"


class SweepSummary(Callback):
    """Prints the sweep's table and the next command at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = sweep_table(sweep_dir)
        if table.empty:
            return
        print(f"\n{sweep_dir}\n{table.drop(columns='kind').to_markdown(index=False)}", flush=True)
        jobs = run_dirs(sweep_dir, (CONFIG,))
        if is_multitask(jobs):  # each task's score per configuration
            write_multitask(jobs, sweep_dir / MULTITASK)
            print(f"\n{(sweep_dir / MULTITASK).read_text()}", flush=True)
        print(f"\nnext: {next_command(sweep_dir, table)}", flush=True)
