"""Does a compiled prefix follow its source off the calibration distribution? Next-token agreement and KL
of the compiled model with its source prefix, on another task's texts under the source's own template,
beside the same on the source's own held-out inputs.

    python benchmarks/compile_ood.py multirun/quickstart/0/compiled-r64 --texts agnews --n 256
    python benchmarks/compile_ood.py multirun/agnews/0/compiled-r64 --texts sst2

`--texts` names a task (conf/data/*) whose validation texts fill the source task's template (its first
column; the template's other columns keep the texts of the source's own validation inputs). Prints both
rows and writes them to benchmarks/results/compile_ood-<source data>-<texts>-<compiled dir name>.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from feta import runs
from feta.compile.faithfulness import next_token
from feta.compile.tokens import micro_batches
from feta.data import TaskDataModule, encode_prompts
from feta.models import load_base_model
from feta.schema import to_spec

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16


def texts_of(task: str, n: int, seed: int, tokenizer) -> list[str]:
    """The first column of the first `n` validation inputs of `task` (its template's first field)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = to_spec(compose("train", overrides=[f"data={task}", f"data.val_limit={n}"]), "data")
    dm = TaskDataModule(spec, tokenizer, seed=seed)
    dm.setup()
    return [ex[spec.prompt_fields[0]] for ex in dm.splits["validation"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compiled", type=Path, help="a compiled directory of a feta run (compile.py's out_dir)")
    parser.add_argument("--texts", required=True, help="a task whose texts fill the source's template")
    parser.add_argument("--n", type=int, default=256, help="inputs of each kind")
    args = parser.parse_args()
    run = runs.resolve_run(args.compiled)
    model_spec, data_spec, _ = runs.run_specs(run.cfg)
    base, tokenizer = load_base_model(model_spec)
    source, compiled = runs.adapted_model(run, source=True)[0], runs.adapted_model(run)[0]
    own = TaskDataModule(data_spec, tokenizer, seed=int(run.cfg.seed))
    own.setup()
    inputs = own.splits["validation"][: args.n]
    field = data_spec.prompt_fields[0]
    foreign = [{**ex, field: text} for ex, text in zip(inputs, texts_of(args.texts, args.n, int(run.cfg.seed), tokenizer))]
    rows = []
    for name, examples in ((data_spec.name, inputs), (args.texts, foreign)):
        batch = encode_prompts(tokenizer, own.task.prompts(examples), data_spec.max_length)
        result = next_token(base.eval(), source, compiled, micro_batches(batch, BATCH))
        rows.append({"inputs": f"{name} texts" + (" (in distribution)" if name == data_spec.name else ""),
                     **{k: round(v, 4) for k, v in result.items()}})
    table = pd.DataFrame(rows)
    print(f"{run.name} ({args.compiled}), {data_spec.name}'s template:\n{table.to_markdown(index=False)}")
    out = ROOT / "benchmarks" / "results" / f"compile_ood-{data_spec.name}-{args.texts}-{args.compiled.resolve().name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)


if __name__ == "__main__":
    main()
