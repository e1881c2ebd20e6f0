"""Adapters of different tasks served together: a 3-class CSV task (one class word of two tokens), SNLI pairs
and E2E generation, rows interleaved in one call; every row as its adapter alone. (Compiled prefixes in a
mixed batch: tests/test_serving.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import serve
from feta import runs
from feta.data import encode_prompts, read_splits
from feta.decoding import decode_texts
from feta.errors import UserError
from feta.scoring import class_log_probs
from feta.serving import BASE, AdapterServer, Request, adapter_tasks, read_requests, resolve_adapters
from tests.conftest import compose_cfg, train_tiny
from tests.helpers.data import mood_csv


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_tasks")
    mood = ["data=csv", "data.name=mood", f"data.train_file={mood_csv(root / 'train.csv', 96)}",
            f"data.validation_file={mood_csv(root / 'val.csv', 12, offset=1)}", "data.prompt='Review: {text}\nMood:'",
            "data.classes=[neg,neu,pos]", "data.verbalizers=[' negative',' neutral',' very positive']",
            "data.val_limit=null", "data.train_limit=null"]
    e2e = ["data=e2e", "data.train_limit=64", "data.val_limit=6", "data.max_new_tokens=6", "data.batch_size=8"]
    fast = ("adapter.lr=0.05", "trainer.max_steps=6")
    train_tiny(root, "mood", *mood, "adapter=lora", *fast)
    train_tiny(root, "nli", "data=snli", "data.train_limit=64", "data.val_limit=8", "adapter=lora", "adapter.r=2",
               "adapter.targets=[c_fc]", *fast)
    train_tiny(root, "gen", *e2e, "adapter=lora", *fast)
    return {name: root / name for name in ("mood", "nli", "gen")}


def _rows(server: AdapterServer) -> list[Request]:
    """Each task's validation inputs, the three adapters and the base model taking turns."""
    per = {}
    for name, adapter in (("mood", "mood"), ("snli", "nli"), ("e2e", "gen")):
        task = server.tasks[name]
        rows = read_splits(task.spec, task.columns, task.allowed)["validation"]
        rows = task.unique_inputs(rows) if name == "e2e" else rows
        per[adapter] = [server.request(adapter, {c: ex[c] for c in task.spec.prompt_fields}) for ex in rows[:6]]
    base = [server.request(BASE, r.example, task="snli") for r in per["nli"][:3]]
    return [per[a][i] for i in range(6) for a in ("mood", "nli", "gen")] + base


def test_rows_of_three_tasks_in_one_call_equal_each_adapter_alone(three_tasks):
    server = AdapterServer.from_runs(three_tasks)
    assert sorted(server.tasks) == ["e2e", "mood", "snli"]
    requests = _rows(server)
    mixed = server.serve(requests, batch_size=8)  # batches hold rows of all three tasks
    assert [r["adapter"] for r in mixed] == [r.adapter for r in requests]
    # One adapter and task at a time (each group in its own batches) gives the same classes and outputs.
    sequential = server.serve_sequential(requests, batch_size=8)
    assert [(r.get("class"), r.get("output")) for r in sequential] == [(r.get("class"), r.get("output")) for r in mixed]
    moved = 0
    for adapter in ["mood", "nli", "gen", BASE]:
        idx = [i for i, r in enumerate(requests) if r.adapter == adapter]
        # alone: a fresh base model with only this adapter, loaded the plain PEFT way, read with its task
        run = runs.resolve_run(three_tasks["nli" if adapter == BASE else adapter])
        model, tok = runs.adapted_model(run)
        task = server.tasks[requests[idx[0]].task]
        prompts = [task.prompt(requests[i].example) for i in idx]
        if task.spec.task.value == "generation":
            alone = decode_texts(model, tok, prompts, task.spec.max_new_tokens, len(prompts), task.spec.max_length)
            with model.disable_adapter():
                base_out = decode_texts(model, tok, prompts, task.spec.max_new_tokens, len(prompts), task.spec.max_length)
            moved += sum(a != b for a, b in zip(alone, base_out))
            assert [mixed[i]["output"] for i in idx] == alone, adapter  # token-identical continuations
            assert all(mixed[i]["task"] == "e2e" and "class" not in mixed[i] for i in idx)
            continue
        enc = encode_prompts(tok, prompts, task.spec.max_length)
        with torch.no_grad():
            with model.disable_adapter():
                base_scores = class_log_probs(model, enc["input_ids"], enc["attention_mask"], task.verbalizer_ids)
            alone = base_scores if adapter == BASE else class_log_probs(model, enc["input_ids"], enc["attention_mask"],
                                                                        task.verbalizer_ids)
        assert alone.shape[1] == 3  # both classification tasks have three classes
        if adapter != BASE:  # the adapter matters on these rows, far beyond the tolerance below
            assert (alone - base_scores).abs().max() > 1e-3, adapter
        scores = torch.tensor([mixed[i]["scores"] for i in idx])
        torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-4, msg=adapter)
        assert [mixed[i]["class"] for i in idx] == [task.classes[k] for k in alone.argmax(1).tolist()], adapter
    assert moved > 0  # the E2E adapter changes outputs, so routing is what is checked


