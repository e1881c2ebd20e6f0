"""Train one adapter (prefix, LoRA, prompt, IA3, gated prefix) on a task and write a run directory (feta/runs.py).

    python train.py                                   # SmolLM2 + text-initialized prefix, offline
    python train.py -m adapter=prefix adapter.m=8,16,32
    python train.py -m experiment=quickstart          # the README's offline quickstart
    python train.py data=agnews adapter=lora          # 4-class topics; data=e2e: data-to-text generation
    python train.py output_dir=<run dir>              # resume an interrupted run
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from feta import runs, storage
from feta.adapters import build_adapter, run_name, trainable_parameters
from feta.callbacks import StopOnNonFinite
from feta.checkpoints import AtomicCheckpointIO
from feta.cli import cli, run_main, task_wrapper
from feta.data import MixDataModule, MixSpec, TaskDataModule, TaskKind
from feta.devices import job_devices
from feta.errors import UserError, first_line
from feta.metrics import DIRECTION, TRAIN_METRICS
from feta.models import load_base_model
from feta.schema import to_spec
from feta.tracking import artifact_name, log_artifact, make_logger, output_dir, sweep_group
from feta.training import ClassifierModule, GeneratorModule, MixtureModule

log = logging.getLogger("feta")


def instantiate_callback(name: str, node: DictConfig) -> L.Callback:
    """`callbacks.<name>` built; a refused setting inside it is the user's error, shown as one line."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):  # its `where` is the callback's own argument
            raise UserError(f"callbacks.{name}.{cause.where}", cause.what, cause.fix) from None
        raise


