"""The base model without an adapter, scored on a task's validation split by evaluate.py's code path.

    python benchmarks/zero_shot.py model=smollm2 data=sst2
    python benchmarks/zero_shot.py model=smollm2 data=agnews                     # the seeded 2,000
    python benchmarks/zero_shot.py model=smollm2 data=e2e 'data.prompt="..."'    # an instruction prompt

Any train.py override of the `model` and `data` groups applies. Prints the task's metrics and writes
them to benchmarks/results/zero_shot-<model>-<data>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from feta import storage
from feta.data import TaskDataModule, TaskKind
from feta.evaluation import generate, predict
from feta.metrics import classification_report, generation_metrics
from feta.models import ModelSpec, load_base_model
from feta.schema import to_spec

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model_spec, data_spec = to_spec(cfg, "model", ModelSpec), to_spec(cfg, "data")
    model, tokenizer = load_base_model(model_spec)
    dm = TaskDataModule(data_spec, tokenizer, seed=cfg.seed)
    dm.setup()
    result = {"model": model_spec.name, "data": data_spec.name, "prompt": data_spec.prompt,
              "val_size": len(dm.splits["validation"])}
    if dm.task.kind is TaskKind.classification:
        preds, labels = predict(model.eval(), dm)
        result.update(classification_report(preds, labels, dm.task.num_classes))
        result["classes"] = dm.task.classes
    else:
        outputs = generate(model.eval(), dm)
        result.update(generation_metrics(outputs, dm.references))
        result["examples"] = [{"input": p, "output": o} for p, o in zip(dm.prompts("validation")[:5], outputs)]
    out = ROOT / "benchmarks" / "results" / f"zero_shot-{model_spec.name}-{data_spec.name}.json"
    storage.write_json(out, result)
    main_metric = dm.task.main_metric
    scale = 100 if main_metric == "val_acc" else 1  # accuracy is a fraction, BLEU already 0-100
    print(f"{model_spec.name} zero-shot on {data_spec.name}: {main_metric} {scale * result[main_metric]:.1f} "
          f"on {result['val_size']} validation inputs; {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
