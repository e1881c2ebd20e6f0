"""One adapter trained on a task mixture (data=mix): batches of one task each, mixed by a stated rule, every
task validated on its own split, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import evaluate
import serve
from compile import compile_prefix
from feta import runs
from feta.adapters import load_adapter
from feta.data import MixSpec, TaskDataModule, encode_prompts
from feta.data.mix import MixtureBatches
from feta.errors import UserError
from feta.models import load_base_model
from feta.report.multitask import MULTITASK, write_multitask
from feta.scoring import class_log_probs
from feta.sweep import SweepSummary
from tests.conftest import compose_cfg, tiny_train_cfg, train_tiny
from tests.helpers.callbacks import recorded_batches
from train import train

MIX = ("data=mix", "data.tasks=[sst2,snli,e2e]", "data.train_limit=32", "data.val_limit=8", "adapter=lora",
       "adapter.lr=0.05")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    train_tiny(root, "run", *MIX, "trainer.max_steps=6", "+callbacks.record._target_=tests.helpers.callbacks.RecordBatches",
           f"+callbacks.record.path={root / 'batches.jsonl'}")
    return root


def test_metrics_hold_each_tasks_score_and_their_mean(mixed_run):
    metrics = json.loads((mixed_run / "run" / runs.METRICS).read_text())
    assert metrics["task"] == "mixture" and metrics["main_metric"] == "val_task_mean"
    assert metrics["tasks"] == ["sst2", "snli", "e2e"] and metrics["val_sizes"] == {"sst2": 8, "snli": 8, "e2e": 8}
    main = [metrics["val_sst2_acc"], metrics["val_snli_acc"], metrics["val_e2e_token_acc"]]
    assert metrics["val_task_mean"] == pytest.approx(sum(main) / 3, abs=1e-6)
    assert all(f"val_{t}_loss" in metrics for t in metrics["tasks"]) and "val_sst2_macro_f1" in metrics


def test_each_task_is_validated_as_that_task_alone(mixed_run):
    """The run's SST-2 and SNLI accuracies equal the adapter's accuracy on each task's subset, scored with
    that task's own template and class words (3 for SNLI): no task is read with another's."""
    cfg = runs.load_run_config(mixed_run / "run")
    spec = runs.run_specs(cfg)[1]
    assert isinstance(spec, MixSpec)
    metrics = json.loads((mixed_run / "run" / runs.METRICS).read_text())
    model_spec = runs.run_specs(cfg)[0]
    base, tok = load_base_model(model_spec)
    model = load_adapter(base, mixed_run / "run" / runs.ADAPTER).eval()
    for name in ("sst2", "snli"):
        dm = TaskDataModule(spec.specs[name], tok)
        dm.setup()
        rows = dm.splits["validation"]
        enc = encode_prompts(tok, dm.task.prompts(rows), dm.task.spec.max_length)
        with torch.no_grad():
            scores = class_log_probs(model, enc["input_ids"], enc["attention_mask"], dm.task.verbalizer_ids)
        assert scores.shape == (8, 3 if name == "snli" else 2)
        acc = (scores.argmax(1) == torch.tensor([dm.task.label(ex) for ex in rows])).float().mean().item()
        assert metrics[f"val_{name}_acc"] == pytest.approx(acc, abs=1e-6), name


def test_every_batch_holds_one_tasks_template(mixed_run):
    """Each training batch is of one task: its rows all carry that task's template (SNLI's 'Premise:', E2E's
    meaning representation, SST-2's 'Review:')."""
    tok = load_base_model(runs.run_specs(runs.load_run_config(mixed_run / "run"))[0])[1]
    batches = recorded_batches(mixed_run / "batches.jsonl")
    assert len(batches) == 6
    seen = Counter()
    for ids in batches.values():
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        kinds = {("snli" if "Premise:" in t else "e2e" if "name[" in t else "sst2" if "Review:" in t else "?")
                 for t in texts}
        assert len(kinds) == 1 and "?" not in kinds, kinds
        seen.update(kinds)
    assert len(seen) >= 2  # the tasks take turns


