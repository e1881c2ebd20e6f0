"""Every entry point's config schema (train, compile, evaluate, analyze, serve), and `to_spec`, which builds
any schema-backed node (checks included). The groups' schemas (model, data, adapter, analysis) live with
what they configure."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# Imported for their ConfigStore entries: composing train.yaml needs every group's *_schema registered.
import feta.adapters  # noqa: F401
import feta.data.spec  # noqa: F401
import feta.models  # noqa: F401
from feta.compile.spec import DTYPES, CompileSpec
from feta.errors import UserError, check_choice, check_positive
from feta.metrics import TRAIN_METRICS

log = logging.getLogger("feta")


def to_spec(cfg: DictConfig, key: str, spec_cls: type | None = None):
    """Build the dataclass behind `cfg[key]` (runs its `__post_init__` checks); `spec_cls` types
    an untyped node, such as a run directory's saved config.yaml.

    Hydra lets `+adapter.foo=1` add a key the schema lacks and `OmegaConf.to_object` then drops it
    silently; a typo must not be ignored, so unknown keys are refused here.
    """
    node = cfg[key]
    spec_cls = spec_cls or OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(spec_cls):
        raise TypeError(f"{key} has no schema (got {spec_cls}); its YAML must list a *_schema in its defaults")
    known = {f.name for f in dataclasses.fields(spec_cls)}
    unknown = sorted(set(node.keys()) - known)
    if unknown:
        raise UserError(f"{key}.{unknown[0]}", f"is not a setting of {spec_cls.__name__}",
                        f"known: {', '.join(sorted(known))}")
    # Resolved in place first: merging detaches the node, and `${data.instruction}` needs its root.
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec_cls), resolved))


# ---------------------------------------------------------------------------------------------
# Entry-point schemas: every key of train.yaml and evaluate.yaml is typed, so a typo or a value of the
# wrong type fails when Hydra composes the config, naming the key; ranges are checked in __post_init__
# (run by OmegaConf.to_object on the task function's first line).


LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Schema of `conf/train.yaml`'s own keys; model, data, adapter and trainer have their own schemas."""

    model: Any = None
    data: Any = None
    adapter: Any = None
    trainer: Any = None
    logger: Any = None
    seed: int = field(default=0, metadata={"help": "Seeds torch, numpy, python and the data subset."})
    output_dir: str | None = field(default=None, metadata={"help": "null = Hydra's job dir; set it to resume."})
    skip_finished: bool = field(default=True, metadata={"help": "A job with a complete metrics.json is not rerun."})
    checkpoint_every_n_steps: int = field(default=50, metadata={"help": "Refresh checkpoints/last.ckpt this often."})
    callbacks: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra Lightning callbacks by name."})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, or linear / cosine decay to 0 at the last step."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear warmup from 0 to adapter.lr."})
    optimized_metric: str | None = field(default=None, metadata={
        "help": "The metrics.json value a Hydra sweeper optimizes, returned so that higher is better "
                "(val_loss: its negative); null = the task's (val_acc; generation: val_token_acc)."})

    def __post_init__(self) -> None:
        check_positive("checkpoint_every_n_steps", self.checkpoint_every_n_steps)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps < 0:
            raise UserError("warmup_steps", f"must be >= 0, got {self.warmup_steps}", "set warmup_steps to 0 or more")
        if self.output_dir is not None:
            check_output_dir("output_dir", Path(self.output_dir))
        check_trainer(self.trainer or {})
        if self.optimized_metric is not None:
            # What some task's training records; train.py checks the run's own task once its data is read.
            check_choice("optimized_metric", self.optimized_metric,
                         tuple(dict.fromkeys(m for names in TRAIN_METRICS.values() for m in names)))


# Lightning Trainer settings checked before a run starts: the smallest value that trains (or that Lightning
# accepts), and the special values it also takes. Below them a run would train no step, or Lightning would
# stop it with a traceback after the run directory was written.
TRAINER_MIN = {
    "max_epochs": (1, (None, -1), "-1: no limit"),
    "max_steps": (1, (-1,), "-1: no limit"),
    "min_epochs": (0, (None,), ""),
    "min_steps": (0, (None,), ""),
    "accumulate_grad_batches": (1, (), ""),
    "log_every_n_steps": (1, (), ""),
    "check_val_every_n_epoch": (1, (None,), "null: validate by val_check_interval"),
    "num_sanity_val_steps": (-1, (), "-1: all"),
    "gradient_clip_val": (0, (None,), "null: no clipping"),
}
FRACTIONS = ("limit_train_batches", "limit_val_batches", "val_check_interval")  # a share in (0, 1] or a count


