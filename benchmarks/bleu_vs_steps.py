"""BLEU against training steps for the runs of a generation sweep trained with GenerationScores.

    python train.py -m experiment=quickstart data=e2e data.train_limit=960 hydra.sweep.dir=multirun/e2e \\
        +callbacks.scores._target_=feta.callbacks.GenerationScores \\
        +callbacks.scores.every_n_steps=40 +callbacks.scores.limit=100
    python benchmarks/bleu_vs_steps.py multirun/e2e --target 60
    python benchmarks/bleu_vs_steps.py multirun/e2e_prefix_full/0 multirun/e2e_lora2/0 --out curves.png

Reads each run's generation_scores.csv (each path a run or a sweep of runs), plots BLEU against steps
(seaborn) into --out (default <first path>/bleu_vs_steps.png), and prints, per run, the steps at which
a straight line in log(steps) through its scored points would reach --target: an extrapolation from
the measured points, not a measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from feta import runs
from feta.callbacks import SCORES_FILE
from feta.errors import EXIT_USER_ERROR, UserError
from feta.report.plots import save  # importing it selects the Agg backend


def load(paths: list[Path]) -> pd.DataFrame:
    """One row per scored step of every run under `paths` (a run directory or a sweep of them)."""
    frames = []
    for root in paths:
        files = [root / SCORES_FILE] if (root / SCORES_FILE).is_file() else sorted(root.glob(f"*/{SCORES_FILE}"))
        if not files:
            raise UserError(str(root), f"no {SCORES_FILE} or */{SCORES_FILE}",
                            "train with +callbacks.scores._target_=feta.callbacks.GenerationScores")
        for path in files:
            config = runs.load_run_config(path.parent)
            label = path.parent.name if len(paths) == 1 else f"{path.parent.parent.name}/{path.parent.name}"
            df = pd.read_csv(path).drop_duplicates("step", keep="last")
            frames.append(df.assign(run=f"{label}: {config.adapter.kind}", batch=config.data.batch_size))
    return pd.concat(frames, ignore_index=True)


def steps_to_reach(df: pd.DataFrame, target: float) -> float | None:
    """Steps where BLEU = a + b log(steps), fitted to the points after step 0, reaches `target`."""
    pts = df[df["step"] > 0]
    if len(pts) < 2:
        return None
    b, a = np.polyfit(np.log(pts["step"]), pts["bleu"], 1)
    return float(np.exp((target - a) / b)) if b > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", type=Path, nargs="+", help="run or sweep directories")
    parser.add_argument("--target", type=float, default=60.0, help="the BLEU to extrapolate to")
    parser.add_argument("--out", type=Path, help="the plot (default <first path>/bleu_vs_steps.png)")
    args = parser.parse_args()
    try:
        df = load(args.paths)
    except UserError as e:
        parser.exit(EXIT_USER_ERROR, f"error: {e}\n")
    ax = sns.lineplot(df, x="step", y="bleu", hue="run", marker="o")
    ax.axhline(args.target, ls="--", c="grey")
    ax.set(xlabel="training step", ylabel=f"BLEU (0-100) on {df['inputs'].iloc[0]} validation inputs")
    out = save(ax.figure, args.out or args.paths[0] / "bleu_vs_steps.png")
    print(df.pivot_table(index="step", columns="run", values="bleu").round(1).to_markdown())
    for run, g in df.groupby("run"):
        steps = steps_to_reach(g, args.target)
        reach = (f"~{steps:,.0f} steps ({steps * g['batch'].iloc[0]:,.0f} examples)" if steps
                 else "no rising trend to extrapolate")
        print(f"{run}: BLEU {args.target:g} extrapolated at {reach}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