def test_proportional_mixing_visits_every_example_once_an_epoch():
    sizes, bs = [10, 25, 7], 4
    sampler = MixtureBatches(sizes, bs, None, seed=3)
    batches = sampler.order()
    assert sorted(i for b in batches for i in b) == list(range(42))
    bounds = [0, 10, 35, 42]
    assert all(any(bounds[t] <= min(b) and max(b) < bounds[t + 1] for t in range(3)) for b in batches)
    assert len(batches) == len(sampler) == 3 + 7 + 2
    sampler.set_epoch(1)
    assert sampler.order() != batches  # a new order each epoch, the same on every machine
    assert MixtureBatches(sizes, bs, None, seed=3).order() == batches


def test_equal_mixing_draws_tasks_alike_whatever_their_size():
    sizes = [1000, 40]
    batches = MixtureBatches(sizes, 4, [1.0, 1.0], seed=0).order()
    small = sum(1 for b in batches if min(b) >= 1000)
    assert len(batches) == 250 + 10 and abs(small / len(batches) - 0.5) < 0.08  # proportional would give 0.04
    tempered = MixtureBatches(sizes, 4, [n ** 0.5 for n in sizes], seed=0).order()  # T=2
    share = sum(1 for b in tempered if min(b) >= 1000) / len(tempered)
    assert 0.10 < share < 0.26  # sqrt(40) / (sqrt(1000) + sqrt(40)) = 0.17


def test_sampler_resumes_mid_epoch():
    sampler = MixtureBatches([9, 14], 3, None, seed=1)
    full = list(sampler)
    again = MixtureBatches([9, 14], 3, None, seed=1)
    it = iter(again)
    head = [next(it) for _ in range(3)]
    state = again.state_dict()
    resumed = MixtureBatches([9, 14], 3, None, seed=1)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


def test_killed_mixture_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    train_tiny(tmp_path, "whole", *MIX, "trainer.max_steps=8", "checkpoint_every_n_steps=3")
    crash = ["+callbacks.crash._target_=tests.helpers.callbacks.CrashAt", "+callbacks.crash.step=4"]
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        train_tiny(tmp_path, "cut", *MIX, "trainer.max_steps=8", "checkpoint_every_n_steps=3", *crash)
    train_tiny(tmp_path, "cut", *MIX, "trainer.max_steps=8", "checkpoint_every_n_steps=3")
    a = load_file(tmp_path / "whole" / runs.ADAPTER / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / runs.ADAPTER / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["data.tasks=[sst2]"], r"data.tasks: names 1 task\(s\); list two or more"),
    (["data.tasks=[sst2,nope]"], r"data.tasks=nope: no config .*nope.yaml; use one of agnews, csv, e2e, mix, snli, sst2"),
    (["data.tasks=[sst2,sst2]"], r"data.tasks: holds the task sst2 twice"),
    (["data.mixing=uniform"], r"data.mixing: unknown choice 'uniform'; use one of proportional, equal"),
    (["data.mixing_temperature=0"], r"data.mixing_temperature"),
    (["trainer=ddp", "trainer.accelerator=cpu"], r"trainer.strategy: data=mix trains in one process"),
])
def test_bad_mixtures_are_refused(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(tiny_train_cfg(tmp_path, "data=mix", *overrides))
    assert not (tmp_path / "run").exists()


def test_a_mixture_of_a_users_yaml_task(tmp_path):
    """A task of one's own joins by the path of its data YAML."""
    (tmp_path / "mine.yaml").write_text(
        "defaults: [data_schema, _self_]\nname: mine\ntask: classification\nsource: local\n"
        f"train_file: {tmp_path / 'rows.csv'}\nvalidation_file: {tmp_path / 'rows.csv'}\n"
        "prompt: 'Item: {text}\\nGood:'\nclasses: [n, y]\nverbalizers: [' no', ' yes']\n")
    (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"item {i},{'ny'[i % 2]}\n" for i in range(20)))
    spec = compose_cfg("train", ["data=mix", f"data.tasks=[sst2,{tmp_path / 'mine.yaml'}]"]).data
    mix = MixSpec(tasks=list(spec.tasks))
    assert list(mix.specs) == ["sst2", "mine"] and mix.specs["mine"].classes == ["n", "y"]


