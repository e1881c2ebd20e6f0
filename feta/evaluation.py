"""Evaluate one run (prefix, LoRA, or compiled): accuracy on SST-2 validation, agreement with the
source prefix, latency against the base model, residuals; written to <run>/eval.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from feta import runs
from feta.adapters import WEIGHT_KINDS, load_adapter, merged_copy
from feta.data import SST2DataModule
from feta.models import load_base_model
from feta.module import LabelWordClassifier

EVAL, COMPILE = runs.EVAL, runs.COMPILE


@dataclass
class Target:
    """What a run directory holds, resolved to models."""

    run_dir: Path
    kind: str  # an adapter kind (feta.adapters.SPECS) or compiled
    name: str
    cfg: Any  # the (source) training run's config
    record: dict  # metrics.json or compile.json
    source_dir: Path | None = None  # compiled: the prefix run it came from


def find_runs(path: Path) -> list[Path]:
    """`path` itself if it is a run or compiled dir (with its compiled dirs), else every one below it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"ckpt={path}: no such directory")
    found = runs.run_dirs(path)
    if not found:
        raise FileNotFoundError(f"no runs under ckpt={path}: run `python train.py -m ...` first, then evaluate.py ckpt=<its sweep dir>")
    return found


def resolve(run_dir: Path) -> Target:
    """Read and validate a run or compiled directory (errors name what is missing)."""
    run_dir = Path(run_dir)
    if (run_dir / COMPILE).is_file():
        record = runs.read_json(run_dir / COMPILE)
        source = Path(record["source_run"])
        cfg = runs.load_run_config(source)
        runs.adapter_dir(run_dir)
        source_kind = "" if cfg.adapter.kind == "prefix" else f"{cfg.adapter.kind}-"
        name = (f"compiled-{source_kind}m{cfg.adapter.m}-r{record['rank']}"
                + ("" if record["method"] == "lstsq" else f"-{record['method']}"))
        return Target(run_dir, "compiled", name, cfg, record, source)
    cfg = runs.load_run_config(run_dir)
    if not runs.is_finished(run_dir):
        raise FileNotFoundError(f"{run_dir}: training did not finish (no complete {runs.METRICS}); rerun train.py with output_dir={run_dir}")
    runs.adapter_dir(run_dir)
    record = runs.read_json(run_dir / runs.METRICS)
    return Target(run_dir, cfg.adapter.kind, record["name"], cfg, record)


def load_models(target: Target):
    """(model with its adapter, tokenizer, datamodule) for a target."""
    model_spec, data_spec, _ = runs.run_specs(target.cfg)
    base, tokenizer = load_base_model(model_spec)
    model = load_adapter(base, target.run_dir / runs.ADAPTER).eval()
    return model, tokenizer, model_spec, data_spec


def predict(model, datamodule: SST2DataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) over the validation split, through Lightning's predict loop."""
    module = LabelWordClassifier(model, datamodule.label_ids, lr=0.0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="auto",
                        devices=1, enable_progress_bar=False)
    batches = trainer.predict(module, dataloaders=datamodule.val_dataloader())
    preds = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return preds, labels


