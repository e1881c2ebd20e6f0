"""Run bookkeeping shared by the three entry points: W&B setup, failure handling, output paths."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("feta")


def output_dir(cfg: DictConfig) -> Path:
    """This job's output directory: `cfg.output_dir` if set (tests, resume), else Hydra's."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def sweep_group(cfg: DictConfig, run_dir: Path) -> str:
    """One W&B group per sweep: the sweep directory's date/time name; a single run is its own group."""
    if cfg.logger and cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

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
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        # `mode` rather than offline=True: the latter sets WANDB_MODE for the whole process.
        return WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.get("entity"), group=group or sweep_group(cfg, run_dir),
            name=name, job_type=job_type, save_dir=str(run_dir), mode=cfg.logger.mode,
            tags=list(cfg.logger.get("tags") or []),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    raise ValueError(f"logger.kind must be wandb or csv, got {kind!r} (or logger=null for no logger)")


def log_artifact(logger, path: Path, name: str, type_: str) -> None:
    """Log a directory as a W&B artifact (no-op for other loggers)."""
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    artifact = wandb.Artifact(name=name, type=type_)
    artifact.add_dir(str(path))
    logger.experiment.log_artifact(artifact)


def finish_wandb() -> None:
    """Close the W&B run; under a multirun the next job would otherwise log into this one."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log a failing task's exception and re-raise it; always close W&B and name the output dir."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("task failed")
            raise
        finally:
            finish_wandb()
            try:
                log.info(f"output dir: {output_dir(cfg)}")
            except ValueError:
                pass

    return wrapped

