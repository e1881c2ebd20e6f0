"""Run bookkeeping shared by the entry points: W&B setup, failure handling, output paths."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from feta.errors import EXIT_USER_ERROR, UserError, check_finite, from_config_error

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


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # Hydra not initialized
        return False


def _print_error(message: str) -> None:
    # One line whatever the message holds: a library's text inside it may span several.
    print("error: " + re.sub(r"\s*\n\s*", " ", message.strip()), file=sys.stderr, flush=True)


def _unset(node: DictConfig, prefix: str = "") -> list[str]:
    """The keys holding `???` below `node`, in the config's order."""
    keys = []
    for key, value in node.items_ex(resolve=False):
        if OmegaConf.is_missing(node, key):
            keys.append(f"{prefix}{key}")
        elif isinstance(value, DictConfig):
            keys += _unset(value, f"{prefix}{key}.")
    return keys


def check_required(cfg: DictConfig) -> None:
    """Refuse a config with a required value (`???`) left unset, naming every such key."""
    missing = _unset(cfg)
    if missing:
        also = f" (also unset: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UserError(missing[0], "is required and has no value" + also, f"pass {missing[0]}=<value>")


def run_main(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an entry point's task. A `UserError` prints one line, `error: <field or file>: <what>; <fix>`,
    and exits with status 2 (in a multirun, the job is reported with its overrides and the sweep goes on);
    any other exception is a bug and keeps its traceback."""
    try:
        check_required(cfg)
        check_finite(cfg)
        return task(cfg)
    except UserError as e:
        if _multirun():
            overrides = " ".join(HydraConfig.get().overrides.task)
            _print_error(f"job {HydraConfig.get().job.num} ({overrides}): {e}")
            return None
        _print_error(str(e))
        raise SystemExit(EXIT_USER_ERROR) from None


def cli(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function as the command. Errors in composing the config (a typo'd key, a
    value of the wrong type, an unknown group option, a malformed override) print one line naming the
    key and exit with status 2, like a `UserError` in the task (`run_main`); any other exception is a
    bug and keeps its traceback (exit status 1)."""
    # Hydra prints composition errors over several lines and exits with 1; with HYDRA_FULL_ERROR=1 it
    # raises them instead, so they reach the except below. Bugs then show Hydra's frames too.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as e:  # noqa: BLE001 - sorted below: user errors are shown, the rest re-raised
        error = from_config_error(e)
        if error is None:
            raise
        _print_error(str(error))
        raise SystemExit(EXIT_USER_ERROR) from None


def _log_output_dir(cfg: DictConfig) -> None:
    try:
        log.info(f"output dir: {output_dir(cfg)}")
    except ValueError:  # Hydra not initialized
        pass


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log a failing task's exception and re-raise it; always close W&B; name the output dir unless the
    settings were refused (a `UserError`: it is shown as one line by run_main, and nothing was written)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            result = task(cfg)
        except UserError:
            raise
        except Exception:
            log.exception("task failed")
            _log_output_dir(cfg)
            raise
        finally:
            finish_wandb()
        _log_output_dir(cfg)
        return result

    return wrapped