def accuracy_block(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    confusion = torch.zeros(2, 2, dtype=torch.long)
    for t, p in zip(labels.tolist(), preds.tolist()):
        confusion[t, p] += 1
    per_class = (confusion.diagonal() / confusion.sum(1).clamp_min(1)).tolist()
    return {
        "val_acc": float((preds == labels).float().mean()),
        "val_size": int(labels.numel()),
        "per_class_acc": per_class,
        "confusion": confusion.tolist(),  # rows: true label, columns: predicted
        "predictions": preds.tolist(),
    }


def latency_block(model, kind: str, model_spec, datamodule: SST2DataModule, settings: dict) -> dict[str, Any]:
    """Base vs adapter (vs merged, for weight-space adapters) in this process, interleaved."""
    from feta import latency

    base, _ = load_base_model(model_spec)
    candidates = {"adapter": model}
    if kind in (*WEIGHT_KINDS, "compiled"):  # weight-space: the merged model is the deployed form
        candidates["merged"] = merged_copy(model)
    prompts = datamodule.sentences("validation", max(settings["batches"]))
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


def evaluate_run(run_dir: Path, settings: dict) -> dict[str, Any]:
    """Evaluate one run and write <run_dir>/eval.json (atomically); returns it."""
    target = resolve(run_dir)
    model, tokenizer, model_spec, data_spec = load_models(target)
    if settings.get("val_limit"):
        data_spec.val_limit = settings["val_limit"]
    dm = SST2DataModule(data_spec, tokenizer, seed=target.cfg.seed)
    preds, labels = predict(model, dm)
    result = {
        "run": str(target.run_dir.resolve()),
        "kind": target.kind,
        "name": target.name,
        "model": model_spec.name,
        "m": target.cfg.adapter.get("m"),
        "r": target.record["rank"] if target.kind == "compiled" else target.cfg.adapter.get("r"),
        # A loaded adapter is frozen, so count what training reported (compiled: the LoRA's tensors).
        "trainable_params": _lora_params(model) if target.kind == "compiled" else target.record["trainable_params"],
        **accuracy_block(preds, labels),
        "agreement_with_source": None,
        "residuals": None,
        "latency": None,
    }
    if target.kind == "compiled":
        source_preds = _source_predictions(target, dm, model_spec)
        n = min(len(source_preds), len(result["predictions"]))
        result["agreement_with_source"] = float(
            (torch.tensor(source_preds[:n]) == torch.tensor(result["predictions"][:n])).float().mean())
        result["residuals"] = target.record["residuals"]
    if settings["latency"]["enabled"]:
        result["latency"] = latency_block(model, target.kind, model_spec, dm, settings["latency"])
    runs.write_json(target.run_dir / EVAL, result)
    return result


def _lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _source_predictions(target: Target, dm: SST2DataModule, model_spec) -> list[int]:
    """The source prefix's validation predictions: from its eval.json when it has them, else computed."""
    path = target.source_dir / EVAL
    if path.is_file():
        ev = runs.read_json(path)
        if len(ev.get("predictions", [])) == len(dm.splits["validation"]):
            return ev["predictions"]
    base, _ = load_base_model(model_spec)
    prefix = load_adapter(base, target.source_dir / runs.ADAPTER).eval()
    return predict(prefix, dm)[0].tolist()


def equivalence_analysis(prefix_run: Path, lora_run: Path | None, out_dir: Path, settings: dict) -> dict:
    """`evaluate.py analysis=equivalence`: the FETA measurements (feta/equivalence.py) at a trained
    prefix (and a trained LoRA, if given), on the first validation sentences."""
    from feta.equivalence import analyze

    target = resolve(prefix_run)
    if target.kind != "prefix":
        raise ValueError(f"analysis=equivalence takes a prefix run as ckpt; {prefix_run} is a {target.kind} run")
    model_spec, data_spec, spec = runs.run_specs(target.cfg)
    base, tokenizer = load_base_model(model_spec)
    prefix = load_adapter(load_base_model(model_spec)[0], target.run_dir / runs.ADAPTER).eval()
    lora = None
    if lora_run is not None:
        lora_target = resolve(lora_run)
        if lora_target.kind != "lora" or lora_target.cfg.model.name != model_spec.name:
            raise ValueError(f"lora={lora_run} must be a LoRA run on {model_spec.name}, got a {lora_target.kind} run "
                             f"on {lora_target.cfg.model.name}")
        lora = load_adapter(load_base_model(model_spec)[0], lora_target.run_dir / runs.ADAPTER).eval()
    dm = SST2DataModule(data_spec, tokenizer, seed=target.cfg.seed)
    dm.setup()
    batch = dm.collate(dm.splits["validation"][: settings["sentences"]])
    init_ids = None
    if spec.init == "text":
        # The whole text: the span grid builds text-init prefixes of every m it visits (up to 32), not just spec.m.
        init_ids = tokenizer(spec.init_text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return analyze(base, prefix, lora, batch["input_ids"], batch["attention_mask"], Path(out_dir),
                   layers=settings.get("layers"), heads=settings.get("heads"), init_ids=init_ids)
