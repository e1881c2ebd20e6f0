"""The run-directory contract: what train, compile and evaluate write, and how a run is read back.

A training run directory holds::

    config.yaml     resolved Hydra config
    adapter/        PEFT save_pretrained (adapter_config.json + adapter_model.safetensors)
    checkpoints/    Lightning last.ckpt (trainable tensors only) for resuming
    metrics.json    written last, atomically: its presence means the run finished
    wandb/          offline W&B run
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG = "config.yaml"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
COMPILE = "compile.json"  # a compiled directory's record (compile.py)
EVAL = "eval.json"  # evaluate.py's result, in any run or compiled directory
# Subtrees that hold other tools' files, some named config.yaml/.json (Hydra's .hydra/, W&B's files/).
NOT_RUNS = {"wandb", "adapter", "checkpoints", "report", "merged", "csv", "analysis", "__pycache__"}
# metrics.json must carry these keys to count as a finished run.
FINISHED_KEYS = ("val_acc", "global_step", "trainable_params")


def run_dirs(root: str | Path, markers: tuple[str, ...] = (CONFIG, COMPILE)) -> list[Path]:
    """Every directory under `root` (itself included) that holds one of `markers`, in sorted order;
    other tools' subtrees and dot directories (.hydra, .hydra-compile) are not entered."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RUNS and not d.startswith("."))
        if any(m in files for m in markers):
            found.append(Path(here))
    return found


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") from e


def is_finished(run_dir: str | Path) -> bool:
    """True when the training run wrote a complete metrics.json."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return False
    try:
        metrics = read_json(path)
    except ValueError:
        return False
    return all(k in metrics for k in FINISHED_KEYS)


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved config a training run was made with; errors name what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"ckpt={run_dir}: no such directory; pass a run directory written by train.py")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"ckpt={run_dir}: no {CONFIG}; this is not a feta run directory (train.py writes "
            f"{CONFIG}, {ADAPTER}/ and {METRICS} in each job's directory)"
        )
    cfg = OmegaConf.load(cfg_path)
    for key in ("model", "adapter", "data"):
        if key not in cfg:
            raise ValueError(f"{cfg_path} has no '{key}' section; the run directory is corrupt")
    return cfg


def adapter_dir(run_dir: str | Path) -> Path:
    """The run's PEFT adapter directory, checked to hold a config and safetensors weights."""
    path = Path(run_dir) / ADAPTER
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"ckpt={run_dir}: {ADAPTER}/{name} is missing; the run did not finish "
                "(rerun train.py with the same output directory to resume it)"
            )
    return path


def check_same_config(run_dir: str | Path, cfg: DictConfig) -> None:
    """Refuse to resume a run directory that was made with another model, adapter or data."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return
    old = OmegaConf.load(path)
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("model", "adapter", "data", "seed"):
        if OmegaConf.select(old, key) != OmegaConf.select(new, key):
            raise ValueError(
                f"{run_dir} holds a run with a different '{key}' ({OmegaConf.select(old, key)} vs "
                f"{OmegaConf.select(new, key)}); resume with the same settings or pick another output_dir"
            )


def run_specs(cfg: DictConfig):
    """(ModelSpec, DataSpec, adapter spec) of a saved run config, validated like a fresh one."""
    from feta.adapters import SPECS
    from feta.data import DataSpec
    from feta.models import ModelSpec
    from feta.schema import to_spec

    kind = cfg.adapter.get("kind")
    if kind not in SPECS:
        raise ValueError(f"adapter.kind={kind!r} in the run's config.yaml is unknown; known: {', '.join(SPECS)}")
    return to_spec(cfg, "model", ModelSpec), to_spec(cfg, "data", DataSpec), to_spec(cfg, "adapter", SPECS[kind])
