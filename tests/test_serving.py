"""Serving many adapters: a mixed batch (LoRA runs + compiled prefix + base) in one forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import serve
from compile import compile_prefix
from feta import runs
from feta.adapters import load_adapter
from feta.data import DataSpec, read_splits
from feta.models import load_base_model
from feta.scoring import class_log_probs
from feta.serving import BASE, AdapterServer
from tests.conftest import compose_cfg, tiny_train_cfg
from train import train


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Two LoRA runs on different modules and ranks, and a prefix compiled into LoRA (c_proj, r=4)."""
    root = tmp_path_factory.mktemp("serve")
    for name, overrides in [("lora", ("adapter=lora", "adapter.lr=0.05")),
                            ("lora_proj", ("adapter=lora", "adapter.r=2", "adapter.targets=[c_fc]", "adapter.lr=0.05")),
                            ("prefix", ("adapter.init=random", "adapter.m=8", "adapter.lr=0.05"))]:
        cfg = tiny_train_cfg(root, *overrides)
        with open_dict(cfg):
            cfg.output_dir = str(root / name)
        train(cfg)
    compile_prefix(compose_cfg("compile", [f"ckpt={root / 'prefix'}", "rank=4", "~logger", "calib_size=64", "eval_size=32"]))
    return root


def _adapters(root: Path) -> dict[str, Path]:
    return {"lora": root / "lora", "lora_proj": root / "lora_proj", "compiled": root / "prefix" / "compiled-r4"}


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(runs_dir):
    adapters = _adapters(runs_dir)
    server = AdapterServer.from_runs(adapters)
    assert server.adapters == list(adapters)
    sentences = [ex["sentence"] for ex in read_splits(DataSpec(), ["sentence"])["validation"][:16]]
    names = [(list(adapters) + [BASE])[i % 4] for i in range(16)]
    mixed = server.classify(sentences, names)
    enc = server.encode(sentences)

    base_spec = runs.run_specs(runs.load_run_config(runs_dir / "lora"))[0]
    with torch.no_grad():
        base, _ = load_base_model(base_spec)
        base_logits = class_log_probs(base, enc["input_ids"], enc["attention_mask"], server.task.verbalizer_ids)
        for name in [*adapters, BASE]:
            rows = [i for i, n in enumerate(names) if n == name]
            if name == BASE:
                alone = base_logits
            else:  # a fresh base model with only this adapter, loaded the plain PEFT way
                fresh, _ = load_base_model(base_spec)
                model = load_adapter(fresh, adapters[name] / runs.ADAPTER).eval()
                alone = class_log_probs(model, enc["input_ids"], enc["attention_mask"], server.task.verbalizer_ids)
                # the adapter matters on these rows, far beyond the tolerance below
                assert (alone[rows] - base_logits[rows]).abs().max() > 1e-3, name
            torch.testing.assert_close(mixed[rows], alone[rows], rtol=1e-5, atol=1e-5, msg=name)

    # The one-adapter-at-a-time baseline (each group padded on its own) agrees too.
    torch.testing.assert_close(server.classify_sequential(sentences, names), mixed, rtol=1e-5, atol=1e-5)


def test_prefix_run_is_refused_with_the_compile_command(runs_dir):
    with pytest.raises(ValueError, match=r"is a prefix \(token adaptation\).*python compile.py ckpt=.*compiled-r4"):
        AdapterServer.from_runs({"p": runs_dir / "prefix"})


def test_bad_rows_are_named(runs_dir):
    server = AdapterServer.from_runs({"lora": runs_dir / "lora"})
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; use one of __base__, lora"):
        server.classify(["fine"], ["nope"])
    with pytest.raises(ValueError, match="2 rows but 1 adapter names"):
        server.classify(["a", "b"], ["lora"])


def test_serve_command(runs_dir, capsys):
    adapters = _adapters(runs_dir)
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in adapters.items()] + ["val=12", "batch_size=8"])
    out = serve.serve(cfg)
    assert [r["adapter"] for r in out] == (list(adapters) + [BASE]) * 3
    assert all(r["class"] in ("0", "1") and len(r["scores"]) == 2 for r in out)
    err = capsys.readouterr().err
    assert all(f"# {n}: accuracy" in err for n in [*adapters, BASE])
