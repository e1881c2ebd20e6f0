"""Classify inputs with several adapters on one base model, a mixed batch per forward pass (feta/serving.py).

    python serve.py adapters.lora=multirun/<date>/<time>/1 adapters.compiled=multirun/<date>/<time>/0/compiled-r4 val=64
    python serve.py adapters.lora=<run> adapters.compiled=<run>/compiled-r4 input=rows.tsv   # adapter<TAB>text lines

Each adapters.NAME=DIR loads a LoRA run or a compiled prefix under NAME; `__base__` names the base model.
val=N classifies the first N validation inputs of the adapters' task, the adapters taking turns row by
row, and prints each adapter's accuracy. Output: one JSON line per row (adapter, input, class, scores).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from feta.data import read_splits
from feta.serving import BASE, AdapterServer, ServeConfig, read_rows
from feta.tracking import cli, run_main


def serve(cfg: DictConfig) -> list[dict]:
    settings: ServeConfig = OmegaConf.to_object(cfg)
    server = AdapterServer.from_runs(dict(settings.adapters))
    labels = None
    if settings.val is not None:
        task = server.task
        rows = read_splits(task.spec, task.columns, task.allowed)["validation"][: settings.val]
        rotation = server.adapters + ([BASE] if settings.base else [])
        texts = [{c: ex[c] for c in task.spec.prompt_fields} for ex in rows]
        names = [rotation[i % len(rotation)] for i in range(len(rows))]
        labels = [task.label(ex) for ex in rows]
    else:
        names, texts = read_rows(settings.input)
    out = []
    for i in range(0, len(texts), settings.batch_size):
        scores = server.classify(texts[i: i + settings.batch_size], names[i: i + settings.batch_size])
        for j, row in enumerate(scores.tolist()):
            k = max(range(len(row)), key=row.__getitem__)
            rec = {"adapter": names[i + j], "input": texts[i + j], "class": server.task.classes[k], "scores": row}
            out.append(rec)
            print(json.dumps(rec))
    if labels is not None:
        for name in dict.fromkeys(names):
            hits = [server.task.classes.index(r["class"]) == y for r, y in zip(out, labels) if r["adapter"] == name]
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
