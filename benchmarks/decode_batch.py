"""How wide should a decode batch be? Times a generation run's sampled continuations of a seeded sample
of its training inputs (decoded as `compile.py`'s default calibration decodes its own) at several batch
widths, and prints each width's time as a ratio to the first's.

    python benchmarks/decode_batch.py multirun/e2e/0 --n 256 --batches 32,128,256

On a CPU a decode step reads every weight whatever its batch, so wider batches pay until the rows'
own compute dominates; `feta.compile.memory.DECODE_ROWS` caps the width the compile picks. Writes
benchmarks/results/decode_batch-<data>.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from feta import runs
from feta.compile.calibration import continuations
from feta.data import TaskDataModule, seeded_subset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a generation task's prefix run directory (train.py's output)")
    parser.add_argument("--n", type=int, default=256, help="calibration inputs to decode")
    parser.add_argument("--batches", default="32,128,256", help="batch widths, comma-separated")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    args = parser.parse_args()
    run = runs.resolve_run(args.run)
    model, tokenizer = runs.adapted_model(run)
    data_spec = runs.run_specs(run.cfg)[1]
    dm = TaskDataModule(data_spec, tokenizer, seed=int(run.cfg.seed))
    dm.setup()
    examples = seeded_subset(dm.splits["train"], args.n, 0, "--n")
    prompts = [tokenizer(dm.task.prompt(ex), add_special_tokens=True)["input_ids"] for ex in examples]
    rows = []
    for width in (int(b) for b in args.batches.split(",")):
        # One timed run per width: a run takes about a minute, which torch.utils.benchmark's warm-up
        # runs (two or more per measurement) would triple.
        start = time.perf_counter()
        out = continuations(model, tokenizer, prompts, data_spec.max_new_tokens, args.temperature, batch_size=width)
        seconds = time.perf_counter() - start
        tokens = sum(len(c) for c in out)
        rows.append({"batch": width, "seconds": round(seconds, 1), "tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1)})
    table = pd.DataFrame(rows)
    table["time_vs_first"] = (table["seconds"] / table["seconds"].iloc[0]).round(2)
    print(f"{args.n} {data_spec.name} calibration inputs, temperature {args.temperature}:")
    print(table.to_markdown(index=False))
    out_csv = ROOT / "benchmarks" / "results" / f"decode_batch-{data_spec.name}.csv"
    table.to_csv(out_csv, index=False)
    print(f"wrote {out_csv.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
