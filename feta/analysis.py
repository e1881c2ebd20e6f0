"""The analyses of trained runs, behind `analyze.py`: the FETA equivalence measurements at a prefix, a
LoRA's task vector against its merged weights, and accuracy along the line between two prefixes.
Each writes into <ckpt>/analysis/ and logs to the run's W&B group."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import wandb
from omegaconf import DictConfig, OmegaConf

from feta import runs
from feta.data import DataSpec, TaskDataModule
from feta.equivalence import analyze
from feta.errors import UserError
from feta.interpolation import interpolate
from feta.models import ModelSpec, load_base_model
from feta.task_vector import task_vector_analysis
from feta.tracking import run_logger

log = logging.getLogger("feta")


def equivalence_models(prefix_run: Path, lora_run: Path | None
                       ) -> tuple[Any, Any, Any | None, Any, torch.Tensor | None, DataSpec, ModelSpec]:
    """(base model, prefix model, LoRA model or None, tokenizer, the prefix's text-init token ids or None,
    data spec, model spec) from a trained prefix run and, optionally, a LoRA run on the same base model."""
    run = runs.resolve_run(prefix_run)
    if run.kind != "prefix":
        raise UserError(f"ckpt={prefix_run}", f"is a {run.kind} run", "analysis=equivalence takes a prefix run")
    model_spec, data_spec, spec = runs.run_specs(run.cfg)
    base = load_base_model(model_spec)[0].eval()
    prefix, tokenizer = runs.adapted_model(run)
    lora = None
    if lora_run is not None:
        other = runs.resolve_run(lora_run)
        if other.kind != "lora" or runs.run_specs(other.cfg)[0] != model_spec:
            raise UserError(f"analysis.lora={lora_run}", f"is a {other.kind} run on {other.cfg.model.name}",
                            f"pass a LoRA run on {model_spec.name}")
        lora = runs.adapted_model(other)[0]
    init_ids = None
    if spec.init == "text":
        # The whole text: the span grid builds text-init prefixes of every m it visits (up to 32), not just spec.m.
        init_ids = torch.tensor(tokenizer(spec.init_text, add_special_tokens=False)["input_ids"])
    return base, prefix, lora, tokenizer, init_ids, data_spec, model_spec


def equivalence_analysis(prefix_run: Path, lora_run: Path | None, out_dir: Path, settings: dict) -> dict:
    """analysis=equivalence: the FETA measurements (feta/equivalence/) at a trained prefix (and a trained
    LoRA, if given), on the first `settings["sentences"]` validation examples."""
    base, prefix, lora, tokenizer, init_ids, data_spec, _ = equivalence_models(prefix_run, lora_run)
    dm = TaskDataModule(data_spec, tokenizer, seed=int(runs.resolve_run(prefix_run).cfg.seed))
    dm.setup()
    batch = dm.collate(dm.splits["validation"][: settings["sentences"]])
    return analyze(base, prefix, lora, batch["input_ids"], batch["attention_mask"], Path(out_dir),
                   layers=settings.get("layers"), heads=settings.get("heads"), init_ids=init_ids)


def run_analysis(cfg: DictConfig, ckpt: Path, val_limit: int | None = None,
                 val_seed: int | None = None) -> dict[str, Any]:
    """`cfg.analysis` at `ckpt`, into <ckpt>/analysis/; its figures and tables also go to W&B."""
    analysis, out_dir = cfg.analysis, ckpt / "analysis"
    if analysis.kind == "equivalence":
        result = equivalence_analysis(ckpt, Path(analysis.lora) if analysis.lora else None, out_dir,
                                      OmegaConf.to_container(analysis))
        if (logger := run_logger(cfg, out_dir, "analysis", f"equivalence-{ckpt.name}", ckpt)) is not None:
            logger.experiment.log({p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))})
    elif analysis.kind == "task_vector":
        result, table = task_vector_analysis(ckpt, analysis.precision, out_dir)
        if (logger := run_logger(cfg, out_dir, "analysis", f"task_vector-{analysis.precision}-{ckpt.name}", ckpt)):
            logger.log_table(f"task_vector/{analysis.precision}", dataframe=table)
        log.info(f"task vector ({analysis.precision}): {result['untouched_changed']} untouched tensors changed, "
                 f"max |τ − B·A·scale| {result['lora_max_abs_diff']:.2e}; {result['csv']}")
    else:
        table = interpolate(ckpt, Path(analysis.other), list(analysis.weights), out_dir, val_limit, val_seed)
        if (logger := run_logger(cfg, out_dir, "analysis", f"interpolate-{ckpt.name}", ckpt)) is not None:
            logger.log_table("interpolation", dataframe=table)
        log.info(f"interpolation {ckpt} -> {analysis.other}:\n{table.to_string(index=False)}")
        result = {"interpolation": table.to_dict("records")}
    return result
