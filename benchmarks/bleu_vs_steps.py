"""BLEU against training steps for the runs of a generation sweep trained with GenerationScores.

    python train.py -m experiment=quickstart data=e2e data.train_limit=960 hydra.sweep.dir=multirun/e2e \\
        +callbacks.scores._target_=feta.callbacks.GenerationScores \\
        +callbacks.scores.every_n_steps=40 +callbacks.scores.limit=100
    python benchmarks/bleu_vs_steps.py multirun/e2e --target 60

Reads each run's generation_scores.csv, plots BLEU against steps (seaborn) into <sweep>/bleu_vs_steps.png,
and prints, per run, the steps at which a straight line in log(steps) through its scored points
would reach --target: an extrapolation from the measured points, not a measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from feta import runs
from feta.callbacks import SCORES_FILE
from feta.report.plots import save  # importing it selects the Agg backend


def load(sweep: Path) -> pd.DataFrame:
    frames = []
    for path in sorted(sweep.glob(f"*/{SCORES_FILE}")):
        config = runs.load_run_config(path.parent)
        df = pd.read_csv(path).drop_duplicates("step", keep="last")
        frames.append(df.assign(run=f"{path.parent.name}: {config.adapter.kind}",
                                batch=config.data.batch_size))
    if not frames:
        raise SystemExit(f"error: {sweep}: no */{SCORES_FILE}; train with feta.callbacks.GenerationScores")
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
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--target", type=float, default=60.0, help="the BLEU to extrapolate to")
    args = parser.parse_args()
    df = load(args.sweep)
    ax = sns.lineplot(df, x="step", y="bleu", hue="run", marker="o")
    ax.axhline(args.target, ls="--", c="grey")
    ax.set(xlabel="training step", ylabel=f"BLEU (0-100) on {df['inputs'].iloc[0]} validation inputs")
    out = save(ax.figure, args.sweep / "bleu_vs_steps.png")
    print(df.pivot_table(index="step", columns="run", values="bleu").round(1).to_markdown())
    for run, g in df.groupby("run"):
        steps = steps_to_reach(g, args.target)
        reach = (f"~{steps:,.0f} steps ({steps * g['batch'].iloc[0]:,.0f} examples)" if steps
                 else "no rising trend to extrapolate")
        print(f"{run}: BLEU {args.target:g} extrapolated at {reach}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
