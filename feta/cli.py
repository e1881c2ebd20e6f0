"""The entry points' command-line plumbing: one line and exit status 2 for the user's errors, the traceback
for bugs, and the W&B run closed whatever happens.

    @task_wrapper
    def train(cfg): ...

    @hydra.main(...)
    def main(cfg): return run_main(train, cfg)

    if __name__ == "__main__":
        cli(main)
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from feta.errors import EXIT_USER_ERROR, UserError, check_finite, from_config_error
from feta.tracking import finish_wandb, output_dir

log = logging.getLogger("feta")


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