def check_trainer(trainer: dict[str, Any]) -> None:
    """Refuse `trainer.*` values that train no step or that Lightning refuses, naming the setting."""
    for key, (low, special, meaning) in TRAINER_MIN.items():
        value = trainer.get(key)
        if key not in trainer or value in special and not isinstance(value, bool):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            also = f" ({meaning})" if meaning else ""
            what = "trains no step" if key in ("max_epochs", "max_steps") and value == 0 else f"must be >= {low}"
            raise UserError(f"trainer.{key}={value}", what, f"set trainer.{key} to {low} or more{also}")
    for key in FRACTIONS:
        value = trainer.get(key)
        if value is None or key == "limit_val_batches" and value == 0:  # 0 validation batches: no validation
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                isinstance(value, float) and value > 1 and not value.is_integer()):
            what = "trains no step" if key == "limit_train_batches" and value == 0 else "must be a share in (0, 1] or a count >= 1"
            raise UserError(f"trainer.{key}={value}", what, f"set trainer.{key} to a share in (0, 1] or a count >= 1")


def check_output_dir(key: str, path: Path) -> None:
    """Refuse an output directory that is a file, lies under a file, or cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={path}", "is a file, not a directory", f"point {key} at a directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{key}={path}", f"cannot be made: {parent} is a file", f"point {key} at a directory")
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path}", f"cannot be written ({parent} is not writable)", f"point {key} elsewhere")


@dataclass
class LatencyConfig:
    """evaluate.py's latency settings: base and candidate timed in one process, interleaved."""

    enabled: bool = True
    prompt_len: int = field(default=64, metadata={"help": "Tokens per prompt (padded/truncated)."})
    batches: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Prefill batch sizes."})
    decode_tokens: int = field(default=32, metadata={"help": "Cached greedy decode at batch 1; 0 = skip."})
    repeats: int = field(default=3, metadata={"help": "Interleaved base/candidate rounds."})
    min_run_time: float = field(default=0.2, metadata={"help": "Seconds per timed block."})

    def __post_init__(self) -> None:
        check_positive("latency.prompt_len", self.prompt_len)
        if not self.batches:
            raise UserError("latency.batches", "is empty", "give batch sizes, e.g. 'latency.batches=[1,32]'")
        for b in self.batches:
            check_positive("latency.batches", b)
        if self.decode_tokens < 0:
            raise UserError("latency.decode_tokens", f"must be >= 0, got {self.decode_tokens}", "0 skips decoding")
        check_positive("latency.repeats", self.repeats)
        check_positive("latency.min_run_time", self.min_run_time, what="number")


@dataclass
class EquivalenceAnalysis:
    """analysis=equivalence: the FETA measurements at a prefix run -> <ckpt>/analysis/."""

    kind: str = "equivalence"
    lora: str | None = field(default=None, metadata={"help": "A trained LoRA run to compare with (null = random)."})
    sentences: int = field(default=8, metadata={"help": "Validation examples to linearize around."})
    layers: list[int] | None = field(default=None, metadata={"help": "null = all layers."})
    heads: list[int] | None = field(default=None, metadata={"help": "null = all key/value heads."})

    def __post_init__(self) -> None:
        check_positive("analysis.sentences", self.sentences)


@dataclass
class TaskVectorAnalysis:
    """analysis=task_vector: merged − base per tensor vs B·A·scale -> <ckpt>/analysis/task_vector_<precision>.csv."""

    kind: str = "task_vector"
    precision: str = field(default="fp32", metadata={"help": "Merge precision: fp32 | fp16 | bf16."})

    def __post_init__(self) -> None:
        check_choice("analysis.precision", self.precision, ("fp32", "fp16", "bf16"))


@dataclass
class InterpolateAnalysis:
    """analysis=interpolate: accuracy along (1 − w)·ckpt + w·other -> <ckpt>/analysis/interpolation.{csv,png}."""

    kind: str = "interpolate"
    other: str = field(default=MISSING, metadata={"help": "The second prefix (or prompt) run: same model, kind, m."})
    weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], metadata={"help": "The w values."})

    def __post_init__(self) -> None:
        if not self.weights:
            raise UserError("analysis.weights", "is empty", "give e.g. 'analysis.weights=[0,0.5,1]'")


