"""Shared fixtures: configs composed from the real conf/ tree, shrunk to a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import feta.adapters  # noqa: F401  registers the schemas the YAML files extend
import feta.data  # noqa: F401
import feta.models  # noqa: F401

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
