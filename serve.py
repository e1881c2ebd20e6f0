"""Serve several adapters on one base model, a mixed batch per forward pass (feta/serving.py): classify
inputs, or continue them for a generation task (E2E), each row through its own adapter.

    python serve.py adapters.lora=multirun/<date>/<time>/1 adapters.compiled=multirun/<date>/<time>/0/compiled-r4 val_limit=64
    python serve.py adapters.lora=<run> adapters.compiled=<run>/compiled-r4 input=rows.tsv   # adapter<TAB>text lines

Each adapters.NAME=DIR loads a LoRA run or a compiled prefix under NAME; `__base__` names the base model.
val_limit=N serves N validation inputs of the adapters' task (the first N, or with val_seed a seeded
sample: the subset evaluate.py scores), the adapters taking turns row by row, and prints each adapter's accuracy (generation: BLEU against all references of its inputs).
Output: one JSON line per row (adapter, input, class and scores; or output).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from feta.cli import cli, run_main
from feta.data import TaskDataModule
from feta.metrics import generation_metrics
from feta.schema import ServeConfig
from feta.serving import BASE, AdapterServer, read_rows


def serve(cfg: DictConfig) -> list[dict]:
    settings: ServeConfig = OmegaConf.to_object(cfg)
    server = AdapterServer.from_runs(dict(settings.adapters))
    task, truth = server.task, None
    if settings.val_limit is not None:
        # The validation subset evaluate.py and training score (generation: one row per distinct input,
        # scored against all of its references).
        dm = TaskDataModule(task.spec.with_validation(settings.val_limit, settings.val_seed), server.tokenizer)
        dm.setup()
        rows = dm.splits["validation"]
        rotation = server.adapters + ([BASE] if settings.base else [])
        texts = [{c: ex[c] for c in task.spec.prompt_fields} for ex in rows]
        names = [rotation[i % len(rotation)] for i in range(len(rows))]
        truth = dm.references if server.generates else [task.label(ex) for ex in rows]
    else:
        names, texts = read_rows(settings.input)
    out = []
    for i in range(0, len(texts), settings.batch_size):
        batch, batch_names = texts[i: i + settings.batch_size], names[i: i + settings.batch_size]
        if server.generates:
            recs = [{"output": o} for o in server.generate(batch, batch_names)]
        else:
            recs = [{"class": task.classes[max(range(len(row)), key=row.__getitem__)], "scores": row}
                    for row in server.classify(batch, batch_names).tolist()]
        for j, rec in enumerate(recs):
            rec = {"adapter": batch_names[j], "input": batch[j], **rec}
            out.append(rec)
            print(json.dumps(rec))
    if truth is not None:
        for name in dict.fromkeys(names):
            mine = [(r, t) for r, t in zip(out, truth) if r["adapter"] == name]
            if server.generates:
                bleu = generation_metrics([r["output"] for r, _ in mine], [t for _, t in mine])["bleu"]
                print(f"# {name}: BLEU {bleu:.1f} on {len(mine)} inputs", file=sys.stderr)
            else:
                hits = [task.classes.index(r["class"]) == t for r, t in mine]
                print(f"# {name}: accuracy {sum(hits) / len(hits):.3f} on {len(hits)} inputs", file=sys.stderr)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_main(serve, cfg)


if __name__ == "__main__":
    # `adapters` is a dict the user fills by name; Hydra's struct mode would refuse adapters.<new name>=...
    # without a leading +, so it is added here.
    sys.argv[1:] = ["+" + a if a.startswith("adapters.") else a for a in sys.argv[1:]]
    cli(main)