def finished_or_checked(run_dir, cfg: DictConfig) -> dict[str, Any] | None:
    """A finished run's metrics (skip_finished), or None; either way `run_dir` must hold this config's run
    (a finished run of another config is refused, never handed back as this one's result)."""
    runs.check_same_config(run_dir, cfg)
    if cfg.skip_finished and runs.is_finished(run_dir):
        log.info(f"{run_dir} already finished (skip_finished=true); not retraining")
        return runs.read_json(run_dir / runs.METRICS)
    return None


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one adapter; returns (metrics, objects) — objects for tests and notebooks."""
    started_at = time.time()
    model_spec, data_spec, adapter_spec = (to_spec(cfg, k) for k in ("model", "data", "adapter"))
    OmegaConf.to_object(cfg)  # TrainConfig's own checks (trainer.*, output_dir), before any write
    run_dir = output_dir(cfg)
    if (finished := finished_or_checked(run_dir, cfg)) is not None:
        return finished, {}
    L.seed_everything(cfg.seed, workers=True)

    log.info(f"Loading model <{model_spec.name}> and adding adapter <{adapter_spec.kind}>")
    base, tokenizer = load_base_model(model_spec)
    peft_model = build_adapter(base, tokenizer, adapter_spec, model_spec.arch, model_spec.name, data_spec.max_length)
    n_trainable = trainable_parameters(peft_model)
    log.info(f"trainable parameters: {n_trainable:,} of {sum(p.numel() for p in peft_model.parameters()):,}")
    mixture = isinstance(data_spec, MixSpec)
    if mixture and "ddp" in str(cfg.trainer.get("strategy", "")):
        raise UserError("trainer.strategy", "data=mix trains in one process: one sampler draws each batch's task",
                        "drop trainer=ddp, or train each task's adapter apart")
    datamodule = (MixDataModule if mixture else TaskDataModule)(data_spec, tokenizer, seed=cfg.seed)
    datamodule.setup()  # reads and checks the data files before any training
    kind = "mixture" if mixture else datamodule.task.kind.value
    recorded = TRAIN_METRICS[kind]
    if cfg.optimized_metric is not None and cfg.optimized_metric not in recorded:
        raise UserError(f"optimized_metric={cfg.optimized_metric}", f"is not recorded by a {kind} run",
                        f"use one of {', '.join(recorded)}")
    extra_callbacks = [instantiate_callback(name, c) for name, c in (cfg.get("callbacks") or {}).items()]
    # Every setting and file is checked: from here this process is the run directory's only writer, and
    # what another writer may have left meanwhile is looked at again under the lock.
    with storage.path_lock(f"output_dir={run_dir}", run_dir):
        if (finished := finished_or_checked(run_dir, cfg)) is not None:
            return finished, {}
        return fit(cfg, run_dir, (model_spec, data_spec, adapter_spec), peft_model, n_trainable, tokenizer,
                   datamodule, extra_callbacks, started_at)


def fit(cfg: DictConfig, run_dir, specs: tuple, peft_model, n_trainable: int, tokenizer,
        datamodule: TaskDataModule | MixDataModule,
        extra_callbacks: list[L.Callback], started_at: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or resume) the checked run in `run_dir` and write its adapter and metrics.json; `specs` are
    the run's (model, data, adapter) specs."""
    model_spec, data_spec, adapter_spec = specs
    optim = dict(lr=adapter_spec.lr, lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps)
    if isinstance(datamodule, MixDataModule):
        module = MixtureModule(peft_model, {name: getattr(task, "verbalizer_ids", None)
                                            for name, task in datamodule.tasks.items()}, **optim)
        task_record = {"task": "mixture", "main_metric": "val_task_mean", "tasks": datamodule.names,
                       "val_size": sum(datamodule.val_sizes.values()), "val_sizes": datamodule.val_sizes}
    else:
        task = datamodule.task
        if task.kind is TaskKind.classification:
            module = ClassifierModule(peft_model, task.verbalizer_ids, **optim)
        else:
            module = GeneratorModule(peft_model, **optim)
        task_record = {"task": task.kind.value,
                       "main_metric": task.train_metric,  # higher is better (BLEU needs decoding: evaluate.py)
                       "val_size": len(datamodule.splits["validation"])}

    name = run_name(adapter_spec)
    group = sweep_group(cfg, run_dir)
    logger = make_logger(cfg, run_dir, job_type="train", name=name, group=group)
    ckpt_dir = run_dir / runs.CHECKPOINTS
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps)
    try:
        trainer = hydra.utils.instantiate(
            cfg.trainer, devices=job_devices(cfg), logger=logger or False, default_root_dir=str(run_dir),
            callbacks=[StopOnNonFinite(adapter_spec.lr), checkpoint, *extra_callbacks],
            enable_checkpointing=True, plugins=[AtomicCheckpointIO()])
    except InstantiationException as e:  # a trainer.* value Lightning refuses that check_trainer does not know
        if not isinstance(e.__cause__, (MisconfigurationException, TypeError, ValueError)):
            raise
        raise UserError("trainer", first_line(e.__cause__), "fix that trainer.* setting") from e
    # Written once the trainer accepted its settings: a refused run leaves no config.yaml, which would
    # make the corrected command a "different config" for this output_dir.
    storage.write_text(run_dir / runs.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))

    start = time.perf_counter()
    # "last": the newest last*.ckpt in the checkpoint callback's dirpath, none on a fresh run (Lightning's
    # warning about that is silenced). weights_only: the checkpoint holds tensors and plain containers.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
        trainer.fit(module, datamodule=datamodule, ckpt_path="last", weights_only=True)
    if trainer.global_step == 0:  # e.g. trainer.max_time too short for one step
        raise UserError("trainer", "the run trained no step", "raise trainer.max_steps, max_epochs, "
                        "limit_train_batches or max_time")
    if module.last_val_step != trainer.global_step:  # no validation ran after the last step
        trainer.validate(module, datamodule=datamodule, verbose=False)
    train_time = time.perf_counter() - start

    scores = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics = {
        **scores,  # val_acc and val_macro_f1 (classification), val_loss, val_token_acc (generation), per task
        **task_record,
        "global_step": trainer.global_step,
        "resumed_from_step": module.start_step,
        "epochs": trainer.current_epoch,
        "train_time_s": train_time,
        "trainable_params": n_trainable,
        "model": model_spec.name,
        "adapter": adapter_spec.kind,
        "name": name,
        "data": data_spec.name,
        "artifact": artifact_name(model_spec.name, name),
        "wandb_group": group,
        "pid": os.getpid(),  # which process ran the job (tests check that parallel jobs really are parallel)
        "started_at": started_at,
        "finished_at": time.time(),
        "world_size": trainer.world_size,
    }
    if not trainer.is_global_zero:  # DDP: only rank 0 writes the run directory
        return metrics, {}
    with storage.atomic_dir(run_dir / runs.ADAPTER) as adapter_dir:
        peft_model.save_pretrained(str(adapter_dir))
    main = metrics["main_metric"]
    if logger is not None:
        logger.log_metrics({f"final/{main}": metrics[main], "final/trainable_params": n_trainable})
        log_artifact(logger, run_dir / runs.ADAPTER, name=metrics["artifact"])
    storage.write_json(run_dir / runs.METRICS, metrics)  # last: its presence marks the run finished
    log.info(f"{main}={metrics[main]:.4f} on {metrics['val_size']} validation inputs ({train_time:.0f} s); {run_dir}")
    return metrics, {"model": peft_model, "tokenizer": tokenizer, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run_main(train, cfg)
    if result is None:  # a multirun job refused its settings (reported above)
        return None
    return sweep_value(result[0], cfg.optimized_metric)


def sweep_value(metrics: dict[str, Any], optimized_metric: str | None = None) -> float:
    """The value a Hydra sweeper optimizes: `optimized_metric` (null: the task's main metric), signed so
    that higher is better whatever the metric (a loss comes back negated)."""
    name = optimized_metric or metrics["main_metric"]
    return DIRECTION[name] * metrics[name]


if __name__ == "__main__":
    cli(main)
