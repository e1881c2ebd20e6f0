"""The task layer: shipped data, user files, K-class and pair classification, generation batches."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch
import torch.nn.functional as F

from feta.data import IGNORE, DataSpec, TaskDataModule, make_task, read_file, read_splits
from feta.data.files import ASSETS
from feta.errors import UserError
from feta.models import load_base_model
from feta.schema import to_spec
from feta.scoring import class_log_probs, scored_logits
from feta.training import GeneratorModule
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny():
    return load_base_model(to_spec(compose_cfg("train", ["model=gpt2_tiny"]), "model"))


def _spec(*overrides: str) -> DataSpec:
    return to_spec(compose_cfg("train", list(overrides)), "data")


# ------------------------------------------------------------------ shipped data


def test_shipped_sst2_is_the_glue_split():
    spec = _spec()
    data = read_splits(spec, ["sentence", "label"])
    assert len(data["train"]) == 67_349 and len(data["validation"]) == 872
    assert sum(ex["label"] == "1" for ex in data["validation"]) == 444  # 428 negative, 444 positive


def test_shipped_agnews_has_four_balanced_classes():
    spec = _spec("data=agnews")
    data = read_splits(spec, ["text", "label"], {"label": list(spec.classes)})
    assert len(data["train"]) == 10_001 and len(data["validation"]) == 7_600
    assert {c: sum(ex["label"] == c for ex in data["validation"]) for c in spec.classes} == {c: 1900 for c in spec.classes}


def test_shipped_snli_is_the_corpus_dev_and_test_splits():
    spec = _spec("data=snli")
    data = read_splits(spec, ["premise", "hypothesis", "label"], {"label": list(spec.classes)})
    assert len(data["train"]) == 9_842 and len(data["validation"]) == 9_824
    counts = {c: sum(ex["label"] == c for ex in data["validation"]) for c in spec.classes}
    assert counts == {"entailment": 3_368, "neutral": 3_219, "contradiction": 3_237}
    folder = ASSETS / "snli"
    sums = dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():  # the shipped copies are the files the README describes, unchanged
        assert hashlib.sha256(gzip.open(folder / f"{name}.gz").read()).hexdigest() == digest


def test_shipped_e2e_groups_references_by_input(tiny):
    _, tok = tiny
    dm = TaskDataModule(_spec("data=e2e"), tok)
    dm.setup()
    assert len(dm.splits["train"]) == 4_672
    assert len(dm.splits["validation"]) == len(dm.references) == 630  # distinct test MRs
    assert sum(len(r) for r in dm.references) == 4_693 and min(len(r) for r in dm.references) >= 1


def test_agnews_validation_limit_is_a_seeded_sample(tiny):
    _, tok = tiny
    a, b = (TaskDataModule(_spec("data=agnews", "data.val_limit=50"), tok) for _ in range(2))
    first = TaskDataModule(_spec("data=agnews", "data.val_limit=50", "data.val_seed=null"), tok)
    for dm in (a, b, first):
        dm.setup()
    assert a.splits["validation"] == b.splits["validation"] != first.splits["validation"]
    assert len({ex["label"] for ex in a.splits["validation"]}) == 4  # a sample, not the file's first rows


# ------------------------------------------------------------------ classification: K classes, pairs, verbalizers


def test_multi_token_verbalizer_is_the_sum_of_its_token_log_probs(tiny):
    model, tok = tiny
    spec = DataSpec(prompt="{text} is", classes=["a", "b", "c"], verbalizers=[" good", " not good at all", " bad"])
    task = make_task(spec, tok)
    assert [len(v) for v in task.verbalizer_ids] == [1, 4, 1]
    batch = task.encode([{"text": "the film", "label": "a"}, {"text": "a long and winding review", "label": "b"}])
    with torch.no_grad():
        got = class_log_probs(model, batch["input_ids"], batch["attention_mask"], task.verbalizer_ids)
        for i in range(2):  # by hand: one full forward per (prompt, verbalizer), summing log p(token | prefix)
            prompt = batch["input_ids"][i, : int(batch["attention_mask"][i].sum())].tolist()
            for k, v in enumerate(task.verbalizer_ids):
                ids = torch.tensor([prompt + v])
                logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(v))
                assert abs(float(got[i, k]) - want) < 1e-4, (i, k, float(got[i, k]), want)
    assert got.shape == (2, 3)


def test_a_long_input_is_cut_at_its_start_so_the_class_is_read_after_the_template(tiny):
    _, tok = tiny
    spec = DataSpec(prompt="Article: {text}\nTopic:", classes=["a", "b"], verbalizers=[" x", " y"])
    task = make_task(spec, tok)
    end = tok("\nTopic:", add_special_tokens=False)["input_ids"]
    long, short = {"text": "word " * 200, "label": "a"}, {"text": "short", "label": "b"}
    batch = task.encode([long, short], max_length=32)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["input_ids"][0, -len(end):].tolist() == end  # the long row ends with the template's end
    n_short = int(batch["attention_mask"][1].sum())
    assert n_short < 32 and batch["input_ids"][1, n_short - len(end): n_short].tolist() == end
    assert batch["scored"][0, 31] and batch["scored"][1, n_short - 1] and int(batch["scored"].sum()) == 2


def test_a_newline_typed_on_the_command_line_is_a_newline_in_the_template():
    cfg = compose_cfg("train", ["data=e2e", 'data.prompt="Describe it.\\n{mr}\\tText:"'])
    assert cfg.data.prompt == "Describe it.\\n{mr}\\tText:"  # Hydra keeps the two characters
    assert to_spec(cfg, "data").prompt == "Describe it.\n{mr}\tText:"


def test_pair_template_uses_both_columns(tiny, tmp_path):
    _, tok = tiny
    rows = "premise\thypothesis\tlabel\nA dog runs.\tAn animal moves.\tentailment\nIt rains.\tIt is dry.\tcontradiction\n"
    for split in ("train", "validation"):
        (tmp_path / f"{split}.tsv").write_text(rows)
    spec = DataSpec(name="nli", path=str(tmp_path), prompt="{premise}\nQuestion: {hypothesis}?\nAnswer:",
                    classes=["entailment", "contradiction"], verbalizers=[" yes", " no"])
    dm = TaskDataModule(spec, tok)
    dm.setup()
    assert dm.prompts("validation") == ["A dog runs.\nQuestion: An animal moves.?\nAnswer:",
                                        "It rains.\nQuestion: It is dry.?\nAnswer:"]
    batch = dm.collate(dm.splits["train"])
    assert batch["labels"].tolist() == [0, 1] and batch["scored"].sum(1).tolist() == [1, 1]


def test_users_csv_and_jsonl_read_alike(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"a, quoted, text",pos\nplain,neg\n')
    (tmp_path / "d.jsonl").write_text('{"text": "a, quoted, text", "label": "pos"}\n\n{"text": "plain", "label": "neg"}\n')
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write((tmp_path / "d.jsonl").read_text())
    want = [{"text": "a, quoted, text", "label": "pos"}, {"text": "plain", "label": "neg"}]
    for name in ("d.csv", "d.jsonl", "d.jsonl.gz"):
        assert read_file(tmp_path / name, ["text", "label"]) == want, name


# ------------------------------------------------------------------ generation


def test_generation_batch_labels_only_the_target_and_eos(tiny):
    _, tok = tiny
    task = make_task(_spec("data=e2e"), tok)
    ex = {"mr": "name[Aromi], food[Chinese]", "ref": "Aromi serves Chinese food."}
    batch = task.encode([ex, {"mr": "name[X]", "ref": "X."}])
    prompt = tok(task.prompt(ex))["input_ids"]
    target = tok(" " + ex["ref"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = batch["labels"][0]
    assert row[: len(prompt) - 1].eq(IGNORE).all()  # the prompt predicts nothing the loss sees ...
    assert row[len(prompt) - 1: len(prompt) - 1 + len(target)].tolist() == target  # ... its last token predicts the target
    assert batch["scored"][0].sum() == len(target) and batch["input_ids"][0, : len(prompt)].tolist() == prompt


def test_generation_loss_ignores_prompt_tokens(tiny):
    model, tok = tiny
    task = make_task(_spec("data=e2e"), tok)
    batch = task.encode([{"mr": "name[Aromi], food[Chinese], area[riverside]", "ref": "Aromi is a Chinese place."}])
    module = GeneratorModule(model, lr=1e-3)
    with torch.no_grad():
        loss, _ = module.loss(batch)
        changed = {**batch, "labels": batch["labels"].clone()}
        changed["labels"][0, 0] = 123  # a prompt position's label: not scored, so not in the loss
        assert torch.equal(module.loss(changed)[0], loss)
        target = {**batch, "labels": batch["labels"].clone()}
        first = int(batch["scored"][0].nonzero()[0])
        target["labels"][0, first] = (target["labels"][0, first] + 1) % tok.vocab_size
        assert not torch.equal(module.loss(target)[0], loss)  # a target position's label is
        logits = scored_logits(model, batch)
        assert float(loss) == pytest.approx(float(F.cross_entropy(logits, batch["labels"][batch["scored"]])), rel=1e-6)


# ------------------------------------------------------------------ bad input: refused with the file, line and field


def _write(tmp_path, train: str, validation: str = "text\tlabel\nok\ta\n", suffix=".tsv"):
    (tmp_path / f"train{suffix}").write_bytes(train if isinstance(train, bytes) else train.encode())
    (tmp_path / f"validation{suffix}").write_text(validation)
    return DataSpec(name="mine", path=str(tmp_path), prompt="{text}:", classes=["a", "b"], verbalizers=[" x", " y"])


@pytest.mark.parametrize("train,match", [
    ("text\tlabel\ngood\ta\nbad\tc\n", r"train\.tsv:3: label 'c' is not among the configured classes"),
    ("words\tlabel\ngood\ta\n", r"train\.tsv:1: has no column 'text'"),
    ("text\nfine\n", r"train\.tsv:1: has no column 'label'"),
    ("text\tlabel\ngood\ta\n \tb\n", r"train\.tsv:3: 'text' is empty"),
    ("text\tlabel\n", r"train\.tsv: holds no examples"),
    (b"text\tlabel\ngood\ta\n\xff\xfe bad\tb\n", r"train\.tsv:3: is not UTF-8 text"),
])
def test_bad_data_files_are_named(tmp_path, train, match):
    with pytest.raises(UserError, match=match):
        read_splits(spec := _write(tmp_path, train), make_task(spec, load_base_model(
            to_spec(compose_cfg("train", ["model=gpt2_tiny"]), "model"))[1]).columns, {"label": ["a", "b"]})


@pytest.mark.parametrize("overrides,match", [
    (["data.prompt='x {nothing'"], r"data\.prompt: .* is not a template"),
    (["data.prompt=Review:"], r"data\.prompt: 'Review:' names no column"),
    (["data.verbalizers=[' good',' good']"], r"data\.verbalizers: ' good' is given to two classes"),
    (["data.verbalizers=[' good']"], r"data\.verbalizers: 1 words for 2 classes"),
    (["data=e2e", "data.target_column=null"], r"data\.target_column: is required for data\.task=generation"),
    (["data=e2e", "data.prompt='{ref}:'"], r"data\.prompt: uses the target column \{ref\}"),
    (["data.max_length=0"], r"data\.max_length: must be a positive int"),
])
def test_bad_data_settings_are_named(overrides, match):
    with pytest.raises(UserError, match=match):
        _spec(*overrides)


def test_a_template_field_that_is_not_a_column_is_named(tmp_path, tiny):
    _, tok = tiny
    spec = _write(tmp_path, "text\tlabel\ngood\ta\n")
    spec.prompt = "{text} / {title}"
    with pytest.raises(UserError, match=r"train\.tsv:1: has no column 'title'"):
        TaskDataModule(spec, tok).setup()
