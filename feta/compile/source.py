"""Where a compile reads from: a feta training run, or a plain PEFT adapter directory trained anywhere.

`resolve_source` turns `ckpt` (and, for a PEFT adapter, `model`, `data` and `calib_file`) into a
`CompileSource`, checking all it can before a model is loaded or anything is written. `check_shapes`
then compares the adapter with the loaded base model, still before any fit: an adapter made for another
model must be refused with both shapes named, not fail inside PEFT's loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from omegaconf import DictConfig
from safetensors import safe_open

from feta import runs
from feta.data import DataSpec
from feta.errors import UserError, check_path
from feta.kinds import KINDS, kinds
from feta.models import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT's token adaptations and the feta kind each compiles as (feta.kinds: compilable).
PEFT_KINDS = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt",
              "ADAPTION_PROMPT": "gated_prefix"}
# config.json's model_type -> feta's architecture family (feta.models.ModelSpec.arch).
ARCHS = {"llama": "llama", "gpt2": "gpt2"}
PEFT_SAVE = "the adapter's save_pretrained"  # what rewrites a plain PEFT adapter's files
MODEL_FIX = ("pass model=<name> (conf/model/*.yaml, e.g. model=smollm2), with model.source=local "
             "model.path=<dir> for another local model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class CompileSource:
    """A compile's input, resolved and checked: which adapter, on which base model, calibrated on what."""

    ckpt: Path
    adapter_dir: Path
    kind: str  # prefix | prompt | gated_prefix
    peft_type: str
    model: ModelSpec
    data: DataSpec | None  # a task to calibrate on ...
    prompts: list[str] | None  # ... or the prompts of a calib_file
    virtual_tokens: int  # the prefix, prompt or adapter prompt length
    description: dict[str, Any] = field(default_factory=dict)  # compile.json's `source`
    run_dir: Path | None = None  # a feta run (it has metrics.json); None for a plain PEFT adapter
    seed: int = 0  # a run's seed; the calibration sample is drawn with it


