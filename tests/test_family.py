"""The rest of the adapter family (prompt, IA3, gated prefix): train, only the adapter changes,
save/reload, zero-init gate, label position under a soft prompt, bad settings, sweep report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft import PeftModel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from compile import compile_prefix
from evaluate import evaluate
from feta.adapters import build_adapter, compiled_lora_config, run_name
from feta.compile import layers
from feta.compile.fit import numbered_modules, target_modules
from feta.compile.spec import LAYER
from feta.compile.views import CompileModel
from feta.evaluation import predict
from feta.interpolation import interpolate
from feta.models import load_base_model
from feta.scoring import class_log_probs, input_positions
from feta.schema import to_spec
from tests.conftest import compose_cfg, tiny_train_cfg
from tests.helpers.runs import eval_cfg
from train import train

# (job name, overrides): each trains 4 steps; gated prefix on both architectures PEFT supports here.
RUNS = {
    "prompt": ("adapter=prompt", "adapter.m=4"),
    "prompt_vocab": ("adapter=prompt", "adapter.m=4", "adapter.init=vocab"),
    "ia3": ("adapter=ia3",),
    "gated_prefix": ("adapter=gated_prefix", "adapter.m=4"),
    "gated_prefix_llama": ("adapter=gated_prefix", "adapter.m=4", "model=llama_tiny"),
    "prompt_llama": ("adapter=prompt", "adapter.m=4", "model=llama_tiny"),
}


def _tiny(model: str = "gpt2_tiny"):
    cfg = compose_cfg("train", [f"model={model}"])
    return load_base_model(to_spec(cfg, "model"))


def _batch(tok, texts=("a fine film", "dull, long and far too loud for anyone")):
    tok.pad_token = tok.pad_token or tok.eos_token  # as feta.data does
    enc = tok(list(texts), padding=True, return_tensors="pt")  # right padding: row 0 is padded
    assert enc["attention_mask"][0].sum() < enc["attention_mask"].shape[1]
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """One sweep directory with a run per RUNS entry: {job: (cfg, metrics, objects)}."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for job, overrides in RUNS.items():
        cfg = tiny_train_cfg(root, *overrides)
        with open_dict(cfg):
            cfg.output_dir = str(root / job)
        metrics, obj = train(cfg)
        out[job] = (cfg, metrics, obj)
    return root, out


def _frozen(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if not p.requires_grad]