def test_serve_refuses_a_mixture_run(mixed_run):
    with pytest.raises(UserError, match=r"adapters.m=.*: comes from a task mixture \(sst2, snli, e2e\); serve.py "
                                        r"reads single-task runs"):
        serve.serve(compose_cfg("serve", [f"+adapters.m={mixed_run / 'run'}", "val_limit=2"]))


def test_evaluate_scores_a_mixture_run_on_each_task(mixed_run):
    """eval.json holds each task's own evaluation, equal to training's validation on the same subsets."""
    ev = evaluate.evaluate(compose_cfg("evaluate", [f"ckpt={mixed_run / 'run'}", "~logger", "latency.enabled=false"]))
    ev = next(iter(ev["runs"].values()))
    metrics = json.loads((mixed_run / "run" / runs.METRICS).read_text())
    assert ev["task"] == "mixture" and ev["main_metric"] == "task_mean" and list(ev["tasks"]) == ["sst2", "snli", "e2e"]
    for name in ("sst2", "snli"):
        task = ev["tasks"][name]
        assert task["main_metric"] == "val_acc" and task["val_size"] == 8
        assert task["val_acc"] == pytest.approx(metrics[f"val_{name}_acc"], abs=1e-6), name
    e2e = ev["tasks"]["e2e"]
    assert e2e["main_metric"] == "bleu" and (mixed_run / "run" / e2e["outputs"]).is_file()
    means = [ev["tasks"]["sst2"]["val_acc"], ev["tasks"]["snli"]["val_acc"], e2e["bleu"] / 100]
    assert ev["task_mean"] == pytest.approx(sum(means) / 3)


def test_a_shared_prefix_compiles_on_the_mixture(tmp_path):
    """Calibration takes each task's share (proportional: equal sizes, equal shares), each encoded by its own
    task; the compiled LoRA follows the shared prefix better than the base model does."""
    train_tiny(tmp_path, "p", *MIX[:4], "model=llama_tiny", "adapter.init=random", "adapter.m=4", "adapter.lr=0.05",
           "trainer.max_steps=6")
    compile_prefix(compose_cfg("compile", [f"ckpt={tmp_path / 'p'}", "~logger", "calib_size=48", "eval_size=12"]))
    record = json.loads((tmp_path / "p" / "compiled-r64" / runs.COMPILE).read_text())
    assert record["task"] == "mixture" and record["source"]["data"] == "mix"
    assert record["calibration"]["tasks"] == {"sst2": 16, "snli": 16, "e2e": 16}
    assert record["calibration"]["examples"] == 48 and record["eval_examples"] == 12
    # classification rows are scored at one token, E2E rows at every reference token
    assert record["calibration"]["scored_tokens"] > 48
    agree = record["next_token"]
    assert agree["next_token_agreement"] > agree["base_next_token_agreement"] + 0.2
    ev = evaluate.evaluate(compose_cfg("evaluate", [f"ckpt={tmp_path / 'p' / 'compiled-r64'}", "~logger",
                                                    "latency.enabled=false"]))
    tasks = next(iter(ev["runs"].values()))["tasks"]  # the compiled shared prefix, against it on every task
    assert 0 <= tasks["snli"]["class_agreement"] <= 1 and 0 <= tasks["e2e"]["identical_outputs"] <= 1
    with pytest.raises(UserError, match=r"calib_decode=greedy: applies to a single generation task or a prompt file"):
        compile_prefix(compose_cfg("compile", [f"ckpt={tmp_path / 'p'}", "~logger", "calib_decode=greedy",
                                               "out_dir=" + str(tmp_path / "g")]))


