"""Shared fixtures: configs composed from the real conf/ tree, shrunk to a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from feta.compile import pipeline
from feta.models import load_base_model
from feta.schema import to_spec  # feta.schema registers every schema the YAML files extend
from tests.helpers.peft import N_PROMPTS, word_prompts
from train import train

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize(config_path="../conf", version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


def tiny_train_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """A train config for a few steps of gpt2_tiny on CPU, writing into tmp_path."""
    cfg = compose_cfg("train", ["debug=fast", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    return cfg


def train_tiny(root: Path, name: str, *overrides: str) -> dict:
    """Train a tiny_train_cfg run at root/name; returns its metrics."""
    cfg = tiny_train_cfg(root, *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(root / name)
    return train(cfg)[0]


def compile_cfg(ckpt: Path | str, *overrides: str) -> DictConfig:
    """A compile config with small calibration and held-out sets, for the tiny runs below."""
    return compose_cfg("compile", [f"ckpt={ckpt}", "logger=csv", "calib_size=64", "eval_size=32", *overrides])


def _trained_prefix(tmp_path_factory, name: str, *overrides: str) -> Path:
    cfg = tiny_train_cfg(tmp_path_factory.mktemp(name), "adapter.init=random", "adapter.m=8", *overrides)
    train(cfg)
    return Path(cfg.output_dir)


@pytest.fixture(scope="session")
def prefix_run(tmp_path_factory) -> Path:
    """A random-init prefix (m=8) trained 8 steps on gpt2_tiny; tests compile from it, never into it."""
    return _trained_prefix(tmp_path_factory, "prefix", "trainer.max_steps=8", "data.train_limit=256")


@pytest.fixture(scope="session")
def llama_prefix_run(tmp_path_factory) -> Path:
    """The same on llama_tiny: rotary positions, no biases, grouped k/v heads."""
    return _trained_prefix(tmp_path_factory, "llama", "model=llama_tiny", "trainer.max_steps=4")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """The tiny random models of conf/model/*.yaml saved as local directories (so that a plain PEFT adapter's
    base_model_name_or_path resolves), and a prompt file of N_PROMPTS prompts: {"root", "prompts",
    "llama_tiny", "gpt2_tiny"} -> path. Build adapters on them with tests.helpers.peft.build_adapter."""
    root = tmp_path_factory.mktemp("peft")
    paths = {"root": root, "prompts": root / "prompts.txt"}
    paths["prompts"].write_text("\n".join(word_prompts(N_PROMPTS)) + "\n\n", encoding="utf-8")
    for name in ("llama_tiny", "gpt2_tiny"):
        model, tok = load_base_model(to_spec(compose_cfg("train", [f"model={name}"]), "model"))
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


@pytest.fixture
def first_token_sink(monkeypatch):
    """A random tiny Llama has no massive-activation token; mark each sequence's first token as its sink,
    as SmolLM2's is, so method=sink runs its own path instead of falling back."""
    def first_token(base_model, batch, ratio):
        sinks = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        sinks[:, 0] = True
        return sinks

    monkeypatch.setattr(pipeline, "find_sinks", first_token)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of many tiny-model steps: with 2 threads on a shared 2-core
    machine each step runs 10-50x slower. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA device; the CPU tests cover the same code."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