@pytest.mark.parametrize("job", list(RUNS))
def test_trains_only_its_parameters_and_reloads(family, job):
    root, runs = family
    cfg, metrics, obj = runs[job]
    trained = obj["model"].eval()
    assert metrics["global_step"] == 4 and metrics["adapter"] == cfg.adapter.kind
    assert metrics["name"] == run_name(to_spec(cfg, "adapter"))

    # The base weights are bit-identical to a fresh base model's (same order, shapes and values).
    fresh, tok = load_base_model(to_spec(cfg, "model"))
    base_params = list(fresh.parameters())
    frozen = _frozen(trained)
    assert len(frozen) == len(base_params)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(frozen, base_params))

    # The adapter's own parameters moved away from their fresh initialization.
    init = build_adapter(copy.deepcopy(fresh), tok, to_spec(cfg, "adapter"), to_spec(cfg, "model").arch, "tiny")
    moved = [not torch.equal(a, b) for a, b in zip(
        [p for p in trained.parameters() if p.requires_grad], [p for p in init.parameters() if p.requires_grad])]
    assert moved and any(moved)

    # Save/reload with plain PEFT on a fresh base model: the same label logits, bit for bit.
    ids, mask = _batch(tok)
    label_ids = obj["datamodule"].task.verbalizer_ids
    reloaded = PeftModel.from_pretrained(fresh, str(root / job / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(class_log_probs(trained, ids, mask, label_ids), class_log_probs(reloaded, ids, mask, label_ids))


def test_gated_prefix_trained_its_gates(family):
    _, runs = family
    for job in ("gated_prefix", "gated_prefix_llama"):
        gates = [p for n, p in runs[job][2]["model"].named_parameters() if "adaption_gate" in n]
        assert gates and any(g.abs().max() > 0 for g in gates), job


@pytest.mark.parametrize("model", ["gpt2_tiny", "llama_tiny"])
def test_gated_prefix_starts_exactly_at_the_base_model(model):
    base, tok = _tiny(model)
    ids, mask = _batch(tok)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    spec = to_spec(compose_cfg("train", ["adapter=gated_prefix", f"model={model}"]), "adapter")
    gated = build_adapter(copy.deepcopy(base), tok, spec, to_spec(compose_cfg("train", [f"model={model}"]), "model").arch)
    assert all(float(p.abs().max()) == 0.0 for n, p in gated.named_parameters() if "adaption_gate" in n)
    with torch.no_grad():
        assert torch.equal(gated(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_class_scores_read_the_last_real_token_after_a_soft_prompt(init):
    base, tok = _tiny()
    spec = to_spec(compose_cfg("train", ["adapter=prompt", "adapter.m=5", f"adapter.init={init}"]), "adapter")
    model = build_adapter(base, tok, spec, "gpt2").eval()
    ids, mask = _batch(tok)
    label_ids = [4633, 3967]
    with torch.no_grad():
        got = class_log_probs(model, ids, mask, [[i] for i in label_ids])
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, m + T, V): virtual tokens first
    assert full.shape[1] == spec.m + ids.shape[1]
    last = spec.m + mask.sum(1) - 1  # each row's last real token in the full sequence
    want = full[torch.arange(2), last].log_softmax(-1)[:, label_ids]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("m", [3, 7])  # cut to m; repeated to m
def test_prompt_text_init_uses_the_texts_embeddings(m):
    base, tok = _tiny()
    # The tokenizer in hand is used, never reloaded by name: a GGUF model's tokenizer lives inside the
    # model file, and reloading it failed on SmolLM2.
    tok.name_or_path = "/nonexistent/tokenizer"
    spec = to_spec(compose_cfg("train", ["adapter=prompt", f"adapter.m={m}", "adapter.init_text=great movie night"]), "adapter")
    model = build_adapter(copy.deepcopy(base), tok, spec, "gpt2")
    text_ids = tok("great movie night", add_special_tokens=False)["input_ids"]
    assert len(text_ids) == 3
    want = (text_ids * 3)[:m]
    prompt = model.prompt_encoder["default"].embedding.weight  # (m, d)
    torch.testing.assert_close(prompt, base.get_input_embeddings().weight[want].float())


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["adapter=prompt", "adapter.init_text= "], r"adapter\.init=text: needs a non-empty adapter\.init_text"),
        (["adapter=prompt", "adapter.init=zero"], r"adapter\.init: unknown choice 'zero'; use one of text, random, vocab"),
        (["adapter=prompt", "adapter.m=0"], r"adapter\.m: must be a positive int \(prompt length\), got 0"),
        (["adapter=ia3", "adapter.targets=[]"], r"adapter\.targets: is empty"),
        (["adapter=gated_prefix", "adapter.layers=0"], r"adapter\.layers: must be a positive int or null"),
    ],
)
def test_bad_spec_values_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_spec(compose_cfg("train", overrides), "adapter")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["adapter=ia3", "adapter.targets=[q_proj]"], r"adapter\.targets=\['q_proj'\]: not in tiny; available: .*c_attn"),
        (["adapter=ia3", "adapter.feedforward=[c_fc]"], r"adapter\.feedforward=\['c_fc'\]: not among the targets"),
        (["adapter=gated_prefix", "adapter.layers=3"], r"adapter\.layers: is 3 but tiny has 2 layers"),
        (["adapter=prompt", "adapter.m=450"], r"adapter\.m \+ data\.max_length: 450 \+ 128 > 512 positions of tiny"),
    ],
)
def test_bad_model_dependent_values_name_the_field(overrides, match):
    base, tok = _tiny()
    spec = to_spec(compose_cfg("train", overrides), "adapter")
    with pytest.raises(ValueError, match=match):
        build_adapter(base, tok, spec, "gpt2", "tiny", max_length=128)


def test_gated_prefix_on_an_unsupported_architecture_is_a_clear_error():
    _, tok = _tiny()
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    spec = to_spec(compose_cfg("train", ["adapter=gated_prefix"]), "adapter")
    with pytest.raises(ValueError, match=r"adapter=gated_prefix: .* supports gpt2, llama, mistral models, and neox is "
                                         r"gpt_neox; use adapter=prefix or adapter=prompt"):
        build_adapter(neox, tok, spec, "gpt2", "neox")


def test_family_appears_in_the_sweep_report(family):
    root, runs = family
    evaluate(eval_cfg(root))
    table = (root / "report" / "results.csv").read_text()
    for job in RUNS:
        ev = json.loads((root / job / "eval.json").read_text())
        assert ev["kind"] == runs[job][0].adapter.kind and 0 <= ev["val_acc"] <= 1
        assert ev["name"] in table
    ia3 = json.loads((root / "ia3" / "eval.json").read_text())
    assert {r["name"] for r in ia3["latency"]["rows"]} == {"base", "adapter", "merged"}  # IA3 merges
    assert Path(root / "report" / "metric_vs_latency.png").stat().st_size > 10_000


def test_compile_refuses_weight_space_adapters(family):
    root, _ = family
    with pytest.raises(ValueError, match=r"is a ia3 run; compile turns a token adaptation \(prefix, prompt, "
                                         r"gated_prefix\) into LoRA; a ia3 adapter is already weight-space"):
        compile_prefix(compose_cfg("compile", [f"ckpt={root / 'ia3'}", "~logger"]))