def resolve_source(ckpt: str | Path, model: ModelSpec | None = None, data: DataSpec | None = None,
                   calib_file: str | None = None, base_model: str | None = None) -> CompileSource:
    """`ckpt` as a feta run (it has config.yaml) or a PEFT adapter directory (adapter_config.json); `model`,
    `data` and `calib_file` apply to a PEFT adapter only, `base_model` guards the base model's name."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not (ckpt / runs.CONFIG).is_file() and (ckpt / ADAPTER_CONFIG).is_file():
        return _peft_source(ckpt, model, data, calib_file, base_model)
    if (model is not None or data is not None or calib_file) and (ckpt / runs.CONFIG).is_file():
        raise UserError(_given_label(model, data, calib_file), f"applies to a plain PEFT adapter, and ckpt={ckpt} is "
                        "a feta run", "drop it: a run compiles on the model and data it was trained with")
    cfg, adapter = check_source(ckpt, base_model)
    model_spec, data_spec, _ = runs.run_specs(cfg)
    config = runs.read_json(adapter / ADAPTER_CONFIG, f"train.py with output_dir={ckpt}")
    description = {"kind": "feta_run", "run": str(ckpt.resolve()), "peft_type": config.get("peft_type"),
                   "compiled_as": cfg.adapter.kind, "model": model_spec.name,
                   "model_from": f"the run's {runs.CONFIG}", "data": data_spec.name}
    return CompileSource(ckpt, adapter, cfg.adapter.kind, str(config.get("peft_type")), model_spec, data_spec, None,
                         _virtual_tokens(config), description, ckpt, int(cfg.seed))


def _given_label(model: ModelSpec | None, data: DataSpec | None, calib_file: str | None) -> str:
    if model is not None:
        return f"model={model.name}"
    return f"data={data.name}" if data is not None else f"calib_file={calib_file}"


def check_source(run_dir: str | Path, model_override: str | None = None) -> tuple[DictConfig, Path]:
    """Validate a feta run before anything is loaded or written; returns (run cfg, adapter dir)."""
    if Path(run_dir).is_dir() and not (Path(run_dir) / runs.CONFIG).is_file():
        raise UserError(f"ckpt={run_dir}", f"is neither a feta run ({runs.CONFIG}) nor a PEFT adapter "
                        f"({ADAPTER_CONFIG})", "pass a directory train.py wrote, or one PEFT's save_pretrained wrote")
    cfg = runs.load_run_config(run_dir)
    kind = cfg.adapter.kind
    if not KINDS[kind].compilable:
        raise UserError(f"ckpt={run_dir}", f"is a {kind} run; compile turns a token adaptation "
                        f"({', '.join(kinds(compilable=True))}) into LoRA",
                        f"a {kind} adapter is already weight-space: merge it with PEFT's merge_and_unload")
    if model_override and model_override != cfg.model.name:
        raise UserError(f"base_model={model_override}", f"but the prefix in ckpt={run_dir} was trained on "
                        f"{cfg.model.name}", f"drop base_model or set base_model={cfg.model.name}")
    return cfg, runs.adapter_dir(run_dir)


def _peft_source(ckpt: Path, model: ModelSpec | None, data: DataSpec | None, calib_file: str | None,
                 base_model: str | None) -> CompileSource:
    config = runs.read_json(ckpt / ADAPTER_CONFIG, PEFT_SAVE)
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_KINDS:
        if not peft_type:
            raise UserError(str(ckpt / ADAPTER_CONFIG), "has no peft_type", f"rewrite it with {PEFT_SAVE}")
        raise UserError(f"ckpt={ckpt}", f"holds a {peft_type} adapter, already weight-space; compile turns a token "
                        f"adaptation ({', '.join(PEFT_KINDS)}) into LoRA",
                        "merge it with PEFT's merge_and_unload instead")
    # PEFT applies a prompt-learning adapter in the model class task_type picks (PeftModelForCausalLM here);
    # LLaMA-Adapter sits inside the attention modules and needs no task_type.
    task_type = config.get("task_type")
    if task_type != "CAUSAL_LM" and not (peft_type == "ADAPTION_PROMPT" and task_type is None):
        raise UserError(f"ckpt={ckpt}", f"has task_type={task_type}; compile reads causal language models",
                        f"save the adapter with task_type=\"CAUSAL_LM\" (or set it in {ADAPTER_CONFIG})")
    runs.check_adapter(ckpt, PEFT_SAVE)
    if model is not None:
        model_spec, found = model, f"model={model.name}"
    else:
        model_spec, found = _base_model(ckpt, config)
    if base_model and base_model != model_spec.name:
        raise UserError(f"base_model={base_model}", f"but the base model of ckpt={ckpt} is {model_spec.name}",
                        f"drop base_model or pass model={base_model}")
    prompts = _calibration(data, calib_file)
    description = {
        "kind": "peft", "peft_type": peft_type, "compiled_as": PEFT_KINDS[peft_type], "adapter": str(ckpt.resolve()),
        "base_model_name_or_path": config.get("base_model_name_or_path"), "model": model_spec.name,
        "model_path": model_spec.path, "model_from": found, "data": data.name if data is not None else None,
        "calib_file": str(Path(calib_file).resolve()) if calib_file else None,
    }
    return CompileSource(ckpt, ckpt, PEFT_KINDS[peft_type], peft_type, model_spec, data, prompts,
                         _virtual_tokens(config), description)


def _virtual_tokens(config: dict[str, Any]) -> int:
    return int(config.get("num_virtual_tokens") or config.get("adapter_len") or 0)


def _base_model(ckpt: Path, config: dict[str, Any]) -> tuple[ModelSpec, str]:
    """The base model `base_model_name_or_path` names, when it resolves without a network: a local directory,
    or a hub id whose files are already in the hub cache (loaded from the cached snapshot directory, so that
    transformers never asks the hub for updates). Returns the spec and how it was found."""
    name = config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"ckpt={ckpt}", f"{ADAPTER_CONFIG} names no base model (base_model_name_or_path)", MODEL_FIX)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _local_model(ckpt, folder, name), "local directory"
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # a path (of the machine the adapter was trained on), not a hub id
        cached = None
    if isinstance(cached, str):  # None: not cached; a sentinel: cached as missing on the hub
        return _local_model(ckpt, Path(cached).parent, name), "hub cache"
    raise UserError(f"ckpt={ckpt}", f"its base model {name!r} is neither a local directory nor in the hub cache "
                    "(compile uses no network)", MODEL_FIX)


def _local_model(ckpt: Path, folder: Path, name: str) -> ModelSpec:
    where = f"ckpt={ckpt}"
    if not (folder / "config.json").is_file():
        raise UserError(where, f"its base model {name!r} has no config.json in {folder}", MODEL_FIX)
    model_type = runs.read_json(folder / "config.json", "the base model's save_pretrained").get("model_type")
    if model_type not in ARCHS:
        raise UserError(where, f"its base model {name!r} is a {model_type} model; compile fits Llama and GPT-2 "
                        f"models (model_type {', '.join(ARCHS)})", "compile an adapter of one of those")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise UserError(where, f"its base model {name!r} has no weights in {folder}", MODEL_FIX)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(where, f"its base model {name!r} has no tokenizer in {folder}",
                        f"{MODEL_FIX}, and model.tokenizer=<tokenizer dir>")
    return ModelSpec(name=Path(name).name, source="local", path=str(folder), arch=ARCHS[model_type])


def _calibration(data: DataSpec | None, calib_file: str | None) -> list[str] | None:
    """The prompts of `calib_file`, or None when a task (`data`) calibrates; exactly one must be given."""
    if data is not None and calib_file:
        raise UserError(f"calib_file={calib_file}", f"given with data={data.name}; a compile calibrates on one of them",
                        "drop one")
    if data is None and not calib_file:
        raise UserError("data", "none given, and a plain PEFT adapter brings no data: a compile fits at fixed data",
                        "pass data=<name> (a task, e.g. data=sst2) or calib_file=<UTF-8 text, one prompt per line>")
    return read_prompts(calib_file) if calib_file else None


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one prompt each; at least two (one is held out)."""
    where = f"calib_file={path}"
    path = check_path(where, path, "file", "pass a UTF-8 text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(where, f"is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if len(prompts) < 2:
        raise UserError(where, "holds no prompts (only blank lines)" if not prompts else
                        "holds 1 prompt; a compile needs at least 2 (a share is held out to measure it)",
                        "write one prompt per line; a few hundred calibrate well")
    return prompts


# ---------------------------------------------------------------------------------------------
# The adapter against the loaded base model


def expected_config(peft_type: str, model_config) -> dict[str, int]:
    """What PEFT writes into adapter_config.json for this model: num_layers, num_attention_heads and token_dim;
    a prefix on grouped-query attention holds the key/value heads only (PEFT's prompt-learning set-up)."""
    heads, dim = model_config.num_attention_heads, model_config.hidden_size
    if peft_type == "PREFIX_TUNING" and getattr(model_config, "num_key_value_heads", None):
        head_dim = getattr(model_config, "head_dim", None) or dim // heads
        heads = model_config.num_key_value_heads
        dim = head_dim * heads
    return {"num_layers": model_config.num_hidden_layers, "num_attention_heads": heads, "token_dim": dim}


def check_shapes(source: CompileSource, base) -> None:
    """Refuse an adapter made for another model, naming both shapes: adapter_config.json's sizes, then the
    saved weights' shapes."""
    config = runs.read_json(source.adapter_dir / ADAPTER_CONFIG, PEFT_SAVE)
    where, name = f"ckpt={source.ckpt}", f"model {source.model.name}"
    fix = "pass model=<the model it was trained for>"
    weights = source.adapter_dir / WEIGHTS
    with safe_open(str(weights), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if source.peft_type == "ADAPTION_PROMPT":
        _check_adaption_prompt(config, shapes, base, where, name, fix)
        return
    want = expected_config(source.peft_type, base.config)
    bad = [k for k in want if config.get(k) is not None and config[k] != want[k]]
    if bad:
        raise UserError(where, f"{ADAPTER_CONFIG} has {', '.join(f'{k}={config[k]}' for k in bad)} but {name} has "
                        f"{', '.join(f'{k}={want[k]}' for k in bad)}", fix)
    m = _virtual_tokens(config) * int(config.get("num_transformer_submodules") or 1)
    width = want["num_layers"] * 2 * want["token_dim"] if source.peft_type == "PREFIX_TUNING" else want["token_dim"]
    have = shapes.get("prompt_embeddings")
    if have is None:
        raise UserError(str(weights), "holds no prompt_embeddings", f"rerun {PEFT_SAVE}")
    if have != (m, width):
        raise UserError(where, f"{WEIGHTS} holds prompt_embeddings of shape {list(have)} but {name} needs "
                        f"{[m, width]}", fix)


def _check_adaption_prompt(config: dict, shapes: dict, base, where: str, name: str, fix: str) -> None:
    n_layers, dim = base.config.num_hidden_layers, base.config.hidden_size
    if (config.get("adapter_layers") or 0) > n_layers:
        raise UserError(where, f"{ADAPTER_CONFIG} has adapter_layers={config['adapter_layers']} but {name} has "
                        f"num_hidden_layers={n_layers}", fix)
    modules = {n for n, _ in base.named_modules()}
    for key, shape in shapes.items():
        if not key.endswith(".adaption_prompt"):
            continue
        module = re.sub(r"^base_model\.model\.", "", key.rsplit(".", 1)[0])
        if module not in modules:
            raise UserError(where, f"{WEIGHTS} holds {key}, but {name} has no module {module}", fix)
        if shape[-1] != dim:
            raise UserError(where, f"{WEIGHTS} holds {key} of shape {list(shape)} but {name} needs width "
                            f"hidden_size={dim}", fix)
