"""Run bookkeeping shared by the entry points: W&B loggers, artifacts and groups, output paths."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from feta import runs
from feta.errors import UserError

log = logging.getLogger("feta")


def output_dir(cfg: DictConfig) -> Path:
    """This job's output directory: `cfg.output_dir` if set (tests, resume), else Hydra's."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def sweep_group(cfg: DictConfig, run_dir: Path) -> str:
    """One W&B group per sweep: the sweep directory's date/time name; a single run is its own group."""
    if cfg.logger and cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return "-".join(Path(hc.sweep.dir).parts[-2:])
    except ValueError:  # Hydra not initialized: called from a test or a notebook
        pass
    return "-".join(run_dir.parts[-2:])


def make_logger(cfg: DictConfig, run_dir: Path, job_type: str, name: str, group: str | None = None):
    """The Lightning logger from `cfg.logger` (wandb/csv), or None when `logger=null`."""
    if not cfg.get("logger"):
        return None
    kind = cfg.logger.kind
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        # `mode` rather than offline=True: the latter sets WANDB_MODE for the whole process.
        logger = WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.get("entity"), group=group or sweep_group(cfg, run_dir),
            name=name, job_type=job_type, save_dir=str(run_dir), mode=cfg.logger.mode,
            tags=list(cfg.logger.get("tags") or []),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        # Lightning passes wandb.init `anonymous=None`, which W&B deprecates with a line it prints itself (no
        # Python warning, so feta.quiet_library_warnings cannot filter it); without the key W&B says nothing.
        logger._wandb_init.pop("anonymous", None)
        return logger
    raise UserError("logger.kind", f"unknown logger {kind!r}", "use logger=wandb, logger=csv or logger=null")


def artifact_name(model: str, run_name: str) -> str:
    """A W&B artifact name unique per model and run, e.g. adapter-smollm2-prefix-m16 (W&B versions repeats)."""
    return f"adapter-{model}-{run_name}"


def compiled_artifact_name(source_artifact: str, compiled_dir: Path) -> str:
    """The compiled adapter's artifact: its prefix's artifact name and the compiled directory's name."""
    return f"{source_artifact}-{Path(compiled_dir).name}"


def _artifact(path: Path, name: str, type_: str):
    import wandb  # W&B loads slowly; only a W&B logger needs it

    artifact = wandb.Artifact(name=name, type=type_)
    artifact.add_dir(str(path))
    return artifact


def log_artifact(logger, path: Path, name: str, type_: str = "adapter") -> None:
    """Log a directory as a W&B artifact (no-op for other loggers)."""
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.log_artifact(_artifact(path, name, type_))


def use_artifact(logger, name: str | None, path: Path | None = None, type_: str = "adapter") -> None:
    """Mark the artifact this run reads (train -> compile -> evaluate lineage), declared by the input
    directory's content so no logged artifact has to be fetched by name.

    W&B refuses `use_artifact` in an offline run, so there the run's config keeps the same lineage:
    `input_artifact` (name) and `input_digest` (the content digest W&B gives the logged artifact)."""
    if type(logger).__name__ != "WandbLogger" or not name or path is None or not Path(path).is_dir():
        return
    run, artifact = logger.experiment, _artifact(Path(path), name, type_)
    if run.offline:
        run.config.update({"input_artifact": name, "input_digest": artifact.digest}, allow_val_change=True)
    else:
        run.use_artifact(artifact)


def finish_wandb() -> None:
    """Close the W&B run; under a multirun the next job would otherwise log into this one."""
    try:
        import wandb  # here: the csv and null loggers never pay for importing wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def run_logger(cfg: DictConfig, log_dir: Path, job_type: str, name: str, run_dir: Path):
    """A W&B logger for a step that reads `run_dir` (evaluate, analyze): in the training run's sweep group,
    with the adapter it reads declared as its input (train -> compile -> evaluate). None unless W&B logs."""
    run = runs.resolve_run(run_dir)
    metrics = runs.read_json(run.training_dir / runs.METRICS) if runs.is_finished(run.training_dir) else {}
    logger = make_logger(cfg, log_dir, job_type=job_type, name=name, group=metrics.get("wandb_group"))
    if logger is None or type(logger).__name__ != "WandbLogger":
        return None
    artifact = metrics.get("artifact")
    if artifact and run.source_dir is not None:
        artifact = compiled_artifact_name(artifact, run.run_dir)  # the compiled adapter compile.py logged
    use_artifact(logger, artifact, run.run_dir / runs.ADAPTER)
    return logger
