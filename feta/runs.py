"""How a run directory is read back: its config as specs, its adapter checked, its kind (prefix, LoRA,
compiled, ...) resolved. The files themselves and their names are feta.storage's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from feta.adapters import SPECS, load_adapter
from feta.data import DataSpec, MixSpec
from feta.errors import UserError, check_path
from feta.models import ModelSpec, load_base_model
from feta.schema import TrainConfig, to_spec
# The file names and readers are storage's; callers that load runs reach them here as runs.<name>.
from feta.storage import ADAPTER, CHECKPOINTS, COMPILE, CONFIG, EVAL, METRICS, is_finished, read_json, run_dirs  # noqa: F401


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved config a training run was made with; errors name what is missing."""
    run_dir = check_path(f"ckpt={run_dir}", run_dir, "directory", "pass a run directory written by train.py")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"ckpt={run_dir}", f"no {CONFIG}: not a feta run directory",
                        f"pass a directory where train.py wrote {CONFIG}, {ADAPTER}/ and {METRICS}")
    try:
        cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # noqa: BLE001 - yaml raises many types for a damaged file
        raise UserError(str(cfg_path), f"is not valid YAML ({e})", "restore it or retrain the run") from e
    for key in ("model", "adapter", "data"):
        if not isinstance(cfg, DictConfig) or key not in cfg:
            raise UserError(str(cfg_path), f"has no '{key}' section", "restore it or retrain the run")
    return cfg


def check_adapter(path: str | Path, rewritten_by: str) -> Path:
    """A PEFT adapter directory, checked to hold a JSON config and readable, non-empty safetensors weights."""
    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserError(str(path / name), "is missing", f"rerun {rewritten_by}")
    read_json(path / "adapter_config.json", rewritten_by)
    weights = path / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise UserError(str(weights), f"is corrupt ({e})", f"restore it or rerun {rewritten_by}") from e
    if not keys:
        raise UserError(str(weights), "holds no tensors", f"restore it or rerun {rewritten_by}")
    return path


def adapter_dir(run_dir: str | Path) -> Path:
    """A training run's PEFT adapter directory, checked (see `check_adapter`)."""
    return check_adapter(Path(run_dir) / ADAPTER, f"train.py with output_dir={run_dir} to resume the run")


def check_same_config(run_dir: str | Path, cfg: DictConfig) -> None:
    """Refuse to resume a run directory that was made with another model, adapter, data, seed or LR schedule."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return
    old = OmegaConf.load(path)
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # A config.yaml without the schedule keys trained with their defaults.
    for key, default in (("model", None), ("adapter", None), ("data", None), ("seed", None),
                         ("lr_schedule", TrainConfig.lr_schedule), ("warmup_steps", TrainConfig.warmup_steps)):
        was, is_ = OmegaConf.select(old, key, default=default), OmegaConf.select(new, key, default=default)
        if was != is_:
            raise UserError(f"output_dir={run_dir}", f"holds a run with a different '{key}' ({was} vs {is_})",
                            "resume with the same settings or pick another output_dir")


def run_specs(cfg: DictConfig):
    """(ModelSpec, DataSpec, adapter spec) of a saved run config, validated like a fresh one."""
    kind = cfg.adapter.get("kind")
    if kind not in SPECS:
        raise UserError(f"adapter.kind={kind!r}", "unknown in the run's config.yaml", f"known: {', '.join(SPECS)}")
    data_cls = MixSpec if "tasks" in cfg.data else DataSpec
    return to_spec(cfg, "model", ModelSpec), to_spec(cfg, "data", data_cls), to_spec(cfg, "adapter", SPECS[kind])


@dataclass
class ResolvedRun:
    """What a run or compiled directory holds, read and checked."""

    run_dir: Path
    kind: str  # an adapter kind (feta.adapters.SPECS) or "compiled"
    name: str
    cfg: DictConfig  # the (source) training run's config
    record: dict  # metrics.json or compile.json
    source_dir: Path | None = None  # compiled: the prefix run it came from

    @property
    def training_dir(self) -> Path:
        """The training run behind it (the source run of a compiled directory)."""
        return self.source_dir or self.run_dir


def resolve_run(run_dir: str | Path) -> ResolvedRun:
    """Read and validate a training run or compiled directory; errors name what is missing."""
    run_dir = Path(run_dir)
    if (run_dir / COMPILE).is_file():
        record = read_json(run_dir / COMPILE, "compile.py")
        if (record.get("source") or {}).get("kind") == "peft":
            raise UserError(f"ckpt={run_dir}", "was compiled from a plain PEFT adapter; evaluate.py and serve.py read "
                            "feta runs only", f"read its {COMPILE} (next_token) instead")
        source = Path(record["source_run"])
        cfg = load_run_config(source)
        check_adapter(run_dir / ADAPTER, f"compile.py ckpt={source} overwrite=true")
        source_kind = "" if cfg.adapter.kind == "prefix" else f"{cfg.adapter.kind}-"
        name = (f"compiled-{source_kind}m{cfg.adapter.m}-r{record['rank']}"
                + ("" if record["method"] == "sink" else f"-{record['method']}"))
        return ResolvedRun(run_dir, "compiled", name, cfg, record, source)
    cfg = load_run_config(run_dir)
    if not (run_dir / METRICS).is_file():
        raise UserError(f"ckpt={run_dir}", f"training did not finish (no {METRICS})",
                        f"rerun train.py with output_dir={run_dir} to resume it")
    if not is_finished(run_dir):
        raise UserError(str(run_dir / METRICS), "is incomplete (a key is missing)",
                        f"delete it and rerun train.py with output_dir={run_dir} skip_finished=false")
    adapter_dir(run_dir)
    record = read_json(run_dir / METRICS)
    return ResolvedRun(run_dir, cfg.adapter.kind, record["name"], cfg, record)


def check_single_task(run_dir: str | Path, cfg: DictConfig, command: str) -> None:
    """Refuse a run trained on a task mixture (data=mix), or compiled from one, where `command` reads one
    task's run."""
    if "tasks" in cfg.data:
        raise UserError(str(run_dir), f"comes from a task mixture ({', '.join(cfg.data.tasks)}); {command} reads "
                        "single-task runs", "evaluate.py scores a mixture run on each of its tasks")


def adapted_model(run: ResolvedRun, source: bool = False):
    """(the base model with the run's adapter, in eval mode; its tokenizer): one fresh base model per call.
    `source`: the adapter a compiled run was compiled from."""
    base, tokenizer = load_base_model(run_specs(run.cfg)[0])
    return load_adapter(base, (run.source_dir if source else run.run_dir) / ADAPTER).eval(), tokenizer


def find_runs(path: str | Path) -> list[Path]:
    """`path` itself if it is a run or compiled dir (with its compiled dirs), else every one below it."""
    path = check_path(f"ckpt={path}", path, "directory", "pass a run, compiled or sweep directory")
    found = run_dirs(path)
    if not found:
        raise UserError(f"ckpt={path}", "holds no runs", "run `python train.py -m ...` first, then evaluate.py "
                        "ckpt=<its sweep dir>")
    return found