@dataclass
class ValidationSubset:
    """The two keys of the validation subset, for an entry point that scores a run (evaluate, analyze, serve):
    each overrides the run's own data.val_limit / data.val_seed for one command (DataSpec.with_validation)."""

    val_limit: int | None = field(default=None, metadata={"help": "Score this many validation inputs; null = the "
                                                                   "run's data.val_limit."})
    val_seed: int | None = field(default=None, metadata={"help": "Which of them (a seeded sample); null = the run's "
                                                                 "data.val_seed."})

    def __post_init__(self) -> None:
        check_positive("val_limit", self.val_limit, allow_none=True)


@dataclass
class EvaluateConfig(ValidationSubset):
    """Schema of `conf/evaluate.yaml`."""

    ckpt: str = field(default=MISSING, metadata={"help": "A run, compiled or sweep directory."})
    overwrite: bool = field(default=False, metadata={"help": "Re-evaluate runs that already have an eval.json."})
    report: bool = field(default=True, metadata={"help": "For a sweep dir: write report/ after evaluating."})
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    logger: Any = None


@dataclass
class AnalyzeConfig(ValidationSubset):
    """Schema of `conf/analyze.yaml` (val_limit and val_seed: the inputs analysis=interpolate scores)."""

    ckpt: str = field(default=MISSING, metadata={"help": "The run (or compiled dir) to analyze."})
    analysis: Any = field(default=MISSING, metadata={"help": "conf/analysis/*: equivalence | task_vector | interpolate."})
    logger: Any = None


@dataclass
class CompileConfig(CompileSpec):
    """Schema of `conf/compile.yaml`: the compile settings plus where to read and write."""

    ckpt: str = field(default=MISSING, metadata={"help": "A token-adaptation run written by train.py, or a "
                                                         "plain PEFT adapter directory."})
    base_model: str | None = field(default=None, metadata={"help": "Guard: the model name the prefix must be "
                                                                   "trained on (e.g. smollm2)."})
    model: Any = field(default=None, metadata={"help": "PEFT adapter only: conf/model/*, its base model (null = "
                                                       "adapter_config.json's base_model_name_or_path)."})
    data: Any = field(default=None, metadata={"help": "PEFT adapter only: conf/data/*, the task it calibrates on."})
    calib_file: str | None = field(default=None, metadata={"help": "PEFT adapter only: a UTF-8 text file of "
                                                                   "calibration prompts, one per line."})
    merge: bool = field(default=False, metadata={"help": "Also write merged/: the LoRA merged, safetensors."})
    merge_dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing compiled directory."})
    out_dir: str | None = field(default=None, metadata={"help": "null = <ckpt>/<CompileSpec.dir_name>."})
    logger: Any = field(default=None, metadata={"help": "conf/logger/*: wandb | csv | null."})
    preset: Any = field(default=None, metadata={"help": "conf/preset/*: a named recipe."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_dtype not in DTYPES:
            raise UserError("merge_dtype", f"unknown dtype {self.merge_dtype!r}", f"use one of {', '.join(DTYPES)}")


@dataclass
class ServeConfig(ValidationSubset):
    """Schema of `conf/serve.yaml`."""

    adapters: dict[str, str] = field(default_factory=dict, metadata={"help": "name -> run or compiled dir."})
    input: str | None = field(default=None, metadata={"help": "JSON Lines or adapter<TAB>text lines; '-' = stdin."})
    val: int | None = field(default=None, metadata={"help": "Alias of val_limit (warns)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per forward pass."})
    base: bool = field(default=True, metadata={"help": "With val_limit: the base model takes turns too, on every task."})

    def __post_init__(self) -> None:
        if not self.adapters:
            raise UserError("adapters", "none given", "pass adapters.<name>=<run dir or compiled dir>")
        if self.val is not None:
            check_positive("val", self.val)
            if self.val_limit is not None:
                raise UserError("val", "is an alias of val_limit, and both are given", "give val_limit alone")
            log.warning("serve.py's val is an alias of val_limit, the key evaluate.py and training use too")
            self.val_limit, self.val = self.val, None
        if (self.input is None) == (self.val_limit is None):
            raise UserError("input", "give exactly one of input=<file> and val_limit=<N>", "e.g. val_limit=64")
        super().__post_init__()
        check_positive("batch_size", self.batch_size)


cs = ConfigStore.instance()
cs.store(name="train_schema", node=TrainConfig)
cs.store(name="evaluate_schema", node=EvaluateConfig)
cs.store(name="analyze_schema", node=AnalyzeConfig)
cs.store(name="compile_schema", node=CompileConfig)
cs.store(name="serve_schema", node=ServeConfig)
for _name, _node in (("equivalence", EquivalenceAnalysis), ("task_vector", TaskVectorAnalysis),
                     ("interpolate", InterpolateAnalysis)):
    cs.store(group="analysis", name=f"{_name}_schema", node=_node)
