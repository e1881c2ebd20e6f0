"""What a compile calibrates on (calib_decode): the data's own targets, or the source adapter's own greedy
or sampled continuations, token for token; a setting never falls back to another source silently."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, PrefixTuningConfig
from safetensors.torch import load_file

from feta.adapters import compiled_lora_config
from feta.compile.source import resolve_source
from feta.compile.calibration import calibrate
from feta.compile.distill import CachedTeacherModule, teacher_cache
from feta.compile.fit import target_modules
from feta.compile.spec import CompileSpec
from feta.compile.tokens import micro_batches
from feta.compile.views import CompileModel
from feta.data import TaskDataModule, seeded_subset
from feta.decoding import greedy_decode
from feta.errors import UserError
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import compose_cfg
from tests.helpers.peft import build_adapter
from tests.helpers.runs import compile_peft
from tests.helpers.sources import saved, tiny_prefix_source

pytestmark = pytest.mark.usefixtures("one_thread")
E2E = ["data=e2e", "data.train_limit=40", "data.val_limit=4", "data.max_new_tokens=6"]


@pytest.fixture(scope="module")
def e2e_prefix(work, tmp_path_factory):
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
    reference = calibrate(source, tok, CompileSpec(calib_size=10, calib_decode="reference"), adapted).fit
    assert _rows(reference) == _rows(task.encode(examples))  # reference: the data itself
    assert _rows(reference) != _rows(fit)


def test_auto_samples_on_generation_and_reads_the_data_elsewhere(e2e_prefix, work):
    source, tok, adapted = e2e_prefix
    auto = calibrate(source, tok, CompileSpec(calib_size=10), adapted)
    sample = calibrate(source, tok, CompileSpec(calib_size=10, calib_decode="sample"), adapted)
    assert auto.record["decode"] == "sample" and _rows(auto.fit) == _rows(sample.fit)
    examples, task = _examples(source, tok, CompileSpec(calib_size=10))
    assert _rows(auto.fit) != _rows(task.encode(examples))
    sst2 = resolve_source(source.ckpt, source.model, to_spec(compose_cfg("train", ["data=sst2"]), "data"))
    on_sst2 = calibrate(sst2, tok, CompileSpec(calib_size=8), adapted)  # no refusal: auto reads the data
    sst2_examples, sst2_task = _examples(sst2, tok, CompileSpec(calib_size=8))
    assert on_sst2.record["decode"] == "reference" and _rows(on_sst2.fit) == _rows(sst2_task.encode(sst2_examples))
    prompts = resolve_source(source.ckpt, source.model, None, work["prompts"])
    assert calibrate(prompts, tok, CompileSpec(calib_size=8), adapted).record["decode"] == "reference"


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


def test_decoding_applies_to_generation_and_prompt_files_only(e2e_prefix, work, tmp_path):
    source, tok, adapted = e2e_prefix
    sst2 = resolve_source(source.ckpt, source.model, to_spec(compose_cfg("train", ["data=sst2"]), "data"))
    with pytest.raises(UserError, match=r"calib_decode=greedy: applies to generation tasks and prompt files; "
                                        r"data=sst2 is classification"):
        calibrate(sst2, tok, CompileSpec(calib_size=8, calib_decode="greedy"), adapted)
    rec = compile_peft(source.ckpt, "model=llama_tiny", f"calib_file={work['prompts']}", "calib_size=16",
                       "calib_decode=greedy", "calib_new_tokens=5", "eval_size=8", f"out_dir={tmp_path / 'c'}")
    assert rec["calibration"]["decode"] == "greedy"
    assert rec["calibration"]["scored_tokens"] > 16  # a continuation of up to 5 tokens per prompt, not 1


# ------------------------------------------------------------------ on-policy distillation


def test_cached_teacher_loss_is_zero_at_the_teacher_and_falls_with_steps(tmp_path):
    """The cached top-k KL is exactly 0 for a student that is its own teacher, and positive for the compiled
    LoRA at PEFT's zero start; Lightning steps against the cache then lower it."""
    base, source, batch = tiny_prefix_source()
    batch = {**batch, "scored": batch["attention_mask"].bool()}  # every token: a continuation's worth of rows
    cm = CompileModel(copy.deepcopy(base), saved(source, tmp_path), "PREFIX_TUNING",
                      compiled_lora_config(4, list(target_modules(base, "gpt2", "o")), False, "gpt2"))
    batches = micro_batches(batch, 5)

    def loss(cache) -> float:
        module = CachedTeacherModule(cm.lora, lr=1e-2, schedule="constant", steps=1)
        module.log_dict = lambda *a, **k: None
        with torch.no_grad():
            return sum(float(module.training_step(b, 0)) for b in cache) / len(cache)

    assert loss(teacher_cache(cm.compiled, batches, 20)) < 1e-6
    cache = teacher_cache(cm.source, batches, 20)
    before = loss(cache)
    assert before > 1e-5 and cache[0]["top_ids"].shape == (int(batches[0]["scored"].sum()), 20)
    assert bool((cache[0]["top_logp"].exp().sum(-1) < 1).all())  # full-vocabulary log-probabilities of the k
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, accelerator="cpu", devices=1)
    trainer.fit(CachedTeacherModule(cm.lora, lr=1e-2, schedule="constant", steps=30),
                train_dataloaders=torch.utils.data.DataLoader(cache, batch_size=None, shuffle=True))
    cm.lora.eval()
    assert loss(cache) < 0.5 * before, (loss(cache), before)


