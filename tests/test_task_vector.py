"""analyze.py analysis=task_vector: the merged-minus-base task vector against B·A·scale, per precision."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from analyze import analyze
from feta.task_vector import compare_task_vector
from tests.conftest import compose_cfg, tiny_train_cfg
from train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    out = {}
    for job, overrides in {"lora": ("adapter=lora",), "prefix": ("adapter.init=random", "adapter.m=4")}.items():
        cfg = tiny_train_cfg(root, *overrides)
        with open_dict(cfg):
            cfg.output_dir = str(root / job)
        train(cfg)
        out[job] = root / job
    return out


def _analyse(ckpt: Path, precision: str) -> tuple[dict, pd.DataFrame]:
    summary = analyze(compose_cfg("analyze", [f"ckpt={ckpt}", "analysis=task_vector", f"analysis.precision={precision}", "~logger"]))
    table = pd.read_csv(ckpt / "analysis" / f"task_vector_{precision}.csv")
    assert json.loads((ckpt / "analysis" / f"task_vector_{precision}.json").read_text())["tensors"] == len(table)
    return summary, table


def test_fp32_task_vector_is_the_lora_delta(runs):
    summary, table = _analyse(runs["lora"], "fp32")
    lora, other = table[table["lora"]], table[~table["lora"]]
    assert len(lora) == 2 and set(lora["tensor"]) == {f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)}
    assert lora["changed"].all() and (lora["max_abs_diff"] <= 1e-6).all()
    assert ((lora["cosine"] <= 1.0) & (lora["cosine"] > 1 - 1e-6)).all()
    assert not other["changed"].any() and (other["max_abs_tau"] == 0).all()
    assert summary["untouched_changed"] == 0 and summary["tau_to_delta_norm"] == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_merge_shows_its_artifacts(runs, precision):
    summary, table = _analyse(runs["lora"], precision)
    other = table[~table["lora"]]
    # The round trip through fp16/bf16 moved tensors the LoRA never touched, and the report says so.
    assert summary["untouched_changed"] > 0 and other["changed"].sum() == summary["untouched_changed"]
    assert summary["untouched_max_abs_tau"] > 1e-6 and summary["tau_to_delta_norm"] > 1.0
    assert summary["lora_max_abs_diff"] > 1e-6
    assert (table["cosine"].dropna() <= 1.0).all()


def test_task_vector_refuses_a_prefix_run(runs):
    with pytest.raises(ValueError, match=r"ckpt=.*: is a prefix run; analysis=task_vector takes a LoRA run or a compiled dir"):
        analyze(compose_cfg("analyze", [f"ckpt={runs['prefix']}", "analysis=task_vector", "~logger"]))


def test_bad_precision_names_the_field(runs):
    with pytest.raises(ValueError, match=r"analysis\.precision: unknown choice 'fp8'; use one of fp32, fp16, bf16"):
        analyze(compose_cfg("analyze", [f"ckpt={runs['lora']}", "analysis=task_vector", "analysis.precision=fp8", "~logger"]))


def test_cosine_is_at_most_one_and_exact_for_parallel_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1000, generator=g)  # 10^6 terms: a float32 dot product can exceed 1
    assert 1 - 1e-12 < compare_task_vector(x, x)["cosine"] <= 1.0
    assert compare_task_vector(3 * x, x)["cosine"] <= 1.0 and compare_task_vector(-x, x)["cosine"] == pytest.approx(-1.0)
    zero = compare_task_vector(torch.zeros(3), torch.zeros(3))
    assert zero["changed"] is False and zero["max_abs_diff"] == 0.0
