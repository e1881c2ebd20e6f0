"""Serve several adapters on one base model, a mixed batch per forward pass (feta/serving.py). Adapters may
be of different tasks: each row is read with its adapter's own task (classes, or a continuation).

    python serve.py adapters.sst2=<LoRA run> adapters.topics=<run>/compiled-r64 val_limit=64
    python serve.py adapters.sst2=<run> adapters.nli=<run>/compiled-r64 input=rows.jsonl

Each adapters.NAME=DIR loads a LoRA run or a compiled prefix under NAME; `__base__` names the base model.
val_limit=N serves N validation inputs of each adapter's task (the first N, or with val_seed a seeded
sample: the subset evaluate.py scores), the adapters taking turns row by row, and prints each adapter's
score on its task (accuracy; generation: BLEU against all references of its inputs).
input= reads JSON Lines, {"adapter": NAME, "<column>": text, ...} ("task": <data name> on a __base__ row
when several tasks are served), or adapter<TAB>text lines for one-column templates.
Output: one JSON line per row (adapter, task, input, and class and scores, or output).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from feta.cli import cli, run_main
from feta.data import TaskKind
from feta.metrics import generation_metrics
from feta.schema import ServeConfig
from feta.serving import AdapterServer, adapter_tasks, read_requests, resolve_adapters, validation_requests


def serve(cfg: DictConfig) -> list[dict]:
    settings: ServeConfig = OmegaConf.to_object(cfg)
    resolved = resolve_adapters(dict(settings.adapters))
    # Rows are read and checked before the model loads: a bad row costs no load.
    requests = None if settings.input is None else read_requests(settings.input, adapter_tasks(resolved))
    server = AdapterServer.load(resolved)
    truth = None
    if requests is None:
        requests, truth = validation_requests(server, settings.val_limit, settings.val_seed, settings.base)
    out = server.serve(requests, settings.batch_size)
    for rec in out:
        print(json.dumps(rec))
    if truth is not None:
        for adapter, task in dict.fromkeys((r["adapter"], r["task"]) for r in out):
            mine = [(r, t) for r, t in zip(out, truth) if (r["adapter"], r["task"]) == (adapter, task)]
            if server.tasks[task].kind is TaskKind.generation:
                bleu = generation_metrics([r["output"] for r, _ in mine], [t for _, t in mine])["bleu"]
                print(f"# {adapter} on {task}: BLEU {bleu:.1f} on {len(mine)} inputs", file=sys.stderr)
            else:
                classes = server.tasks[task].classes
                hits = [classes.index(r["class"]) == t for r, t in mine]
                print(f"# {adapter} on {task}: accuracy {sum(hits) / len(hits):.3f} on {len(hits)} inputs",
                      file=sys.stderr)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_main(serve, cfg)


if __name__ == "__main__":
    # `adapters` is a dict the user fills by name; Hydra's struct mode would refuse adapters.<new name>=...
    # without a leading +, so it is added here.
    sys.argv[1:] = ["+" + a if a.startswith("adapters.") else a for a in sys.argv[1:]]
    cli(main)
