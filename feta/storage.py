"""The files of a run directory, and writing them so that nothing finished is lost.

A training run directory holds::

    config.yaml     resolved Hydra config
    adapter/        PEFT save_pretrained (adapter_config.json + adapter_model.safetensors)
    checkpoints/    Lightning last.ckpt (trainable tensors only) for resuming
    metrics.json    written last, atomically: its presence means the run finished
    wandb/          offline W&B run

- `write_text` / `write_json` / `atomic_dir`: a file or directory appears whole or not at all; a crash or
  a failed write (a full disk) leaves the previous version in place.
- `failed_write`: an `OSError` while writing becomes one line naming the path (a `UserError`).
- `path_lock`: a second process that would write the same run, compiled directory, eval.json or report
  stops with one line naming the holder. The lock is an `flock` on `.<name>.lock` beside the path, holding
  the holder's pid: the kernel drops it when the holder dies, so a killed run never keeps it.

Only the standard library and feta.errors: the report and the measurement code use it without loading models.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from feta.errors import UserError

CONFIG = "config.yaml"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
COMPILE = "compile.json"  # a compiled directory's record (compile.py)
EVAL = "eval.json"  # evaluate.py's result, in any run or compiled directory
# Subtrees that hold other tools' files, some named config.yaml/.json (Hydra's .hydra/, W&B's files/).
NOT_RUNS = {"wandb", "adapter", "checkpoints", "report", "merged", "csv", "analysis", "__pycache__"}
# metrics.json must carry these keys, and the value its `main_metric` names, to count as a finished run.
FINISHED_KEYS = ("global_step", "trainable_params")


def run_dirs(root: str | Path, markers: tuple[str, ...] = (CONFIG, COMPILE)) -> list[Path]:
    """Every directory under `root` (itself included) that holds one of `markers`, in sorted order;
    other tools' subtrees and dot directories (.hydra, .hydra-compile) are not entered."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RUNS and not d.startswith("."))
        if any(m in files for m in markers):
            found.append(Path(here))
    return found


def read_json(path: str | Path, rewritten_by: str = "the step that writes it") -> dict[str, Any]:
    """A JSON file's object; a damaged file is named with the step that rewrites it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"is not valid JSON ({e})", f"delete it and rerun {rewritten_by}") from e
    if not isinstance(data, dict):
        raise UserError(str(path), "holds no JSON object", f"delete it and rerun {rewritten_by}")
    return data


def is_finished(run_dir: str | Path) -> bool:
    """True when the training run wrote a complete metrics.json."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return False
    metrics = read_json(path, "train.py with the same output_dir (skip_finished=false)")
    return all(k in metrics for k in FINISHED_KEYS) and metrics.get("main_metric", "val_acc") in metrics


@contextlib.contextmanager
def failed_write(path: str | Path) -> Iterator[None]:
    """Turn an `OSError` raised in the block (no space, no permission) into one line naming `path`."""
    try:
        yield
    except OSError as e:
        raise UserError(str(path), f"could not be written ({e.strerror or e})",
                        "free disk space or fix the permissions, then rerun the same command") from e


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    with failed_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are for sharing
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (see `write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Write a directory in `<path>.partial` and rename it into place when the block ends without error,
    so a finished directory appears whole or not at all; a crash leaves only the .partial. The previous
    version is renamed aside before the swap and deleted after it, so there is always one whole copy."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    with failed_write(path):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():
            if not overwrite:
                shutil.rmtree(tmp, ignore_errors=True)
                raise FileExistsError(f"{path} appeared while it was being written")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def lock_file(path: str | Path) -> Path:
    """Where the lock on `path` lives: `.<name>.lock` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def path_lock(where: str, path: str | Path) -> Iterator[None]:
    """Hold the only right to write `path` for the block; a second writer gets a UserError naming
    `where`, the holder's pid and the lock file. `path`'s parent directories are made for the lock and
    removed again if they are still empty at the end (a refused run leaves nothing behind)."""
    lock = lock_file(path)
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(where, f"is being written by process {holder} (lock {lock})",
                            "wait for that process to end, or write elsewhere") from None
        # The holder before us may have removed the file after we opened it: then our lock is on a
        # name nobody else sees, and we try again on the file that is there now.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):  # not empty: something was written there
                folder.rmdir()