@pytest.mark.parametrize("job", ["prompt", "prompt_llama", "gated_prefix", "gated_prefix_llama"])
def test_the_source_run_a_layer_at_a_time_is_the_adapted_model(family, job):
    """What compile fits to: the source view of the one model (a soft prompt as key/value slots, a gated
    prefix's wrappers swapped in), run one decoder layer at a time from the caught first-layer inputs, must
    give every hidden state of the adapted PEFT model at the input's positions; and with the source
    switched off, the base model's."""
    root, runs = family
    cfg, _, obj = runs[job]
    model, tok = obj["model"].eval(), obj["datamodule"].tokenizer
    ids, mask = _batch(tok)
    arch = to_spec(cfg, "model").arch
    base, _ = load_base_model(to_spec(cfg, "model"))
    names = list(target_modules(base, arch, "o"))
    cm = CompileModel(base, root / job / "adapter", model.active_peft_config.peft_type.value,
                      compiled_lora_config(2, names, False, arch))
    decoder = [cm.model.get_submodule(n) for n in numbered_modules(cm.model, LAYER[arch], arch).values()]
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        want = [input_positions(h, ids) for h in model(**batch, output_hidden_states=True).hidden_states]
        base_h = cm.base(**batch, output_hidden_states=True).hidden_states
        for view, mode, expected in ((cm.source, cm.source_mode, want), (cm.base, cm.base_mode, base_h)):
            stream = layers.catch(view, decoder[0], [batch], "cpu")
            torch.testing.assert_close(stream.hidden[0], expected[0])
            with mode():
                for i, layer in enumerate(decoder[:-1]):  # the last hidden state is after the final norm
                    cache = cm.layer_cache(i) if view is cm.source else None
                    stream.hidden[0] = layers.run(layer, stream, 0, "cpu", cache)
                    torch.testing.assert_close(stream.hidden[0], expected[i + 1], atol=1e-7, rtol=1e-6)
        assert (want[-2] - base_h[-2]).abs().max() > 1e-5  # the adapter changes the model, by far more than the tolerance


def _compile_ranks(root, job, tmp_path, ranks=(1, 64)):  # gpt2_tiny and llama_tiny: d = 64 = full rank
    res, fit = {}, {}
    for r in ranks:
        rec = compile_prefix(compose_cfg("compile", [f"ckpt={root / job}", "~logger", "calib_size=64", "eval_size=32",
                                                     f"rank={r}", f"out_dir={tmp_path / str(r)}"]))
        assert (tmp_path / str(r) / "adapter" / "adapter_model.safetensors").is_file()
        res[r] = rec["residual_content_mean"]  # held-out validation sentences
        fit[r] = [v["fit_residual"] for v in rec["fit_stats"]["modules"].values()]  # calibration tokens
    return res, fit


@pytest.mark.parametrize("job", ["gated_prefix", "gated_prefix_llama", "prompt_llama"])
def test_token_adaptations_compile_into_lora(family, job, tmp_path):
    """The compiled LoRA reproduces most of the source's effect on held-out sentences (residual 1 =
    no better than the base model), and a higher rank never fits the calibration tokens worse. (A
    gated prefix's term is nearly a constant shift, so rank 1 already fits it about as well as 64.)"""
    res, fit = _compile_ranks(family[0], job, tmp_path)
    assert 0 < res[64] <= res[1] + 1e-3 and res[64] < 0.7, res
    assert all(fw <= f1 + 1e-6 for f1, fw in zip(fit[1], fit[64])), fit


def test_soft_prompt_on_absolute_positions_compiles_with_a_warning(family, tmp_path):
    """On GPT-2 a soft prompt also moves every input token m positions along the learned position
    embeddings; no LoRA reproduces that, and compile says so (on rotary models the shift is invisible)."""
    with pytest.warns(UserWarning, match=r"absolute position embeddings"):
        res, fit = _compile_ranks(family[0], "prompt", tmp_path)
    assert all(fw < 0.9 * f1 for f1, fw in zip(fit[1], fit[64])), fit  # the attention part is fitted
    assert res[64] > 0.9, res  # ... but the positions are not: residual near 1 on held-out sentences


def test_interpolating_two_prompts_ends_at_each_run(family):
    """w = 0 and w = 1 must reproduce each run's own predictions (the same model's, loaded from disk)."""
    root, runs = family
    table = interpolate(root / "prompt", root / "prompt_vocab", [0.5], root / "prompt" / "analysis")
    assert table["w"].tolist() == [0.0, 0.5, 1.0]
    for job, w in (("prompt", 0.0), ("prompt_vocab", 1.0)):
        _, _, obj = runs[job]
        preds, labels = predict(obj["model"].eval(), obj["datamodule"])
        row = table[table["w"] == w].iloc[0]
        assert row["val_acc"] == pytest.approx(float((preds == labels).float().mean()), abs=1e-9)
    assert table.iloc[0]["agreement_with_a"] == 1.0 and table.iloc[-1]["agreement_with_b"] == 1.0
    assert (root / "prompt" / "analysis" / "interpolation.png").stat().st_size > 10_000


@pytest.mark.parametrize("a,b,match", [
    ("prompt", "ia3", r"analysis\.other=.*ia3: is a ia3 run; interpolate prefix or prompt runs"),
    ("prompt", "gated_prefix", r"analysis\.other=.* is a gated_prefix run"),
])
def test_interpolating_mismatched_runs_is_a_clear_error(family, a, b, match):
    root, _ = family
    with pytest.raises(ValueError, match=match):
        interpolate(root / a, root / b, [0.5], root / "never")
    assert not (root / "never").exists()
