"""Train one adapter (prefix, LoRA, prompt, IA3, gated prefix) on SST-2 and write a run directory (feta/runs.py).

    python train.py                                   # SmolLM2 + text-initialized prefix, offline
    python train.py -m adapter=prefix adapter.m=8,16,32
    python train.py -m experiment=quickstart          # the README's offline quickstart
    python train.py output_dir=<run dir>              # resume an interrupted run
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from feta import runs
from feta.adapters import build_adapter, run_name, trainable_parameters
from feta.data import SST2DataModule
from feta.devices import job_devices
from feta.models import load_base_model
from feta.module import LabelWordClassifier
from feta.schema import to_spec
from feta.tracking import log_artifact, make_logger, output_dir, sweep_group, task_wrapper

log = logging.getLogger("feta")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one adapter; returns (metrics, objects) — objects for tests and notebooks."""
    started_at = time.time()
    model_spec, data_spec, adapter_spec = (to_spec(cfg, k) for k in ("model", "data", "adapter"))
    run_dir = output_dir(cfg)
    if cfg.skip_finished and runs.is_finished(run_dir):
        log.info(f"{run_dir} already finished (skip_finished=true); not retraining")
        return runs.read_json(run_dir / runs.METRICS), {}
    runs.check_same_config(run_dir, cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runs.CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    log.info(f"Loading model <{model_spec.name}> and adding adapter <{adapter_spec.kind}>")
    base, tokenizer = load_base_model(model_spec)
    peft_model = build_adapter(base, tokenizer, adapter_spec, model_spec.arch, model_spec.name, data_spec.max_length)
    n_trainable = trainable_parameters(peft_model)
    log.info(f"trainable parameters: {n_trainable:,} of {sum(p.numel() for p in peft_model.parameters()):,}")
    datamodule = SST2DataModule(data_spec, tokenizer, seed=cfg.seed)
    module = LabelWordClassifier(peft_model, datamodule.label_ids, lr=adapter_spec.lr)

    name = run_name(adapter_spec)
    group = sweep_group(cfg, run_dir)
    logger = make_logger(cfg, run_dir, job_type="train", name=name, group=group)
    ckpt_dir = run_dir / runs.CHECKPOINTS
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps)
    callbacks = [checkpoint] + [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, devices=job_devices(cfg), logger=logger or False,
                                      callbacks=callbacks, default_root_dir=str(run_dir), enable_checkpointing=True)

    resume = ckpt_dir / "last.ckpt"
    start = time.perf_counter()
    # weights_only: the checkpoint holds tensors and plain containers, nothing to unpickle.
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume.is_file() else None, weights_only=True)
    if module.last_val_step != trainer.global_step:  # no validation ran after the last step
        trainer.validate(module, datamodule=datamodule, verbose=False)
    train_time = time.perf_counter() - start

    metrics = {
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "val_size": len(datamodule.splits["validation"]),
        "global_step": trainer.global_step,
        "resumed_from_step": module.start_step,
        "epochs": trainer.current_epoch,
        "train_time_s": train_time,
        "trainable_params": n_trainable,
        "model": model_spec.name,
        "adapter": adapter_spec.kind,
        "name": name,
        "wandb_group": group,
        "pid": os.getpid(),  # which process ran the job (tests check that parallel jobs really are parallel)
        "started_at": started_at,
        "finished_at": time.time(),
        "world_size": trainer.world_size,
    }
    if not trainer.is_global_zero:  # DDP: only rank 0 writes the run directory
        return metrics, {}
    peft_model.save_pretrained(str(run_dir / runs.ADAPTER))
    if logger is not None:
        logger.log_metrics({"final/val_acc": metrics["val_acc"], "final/trainable_params": n_trainable})
        log_artifact(logger, run_dir / runs.ADAPTER, name=f"adapter-{name}", type_="adapter")
    runs.write_json(run_dir / runs.METRICS, metrics)  # last: its presence marks the run finished
    log.info(f"val_acc={metrics['val_acc']:.4f} on {metrics['val_size']} sentences ({train_time:.0f} s); {run_dir}")
    return metrics, {"model": peft_model, "tokenizer": tokenizer, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)[0]["val_acc"]  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
