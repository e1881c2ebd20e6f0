"""Running the entry points on tiny runs from tests: a compile of a plain PEFT adapter, an evaluate config
with a fast latency measurement, and a snapshot of a directory tree to prove that nothing was written."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from compile import compile_prefix
from tests.conftest import compose_cfg

FAST_LATENCY = ["latency.repeats=1", "latency.batches=[1,2]", "latency.decode_tokens=4", "latency.min_run_time=0.01",
                "latency.prompt_len=16"]


def compile_peft(ckpt: Path, *overrides: str) -> dict:
    """compile.py's compile_prefix on `ckpt` (a plain PEFT adapter directory or a run), without a logger."""
    return compile_prefix(compose_cfg("compile", [f"ckpt={ckpt}", "~logger", *overrides]))


def eval_cfg(ckpt, *overrides: str) -> DictConfig:
    """An evaluate config for `ckpt` (a run or a sweep directory), without a logger and with a fast latency
    measurement."""
    return compose_cfg("evaluate", [f"ckpt={ckpt}", "~logger", *FAST_LATENCY, *overrides])


def tree(root: Path, skip: set[str]) -> dict[str, tuple[int, int]]:
    """Every path below `root` -> (size, mtime_ns), leaving out the directories named in `skip`."""
    out = {}
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for name in dirs + names:
            path = Path(here) / name
            try:
                stat = path.lstat()
            except FileNotFoundError:  # removed meanwhile by another process
                continue
            out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out
