"""What a compile calibrates on (calib_decode): the data's own targets, or the source adapter's own greedy
or sampled continuations, token for token; a setting never falls back to another source silently."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig

from feta.compile import resolve_source
from feta.compile.calibration import calibrate
from feta.compile.spec import CompileSpec
from feta.data import TaskDataModule, seeded_subset
from feta.decoding import greedy_decode
from feta.errors import UserError
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import compose_cfg
from tests.test_compile_peft import build_adapter, compile_peft, work  # noqa: F401  (work: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
E2E = ["data=e2e", "data.train_limit=40", "data.val_limit=4", "data.max_new_tokens=6"]


@pytest.fixture(scope="module")
def e2e_prefix(work, tmp_path_factory):  # noqa: F811
    """A random prefix (m=4) on llama_tiny, saved with plain PEFT; the E2E task; the source as PEFT loads it."""
    adapter = build_adapter(work["llama_tiny"], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                            tmp_path_factory.mktemp("calib") / "prefix")
    data = to_spec(compose_cfg("train", E2E), "data")
    source = resolve_source(adapter, to_spec(compose_cfg("train", ["model=llama_tiny"]), "model"), data)
    base, tok = load_base_model(source.model)
    return source, tok, PeftModel.from_pretrained(base, str(adapter)).eval()


def _rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _examples(source, tok, spec: CompileSpec):
    """The calibration examples, drawn as the compile draws them, and their task."""
    dm = TaskDataModule(source.data, tok, seed=source.seed)
    dm.setup()
    return seeded_subset(dm.splits["train"], spec.calib_size, 1000 + source.seed + spec.calib_seed), dm.task


def test_greedy_calibration_is_the_sources_own_greedy_decode(e2e_prefix):
    source, tok, adapted = e2e_prefix
    spec = CompileSpec(calib_size=10, calib_decode="greedy")
    fit = calibrate(source, tok, spec, adapted).fit
    examples, task = _examples(source, tok, spec)
    for row, scored, ex in zip(_rows(fit), fit["scored"], examples):
        prompt = tok(task.prompt(ex))["input_ids"]
        alone = greedy_decode(adapted, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                              6, tok.eos_token_id, tok.pad_token_id)[0].tolist()  # one prompt, no padding
        want = alone[: alone.index(tok.eos_token_id) + 1] if tok.eos_token_id in alone else alone
        assert row == prompt + want
        assert int(scored.sum()) == len(want) and bool(scored[len(prompt) - 1])  # every decoded token, a target
    reference = calibrate(source, tok, CompileSpec(calib_size=10), adapted).fit
    assert _rows(reference) == _rows(task.encode(examples))  # reference: the data itself
    assert _rows(reference) != _rows(fit)


def test_sampled_calibration_is_seeded_and_mix_keeps_half_the_references(e2e_prefix):
    source, tok, adapted = e2e_prefix
    greedy = _rows(calibrate(source, tok, CompileSpec(calib_size=10, calib_decode="greedy"), adapted).fit)
    sample = CompileSpec(calib_size=10, calib_decode="sample", calib_temperature=2.0)
    first, again = (calibrate(source, tok, sample, adapted) for _ in range(2))
    assert _rows(first.fit) == _rows(again.fit) and _rows(first.fit) != greedy
    assert first.record["decode"] == "sample" and first.record["temperature"] == 2.0
    examples, task = _examples(source, tok, sample)
    reference = _rows(task.encode(examples))
    mixed = _rows(calibrate(source, tok, CompileSpec(calib_size=10, calib_decode="mix", calib_temperature=2.0),
                            adapted).fit)
    assert sum(m == r for m, r in zip(mixed, reference)) == 5


def test_decoding_applies_to_generation_and_prompt_files_only(e2e_prefix, work, tmp_path):  # noqa: F811
    source, tok, adapted = e2e_prefix
    sst2 = resolve_source(source.ckpt, source.model, to_spec(compose_cfg("train", ["data=sst2"]), "data"))
    with pytest.raises(UserError, match=r"calib_decode=greedy: applies to generation tasks and prompt files; "
                                        r"data=sst2 is classification"):
        calibrate(sst2, tok, CompileSpec(calib_size=8, calib_decode="greedy"), adapted)
    rec = compile_peft(source.ckpt, "model=llama_tiny", f"calib_file={work['prompts']}", "calib_size=16",
                       "calib_decode=greedy", "calib_new_tokens=5", "eval_size=8", f"out_dir={tmp_path / 'c'}")
    assert rec["calibration"]["decode"] == "greedy"
    assert rec["calibration"]["scored_tokens"] > 16  # a continuation of up to 5 tokens per prompt, not 1