def test_on_policy_preset_distils_on_sampled_continuations(e2e_prefix, tmp_path):
    source, _, _ = e2e_prefix
    common = ("model=llama_tiny", "data=e2e", "data.train_limit=40", "data.max_new_tokens=4", "calib_size=8",
              "eval_size=4")
    rec = compile_peft(source.ckpt, *common, "preset=on_policy", "distill_steps=3", f"out_dir={tmp_path / 'p'}")
    assert rec["method"] == "lstsq+distill" and rec["calibration"]["decode"] == "sample"
    assert rec["fit_stats"]["distill"]["steps"] == 3 and rec["fit_stats"]["distill"]["data"] == "calibration"
    closed = compile_peft(source.ckpt, *common, "calib_decode=sample", "method=lstsq", "target=o",
                          f"out_dir={tmp_path / 'c'}")
    # the steps start from the closed form on o_proj and move it, and train q, k and v from PEFT's zero start
    distilled, fitted = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in "pc")
    o = [k for k in fitted if ".o_proj.lora_" in k]
    assert o and all(not torch.equal(distilled[k], fitted[k]) for k in o if k.endswith("lora_B.weight"))
    assert any(distilled[k].abs().max() > 0 for k in distilled if ".q_proj.lora_B" in k)
    assert rec["next_token"] != closed["next_token"]


# ------------------------------------------------------------------ measures where the model decodes


def test_own_output_measures_are_exact_for_a_source_without_effect(work, tmp_path):
    """LLaMA-Adapter with its gates at zero changes nothing: the compiled model (which fits nothing) decodes
    exactly what the source decodes, on every held-out prompt, and agrees at every token with KL 0."""
    adapter = build_adapter(work["llama_tiny"], AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4,
                                                                     adapter_layers=2), tmp_path / "gated")
    rec = compile_peft(adapter, *E2E, "model=llama_tiny", "calib_size=8", "eval_size=6", f"out_dir={tmp_path / 'c'}")
    own = rec["own_outputs"]
    assert own["prompts"] == 4 and own["identical_outputs"] == 1.0 and own["own_token_agreement"] == 1.0
    assert own["own_token_kl"] < 1e-6 and own["positions"] >= 4


def test_own_output_measures_count_what_differs(e2e_prefix, tmp_path):
    """A random prefix: the measures are read off the source's own greedy continuations, and the compiled
    model's continuations are compared with them token for token."""
    source, tok, adapted = e2e_prefix
    rec = compile_peft(source.ckpt, *E2E, "model=llama_tiny", "calib_size=8", "eval_size=4", f"out_dir={tmp_path / 'c'}")
    own = rec["own_outputs"]
    assert own["prompts"] == 4 and 0.0 <= own["identical_outputs"] <= 1.0
    assert own["positions"] > own["prompts"]  # every continuation token is a position, not one per prompt
    assert own["own_token_kl"] > 0 and own["base_own_token_kl"] > own["own_token_kl"]  # the compiled model is nearer its source than the base
