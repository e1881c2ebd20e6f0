"""Evaluate one run (an adapter or a compiled prefix) on its task's validation split: the task's metrics,
agreement with the source prefix (class agreement, identical outputs, token agreement), latency against
the base model; written to <run>/eval.json.

Classification: accuracy, macro-F1, per-class accuracy, confusion (torchmetrics, the code path training
validates with). Generation: greedy outputs through feta's cached decoder (outputs.jsonl), corpus BLEU
against all references (sacrebleu) and ROUGE-L.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from feta import latency, runs, storage
from feta.adapters import merged_copy
from feta.compile.faithfulness import next_token
from feta.data import MixSpec, TaskDataModule, TaskKind
from feta.decoding import decode_texts
from feta.kinds import KINDS
from feta.metrics import classification_report, generation_metrics
from feta.models import load_base_model
from feta.scoring import scored_logits
from feta.training import ClassifierModule

OUTPUTS = "outputs.jsonl"


def load_models(run: runs.ResolvedRun):
    """(model with its adapter, tokenizer, model spec, data spec) for a resolved run."""
    model_spec, data_spec, _ = runs.run_specs(run.cfg)
    model, tokenizer = runs.adapted_model(run)
    return model, tokenizer, model_spec, data_spec


def predict(model, datamodule: TaskDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, true classes) over the validation split, through Lightning's predict loop."""
    module = ClassifierModule(model, datamodule.task.verbalizer_ids, lr=0.0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="auto",
                        devices=1, enable_progress_bar=False)
    batches = trainer.predict(module, dataloaders=datamodule.val_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def generate(model, datamodule: TaskDataModule) -> list[str]:
    """Greedy outputs for every validation input."""
    spec = datamodule.spec
    return decode_texts(model, datamodule.tokenizer, datamodule.prompts("validation"), spec.max_new_tokens,
                        spec.eval_batch_size, spec.max_length)


@torch.no_grad()
def teacher_forced_predictions(model, datamodule: TaskDataModule) -> torch.Tensor:
    """The greedy token at every target position of the validation inputs (first reference, teacher-forced)."""
    return torch.cat([scored_logits(model.eval(), batch).argmax(-1) for batch in datamodule.val_dataloader()])


def latency_block(model, kind: str, model_spec, datamodule: TaskDataModule, settings: dict) -> dict[str, Any]:
    """Base vs adapter (vs merged, for weight-space adapters) in this process, interleaved."""
    base, _ = load_base_model(model_spec)
    candidates = {"adapter": model}
    if KINDS[kind].mergeable:  # the merged model is the deployed form
        candidates["merged"] = merged_copy(model)
    prompts = datamodule.prompts("validation", max(settings["batches"]))
    enc = datamodule.tokenizer(prompts, padding="max_length", truncation=True, max_length=settings["prompt_len"],
                               return_tensors="pt")
    grid = tuple(latency.Setting("prefill", b) for b in settings["batches"])
    if settings["decode_tokens"] > 0:
        grid += (latency.Setting("decode", 1),)
    rows = latency.compare(base, candidates, enc["input_ids"], settings=grid, decode_tokens=settings["decode_tokens"],
                           repeats=settings["repeats"], min_run_time=settings["min_run_time"])
    ctx = rows[0]["context"]
    return {"device": ctx["device"], "dtype": ctx["dtype"], "threads": ctx["threads"],
            "rows": [{k: v for k, v in r.items() if k != "context"} for r in rows]}


def _classification(run: runs.ResolvedRun, model, dm: TaskDataModule, model_spec) -> dict[str, Any]:
    preds, labels = predict(model, dm)
    result = {**classification_report(preds, labels, dm.task.num_classes), "classes": dm.task.classes,
              "predictions": preds.tolist(), "val_size": int(labels.numel())}
    if run.kind == "compiled":
        source = _source_predictions(run, dm, model_spec)
        n = min(len(source), len(result["predictions"]))
        result["class_agreement"] = float(
            (torch.tensor(source[:n]) == torch.tensor(result["predictions"][:n])).float().mean())
    return result


def _generation(run: runs.ResolvedRun, model, dm: TaskDataModule, model_spec, outputs_file: str = OUTPUTS
                ) -> dict[str, Any]:
    outputs = generate(model, dm)
    result = {**generation_metrics(outputs, dm.references), "val_size": len(outputs), "outputs": outputs_file}
    rows = [{"input": p, "output": o, "references": r} for p, o, r in zip(dm.prompts("validation"), outputs, dm.references)]
    if run.kind == "compiled":  # agreement with the source prefix, on the references and on its own outputs
        source_model = runs.adapted_model(run, source=True)[0]
        source_outputs = _source_outputs(run, dm, source_model, outputs_file)
        result["identical_outputs"] = sum(a == b for a, b in zip(outputs, source_outputs)) / len(outputs)
        result["token_agreement"] = float((teacher_forced_predictions(model, dm)
                                           == teacher_forced_predictions(source_model, dm)).float().mean())
        result["bleu_vs_source"] = generation_metrics(outputs, [[s] for s in source_outputs])["bleu"]
        result.update(_on_source_outputs(model, source_model, dm, model_spec, source_outputs, result["bleu"]))
        for row, s in zip(rows, source_outputs):
            row["source_output"] = s
    storage.write_text(run.run_dir / outputs_file, "".join(json.dumps(r) + "\n" for r in rows))
    return result


def _on_source_outputs(model, source_model, dm: TaskDataModule, model_spec, source_outputs: list[str],
                       bleu: float) -> dict[str, Any]:
    """Where the source decodes: next-token agreement and KL at every token of the source's own greedy
    outputs (teacher-forced; the compiled model's and the base model's), and the share of the source's BLEU
    gain over the base model that the compiled model keeps, (BLEU − BLEU_base) / (BLEU_source − BLEU_base)."""
    base = load_base_model(model_spec)[0].eval()
    column, size = dm.spec.target_column, dm.spec.eval_batch_size
    own = [{**ex, column: out} for ex, out in zip(dm.splits["validation"], source_outputs)]
    agree = next_token(base, source_model, model, [dm.task.encode(own[i:i + size]) for i in range(0, len(own), size)],
                       "own_token")
    base_bleu = generation_metrics(generate(base, dm), dm.references)["bleu"]
    source_bleu = generation_metrics(source_outputs, dm.references)["bleu"]
    gain = source_bleu - base_bleu
    return {**{k: v for k, v in agree.items() if k != "positions"}, "base_bleu": base_bleu, "source_bleu": source_bleu,
            "gain_recovered": (bleu - base_bleu) / gain if abs(gain) > 1e-9 else None}


def evaluate_run(run_dir: Path, settings: dict) -> dict[str, Any]:
    """Evaluate one run and write <run_dir>/eval.json (atomically); returns it. A run trained on a task
    mixture is scored on each of its tasks (eval.json `tasks`), and `task_mean` is the mean of their main
    metrics on a 0-1 scale (BLEU / 100)."""
    run = runs.resolve_run(run_dir)
    model, tokenizer, model_spec, data_spec = load_models(run)
    data_spec = data_spec.with_validation(settings.get("val_limit"), settings.get("val_seed"))
    result = {
        "run": str(run.run_dir.resolve()),
        "kind": run.kind,
        "name": run.name,
        "model": model_spec.name,
        "val_limit": data_spec.val_limit,  # with val_seed (and val_size): which validation inputs were scored
        "val_seed": data_spec.val_seed,
        "m": run.cfg.adapter.get("m"),
        "r": run.record["rank"] if run.kind == "compiled" else run.cfg.adapter.get("r"),
        # A loaded adapter is frozen, so count what training reported (compiled: the LoRA's tensors).
        "trainable_params": _lora_params(model) if run.kind == "compiled" else run.record["trainable_params"],
        "class_agreement": None,  # classification: the share of predicted classes equal to the source's
        "identical_outputs": None,  # generation: the share of greedy outputs identical to the source's
        "residuals": run.record["residuals"] if run.kind == "compiled" else None,
        "latency": None,
    }
    if isinstance(data_spec, MixSpec):
        tasks = {}
        for name, spec in data_spec.specs.items():
            dm = _datamodule(spec, tokenizer, run)
            tasks[name] = _scored(run, model, dm, model_spec, f"outputs-{name}.jsonl")
        means = [t[t["main_metric"]] / (100.0 if t["main_metric"] == "bleu" else 1.0) for t in tasks.values()]
        result.update(task="mixture", main_metric="task_mean", task_mean=sum(means) / len(means), tasks=tasks,
                      val_size=sum(t["val_size"] for t in tasks.values()))
    else:
        dm = _datamodule(data_spec, tokenizer, run)
        result.update(_scored(run, model, dm, model_spec, OUTPUTS))
    if settings["latency"]["enabled"]:  # a mixture's: on its last task's inputs
        result["latency"] = latency_block(model, run.kind, model_spec, dm, settings["latency"])
    storage.write_json(run.run_dir / runs.EVAL, result)
    return result


def _datamodule(spec, tokenizer, run: runs.ResolvedRun) -> TaskDataModule:
    dm = TaskDataModule(spec, tokenizer, seed=run.cfg.seed)
    dm.setup()
    return dm


def _scored(run: runs.ResolvedRun, model, dm: TaskDataModule, model_spec, outputs_file: str) -> dict[str, Any]:
    """One task's scores of the run: its metrics, and agreement with the source for a compiled run."""
    if dm.task.kind is TaskKind.classification:
        scores = _classification(run, model, dm, model_spec)
    else:
        scores = _generation(run, model, dm, model_spec, outputs_file)
    return {"task": dm.task.kind.value, "main_metric": dm.task.main_metric, **scores}


def _lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _source_predictions(run: runs.ResolvedRun, dm: TaskDataModule, model_spec) -> list[int]:
    """The source prefix's validation predictions: from its eval.json when it has them, else computed."""
    path = run.source_dir / runs.EVAL
    if path.is_file():
        ev = runs.read_json(path, "evaluate.py")
        if len(ev.get("predictions", [])) == len(dm.splits["validation"]):
            return ev["predictions"]
    return predict(runs.adapted_model(run, source=True)[0], dm)[0].tolist()


def _source_outputs(run: runs.ResolvedRun, dm: TaskDataModule, source_model, outputs_file: str = OUTPUTS) -> list[str]:
    """The source prefix's greedy outputs: from its outputs file when it holds these inputs, else decoded."""
    path = run.source_dir / outputs_file
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r["input"] for r in rows] == dm.prompts("validation"):
            return [r["output"] for r in rows]
    return generate(source_model, dm)
