"""Serving many adapters of one task: a mixed batch (LoRA runs + compiled prefix + base) in one forward pass;
a generation task's rows decoded together, each through its own adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import serve
from compile import compile_prefix
from feta import runs
from feta.adapters import load_adapter
from feta.data import DataSpec, encode_prompts, read_splits
from feta.decoding import decode_texts
from feta.models import load_base_model
from feta.scoring import class_log_probs
from feta.serving import BASE, AdapterServer, Request
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
    mixed = server.serve([server.request(n, {"sentence": s}) for n, s in zip(names, sentences)])
    assert [r["adapter"] for r in mixed] == names and {r["task"] for r in mixed} == {"sst2"}
    scores = torch.tensor([r["scores"] for r in mixed])
    task = server.tasks["sst2"]
    enc = encode_prompts(server.tokenizer, [task.prompt({"sentence": s}) for s in sentences], task.spec.max_length)

    base_spec = runs.run_specs(runs.load_run_config(runs_dir / "lora"))[0]
    with torch.no_grad():
        base, _ = load_base_model(base_spec)
        base_logits = class_log_probs(base, enc["input_ids"], enc["attention_mask"], task.verbalizer_ids)
        for name in [*adapters, BASE]:
            rows = [i for i, n in enumerate(names) if n == name]
            if name == BASE:
                alone = base_logits
            else:  # a fresh base model with only this adapter, loaded the plain PEFT way
                fresh, _ = load_base_model(base_spec)
                model = load_adapter(fresh, adapters[name] / runs.ADAPTER).eval()
                alone = class_log_probs(model, enc["input_ids"], enc["attention_mask"], task.verbalizer_ids)
                # the adapter matters on these rows, far beyond the tolerance below
                assert (alone[rows] - base_logits[rows]).abs().max() > 1e-3, name
            torch.testing.assert_close(scores[rows], alone[rows], rtol=1e-5, atol=1e-5, msg=name)

    # The one-adapter-at-a-time baseline (each group padded on its own) agrees too.
    sequential = server.serve_sequential([server.request(n, {"sentence": s}) for n, s in zip(names, sentences)])
    torch.testing.assert_close(torch.tensor([r["scores"] for r in sequential]), scores, rtol=1e-5, atol=1e-5)


def test_prefix_run_is_refused_with_the_compile_command(runs_dir):
    with pytest.raises(ValueError, match=r"is a prefix \(token adaptation\).*python compile.py ckpt=.*compiled-r<rank>"):
        AdapterServer.from_runs({"p": runs_dir / "prefix"})


def test_bad_rows_are_named(runs_dir):
    server = AdapterServer.from_runs({"lora": runs_dir / "lora"})
    with pytest.raises(ValueError, match=r"names unknown adapter 'nope'; use one of __base__, lora"):
        server.request("nope", {"sentence": "fine"})
    with pytest.raises(ValueError, match=r"lacks column 'sentence'"):
        server.serve([Request("lora", "sst2", {"text": "fine"})])


def test_serve_command(runs_dir, capsys):
    adapters = _adapters(runs_dir)
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in adapters.items()] + ["val_limit=3", "batch_size=8"])
    out = serve.serve(cfg)
    assert [r["adapter"] for r in out] == (list(adapters) + [BASE]) * 3  # 3 inputs each, taking turns
    assert all(r["class"] in ("0", "1") and len(r["scores"]) == 2 for r in out)
    err = capsys.readouterr().err
    assert all(f"# {n} on sst2: accuracy" in err for n in [*adapters, BASE])


def test_tsv_rows_serve_a_one_column_template(runs_dir, tmp_path, capsys):
    path = tmp_path / "rows.tsv"
    path.write_text("lora\ta gem of a film\n__base__\ta mess\n")
    cfg = compose_cfg("serve", [f"+adapters.lora={runs_dir / 'lora'}", f"input={path}"])
    out = serve.serve(cfg)
    assert [(r["adapter"], r["input"]) for r in out] == [("lora", {"sentence": "a gem of a film"}),
                                                        (BASE, {"sentence": "a mess"})]


# ------------------------------------------------------------------ a generation task: rows decode together


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    """Two LoRA runs on E2E (gpt2_tiny, different modules and ranks), trained to move off the base model."""
    root = tmp_path_factory.mktemp("serve_e2e")
    data = ("data=e2e", "data.train_limit=64", "data.val_limit=8", "data.max_new_tokens=6", "data.batch_size=8")
    for name, overrides in [("a", ("adapter=lora", "adapter.lr=0.05")),
                            ("b", ("adapter=lora", "adapter.r=2", "adapter.targets=[c_fc]", "adapter.lr=0.05"))]:
        cfg = tiny_train_cfg(root, *data, *overrides, "trainer.max_steps=6")
        with open_dict(cfg):
            cfg.output_dir = str(root / name)
        train(cfg)
    return {"a": root / "a", "b": root / "b"}


def test_generation_rows_of_a_mixed_batch_equal_each_adapter_alone(e2e_runs):
    server = AdapterServer.from_runs(e2e_runs)
    task = server.tasks["e2e"]
    rows = task.unique_inputs(read_splits(task.spec, task.columns, task.allowed)["validation"])[:9]
    names = [["a", "b", BASE][i % 3] for i in range(9)]
    requests = [server.request(n, {"mr": ex["mr"]}) for n, ex in zip(names, rows)]
    mixed = [r["output"] for r in server.serve(requests)]
    assert mixed == [r["output"] for r in server.serve_sequential(requests)]
    spec = task.spec
    prompts = [task.prompt(ex) for ex in rows]
    base_spec = runs.run_specs(runs.load_run_config(e2e_runs["a"]))[0]
    base_out = decode_texts(load_base_model(base_spec)[0].eval(), server.tokenizer, prompts, spec.max_new_tokens, 9,
                            spec.max_length)
    moved = 0
    for name in ["a", "b", BASE]:
        idx = [i for i, n in enumerate(names) if n == name]
        if name == BASE:
            alone = base_out
        else:  # a fresh base model with only this adapter, loaded the plain PEFT way
            model = load_adapter(load_base_model(base_spec)[0], e2e_runs[name] / runs.ADAPTER).eval()
            alone = decode_texts(model, server.tokenizer, prompts, spec.max_new_tokens, 9, spec.max_length)
            moved += sum(alone[i] != base_out[i] for i in idx)
        assert [mixed[i] for i in idx] == [alone[i] for i in idx], name
    assert moved > 0  # the adapters change outputs, so row-to-adapter routing is what is checked


def test_serve_command_generates_and_scores_bleu(e2e_runs, capsys):
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in e2e_runs.items()] + ["val_limit=2", "batch_size=4"])
    out = serve.serve(cfg)
    assert [r["adapter"] for r in out] == ["a", "b", BASE] * 2
    assert all(isinstance(r["output"], str) and r["input"]["mr"].startswith("name[") for r in out)
    err = capsys.readouterr().err
    assert all(f"# {n} on e2e: BLEU" in err for n in ["a", "b", BASE])