def test_multitask_table_puts_each_tasks_score_per_configuration(mixed_run, tmp_path):
    """The shared LoRA's row holds its per-task scores; the per-task row holds each single-task run's score,
    its trainable parameters summed over the tasks."""
    single = {t: train_tiny(tmp_path, t, f"data={t}", "data.train_limit=16", "data.val_limit=8", "adapter=lora",
                        "trainer.max_steps=2") for t in ("sst2", "snli")}
    shared = json.loads((mixed_run / "run" / runs.METRICS).read_text())
    table = write_multitask([mixed_run / "run", tmp_path / "sst2", tmp_path / "snli"], tmp_path / "multitask.md")
    rows = {r["configuration"]: r for r in table.to_dict("records")}
    name = shared["name"]
    assert set(rows) == {f"{name}, shared", f"{name}, per task"}
    assert rows[f"{name}, shared"]["snli"] == pytest.approx(100 * shared["val_snli_acc"])
    assert rows[f"{name}, shared"]["e2e"] == pytest.approx(100 * shared["val_e2e_token_acc"])
    per_task = rows[f"{name}, per task"]
    assert per_task["sst2"] == pytest.approx(100 * single["sst2"]["val_acc"]) and pd.isna(per_task["e2e"])
    assert per_task["trainable params"] == single["sst2"]["trainable_params"] + single["snli"]["trainable_params"]
    assert rows[f"{name}, shared"]["mean"] == pytest.approx(100 * shared["val_task_mean"], abs=1e-4)
    text = (tmp_path / "multitask.md").read_text()
    assert f"| {name}, shared" in text and f"{100 * shared['val_snli_acc']:.1f}" in text
    per_task_line = next(line for line in text.splitlines() if line.startswith(f"| {name}, per task"))
    assert "nan" not in text and per_task_line.count("—") == 2  # no E2E run per task: its score and the mean


def test_a_sweep_with_a_mixture_ends_with_the_multitask_table(mixed_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copytree(mixed_run / "run", sweep / "0")
    prefix = train_tiny(tmp_path, "p", "data.train_limit=16", "data.val_limit=8", "adapter.init=random", "adapter.m=4",
                    "trainer.max_steps=2")
    shutil.copytree(tmp_path / "p", sweep / "1")
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out
    assert (sweep / "multitask.md").is_file() and "shared" in out and "per task" in out
    assert f"next: python compile.py ckpt={sweep / '1'}" in out  # the single-task prefix, not the mixture
    assert prefix["data"] == "sst2"
    (sweep / MULTITASK).unlink()
    done = evaluate.evaluate(compose_cfg("evaluate", [f"ckpt={sweep}", "~logger", "latency.enabled=false"]))
    assert done["report"] == {"md": str(sweep / MULTITASK)} and not (sweep / "report").exists()
    assert (sweep / MULTITASK).is_file() and len(done["runs"]) == 2 and not done["skipped"]


@pytest.mark.parametrize("adapter", ["prefix", "prompt", "ia3", "gated_prefix", "ptuning_v2", "lora"])
def test_every_adapter_kind_trains_on_a_mixture(tmp_path, adapter):
    metrics = train_tiny(tmp_path, "run", "data=mix", "data.tasks=[sst2,snli]", "data.train_limit=16", "data.val_limit=4",
                     f"adapter={adapter}", "trainer.max_steps=2")
    assert metrics["adapter"] == ("prefix" if adapter == "ptuning_v2" else adapter) and metrics["global_step"] == 2
    assert 0 <= metrics["val_snli_acc"] <= 1 and metrics["val_sizes"] == {"sst2": 4, "snli": 4}
    assert (tmp_path / "run" / runs.ADAPTER / "adapter_config.json").is_file()