def test_serve_command_scores_each_adapter_on_its_own_task(three_tasks, capsys):
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in three_tasks.items()] + ["val_limit=4", "batch_size=8"])
    out = serve.serve(cfg)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == out
    # 4 rows of each adapter's task, and the base model on all three tasks, taking turns
    rotation = [("mood", "mood"), ("nli", "snli"), ("gen", "e2e"), (BASE, "mood"), (BASE, "snli"), (BASE, "e2e")]
    assert [(r["adapter"], r["task"]) for r in out] == rotation * 4
    assert {tuple(r["input"]) for r in out if r["task"] == "snli"} == {("premise", "hypothesis")}
    assert all(len(r["scores"]) == 3 for r in out if r["task"] != "e2e")
    assert all(isinstance(r["output"], str) for r in out if r["task"] == "e2e")
    # each adapter reads the same rows of its task as the base model does
    for task in ("mood", "snli", "e2e"):
        inputs = [[r["input"] for r in out if r["task"] == task and (r["adapter"] == BASE) == base] for base in (0, 1)]
        assert inputs[0] == inputs[1] and len(inputs[0]) == 4


def test_serve_command_prints_a_score_per_adapter_and_task(three_tasks, capsys):
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in three_tasks.items()] + ["val_limit=2"])
    serve.serve(cfg)
    err = capsys.readouterr().err
    for adapter, task, what in [("mood", "mood", "accuracy"), ("nli", "snli", "accuracy"), ("gen", "e2e", "BLEU"),
                                (BASE, "snli", "accuracy"), (BASE, "e2e", "BLEU")]:
        assert f"# {adapter} on {task}: {what} " in err and " on 2 inputs" in err, (adapter, task)


def test_jsonl_rows_are_read_per_task(three_tasks, tmp_path):
    specs = adapter_tasks(resolve_adapters(three_tasks))
    path = tmp_path / "rows.jsonl"
    path.write_text('{"adapter": "nli", "premise": "A dog runs.", "hypothesis": "An animal moves."}\n\n'
                    '{"adapter": "__base__", "task": "mood", "text": "a dull film"}\n'
                    '{"adapter": "gen", "mr": "name[The Eagle], food[French]"}\n')
    assert read_requests(str(path), specs) == [
        Request("nli", "snli", {"premise": "A dog runs.", "hypothesis": "An animal moves."}),
        Request(BASE, "mood", {"text": "a dull film"}), Request("gen", "e2e", {"mr": "name[The Eagle], food[French]"})]


@pytest.mark.parametrize("rows, message", [
    ('{"adapter": "nope", "text": "x"}', r"input=.*rows.jsonl:1: names unknown adapter 'nope'; use one of __base__, "
                                          r"mood, nli, gen"),
    ('{"adapter": "nli", "premise": "A dog runs."}', r":1: lacks column 'hypothesis' \(a string\) that the snli "
                                                       r"template needs; give every row of nli the columns premise, hypothesis"),
    ('{"adapter": "__base__", "text": "x"}', r"a __base__ row needs its task among several \(mood, snli, e2e\)"),
    ('{"adapter": "mood", "task": "snli", "text": "x"}', r"names task 'snli', but adapter mood serves mood"),
    ('{"adapter": "mood", "text": "x"}\n{"adapter": "mood", "text": 3}', r"rows.jsonl:2: lacks column 'text'"),
    ('{"adapter": "mood", "text": "x"}\n{"adapter": "mood"', r"rows.jsonl:2: is not JSON"),
    ('{"text": "x"}', r'rows.jsonl:1: has no "adapter"'),
    ("nli\tA dog runs.", r"rows.jsonl:1: the snli template needs columns \['premise', 'hypothesis'\]; give such "
                          r"rows as JSON Lines"),
])
def test_bad_rows_are_refused_before_the_model_loads(three_tasks, tmp_path, monkeypatch, rows, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(rows + "\n")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr("feta.serving.load_base_model", no_load)
    cfg = compose_cfg("serve", [f"+adapters.{n}={p}" for n, p in three_tasks.items()] + [f"input={path}"])
    with pytest.raises(UserError, match=message):
        serve.serve(cfg)


def test_adapters_of_another_base_model_are_refused(three_tasks, tmp_path):
    train_tiny(tmp_path, "llama", "model=llama_tiny", "adapter=lora", "trainer.max_steps=1", "data.train_limit=16",
                   "data.val_limit=4")
    with pytest.raises(UserError, match=r"adapters.other: is trained on another base model than mood "
                                        r"\(llama_tiny vs gpt2_tiny\); serve adapters of one base model together"):
        resolve_adapters({"mood": three_tasks["mood"], "other": tmp_path / "llama"})


def test_two_adapters_naming_one_task_must_read_it_alike(three_tasks, tmp_path):
    train_tiny(tmp_path, "sst2", "adapter=lora", "trainer.max_steps=1", "data.train_limit=16", "data.val_limit=4")
    train_tiny(tmp_path, "sst2b", "adapter=lora", "trainer.max_steps=1", "data.train_limit=16", "data.val_limit=4",
                   "data.prompt='Text: {sentence}\nSentiment:'")
    with pytest.raises(UserError, match=r"adapters.b: names the task sst2 as a does, with another data.prompt"):
        adapter_tasks(resolve_adapters({"a": tmp_path / "sst2", "b": tmp_path / "sst2b"}))
