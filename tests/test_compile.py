"""compile.py: the closed-form fit on synthetic data with known answers, and on gpt2_tiny / llama_tiny runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compile import compile_prefix
from feta import runs
from feta.adapters import compiled_lora_config
from feta.compile import CompileSpec, layer_residuals, pipeline
from feta.compile import fit as fit_module
from feta.compile.distill import DistillModule
from feta.compile.fit import fit_lstsq, prefix_stream, reduced_rank_fit
from feta.compile.sink import collect_rows, fit_layer, merged_key_value, sink_direction
from feta.compile.tokens import detect_sinks, micro_batches
from feta.data import last_real_token
from feta.equivalence.attention import rotate
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import compose_cfg, tiny_train_cfg
from train import train


# ------------------------------------------------------------------ pure math, known answers


def _low_rank_problem(n=400, d_in=32, d_out=24, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_out, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_in, generator=g, dtype=torch.float64)
    b = 3 * torch.randn(d_out, generator=g, dtype=torch.float64)
    return X, W, b


def test_rank_r_map_and_bias_are_recovered_only_with_bias():
    X, W, b = _low_rank_problem()
    T = X @ W.T + b
    A, B, b_hat = reduced_rank_fit(X, T, rank=3, ridge=0.0, bias=True)
    torch.testing.assert_close(B @ A, W, atol=1e-5, rtol=0)
    torch.testing.assert_close(b_hat, b, atol=1e-5, rtol=0)
    # Row space: W's rows lie in span(A).
    proj = A.T @ torch.linalg.pinv(A.T)
    assert (W @ proj - W).abs().max() < 1e-5
    A0, B0, none = reduced_rank_fit(X, T, rank=3, ridge=0.0, bias=False)
    assert none is None and (B0 @ A0 - W).abs().max() > 1e-2  # the offset leaks into the map


def test_rank_truncation_is_monotone_and_exact_at_true_rank():
    X, W, _ = _low_rank_problem(r=5)
    T = X @ W.T + 0.01 * torch.randn(X.shape[0], W.shape[0], dtype=torch.float64)
    errs = []
    for r in (1, 2, 3, 4, 5, 24):
        A, B, _ = reduced_rank_fit(X, T, rank=r, ridge=0.0)
        errs.append(float((T - X @ (B @ A).T).norm() / T.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:5])), errs
    assert errs[4] < 0.01 and abs(errs[5] - errs[4]) < 0.01  # rank 5 already explains all but noise


def test_planted_sink_is_detected_and_left_out():
    X, W, _ = _low_rank_problem(n=300, r=2)
    h = torch.randn(30, 10, X.shape[1], dtype=torch.float64)
    h[:, 0] *= 100  # massive activation at the first token of every row
    mask = torch.ones(30, 10)
    mask[5:, 8:] = 0
    sinks = detect_sinks(h, mask, ratio=20.0)
    assert sinks[:, 0].all() and not sinks[:, 1:].any()
    # The sink tokens carry a huge target that does not follow W; the rest follow W exactly.
    Xt, Tt = h.reshape(-1, X.shape[1]), (h @ W.T).reshape(-1, W.shape[0])
    Tt = Tt.clone()
    sink_rows = sinks.reshape(-1)
    Tt[sink_rows] = 1e3 * torch.randn(int(sink_rows.sum()), W.shape[0], dtype=torch.float64)
    keep = (mask.reshape(-1) > 0)
    A, B, _ = reduced_rank_fit(Xt[keep & ~sink_rows], Tt[keep & ~sink_rows], rank=2, ridge=0.0)
    assert (B @ A - W).abs().max() < 1e-6
    A, B, _ = reduced_rank_fit(Xt[keep], Tt[keep], rank=2, ridge=0.0)
    assert (B @ A - W).abs().max() > 0.1


def test_zero_effect_source_compiles_to_a_zero_lora():
    """A source adapter with no effect gives all-zero targets: the fitted LoRA must be exactly zero.
    (It fails if the captured streams are misaligned between the two passes.)"""
    cfg = compose_cfg("train", ["model=gpt2_tiny"])

    base, tok = load_base_model(to_spec(cfg, "model"))
    source = get_peft_model(base, LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))  # B = 0: no effect
    tok.pad_token = tok.eos_token
    batch = dict(tok(["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"], return_tensors="pt", padding=True))
    streams = prefix_stream(source, batch, "gpt2")
    fresh, _ = load_base_model(to_spec(cfg, "model"))
    compiled = get_peft_model(fresh, LoraConfig(r=2, lora_alpha=2, target_modules=r".*attn\.c_proj", fan_in_fan_out=True))
    fit_lstsq(compiled, [streams], [batch], [batch["attention_mask"].double()], "gpt2", CompileSpec(rank=2, bias=False))
    # Zero up to float32 roundoff of the captured streams (~1e-7 relative); a misaligned capture
    # (wrong layer, shifted positions) gives a delta of the order of the weights themselves.
    for layer in compiled.get_base_model().transformer.h:
        proj = layer.attn.c_proj
        delta = proj.lora_B["default"].weight @ proj.lora_A["default"].weight
        assert delta.norm() < 1e-6 * proj.base_layer.weight.norm(), float(delta.norm())


def _tiny_prefix_source():

    base, tok = load_base_model(to_spec(compose_cfg("train", ["model=gpt2_tiny"]), "model"))
    torch.manual_seed(0)
    source = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    texts = [f"Review: a {'very ' * k}good film\nSentiment:" for k in range(10)]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    return base, source, {**batch, "scored": last_real_token(batch["attention_mask"])}


@pytest.mark.parametrize("match", ["module", "stream"])
def test_a_weight_space_source_is_recovered_on_the_modules_it_changed(match):
    """Known answer: a source that IS a rank-2 LoRA on the attention and MLP output projections. The
    closed form with target=o+mlp must recover both updates (so the compiled model equals the
    source); target=o alone cannot reproduce the MLP's change."""

    base, tok = load_base_model(to_spec(compose_cfg("train", ["model=gpt2_tiny"]), "model"))
    names = [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    torch.manual_seed(0)
    source = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=names, fan_in_fan_out=True,
                                                            init_lora_weights=False)).eval()
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    words = "good bad dull bright slow long short warm cold odd".split()
    texts = [f"Review: a {a} and {b} film, {c} at times\nSentiment:" for a in words for b in words[:6] for c in words[6:8]]  # ~1,700 tokens > 256 = d_in
    batches = micro_batches(dict(tok(texts, padding=True, return_tensors="pt")), 16)
    streams = [prefix_stream(source, b, "gpt2", mlp=True) for b in batches]
    weights = [b["attention_mask"].double() for b in batches]

    def compiled_for(target):
        compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(
            2, [n for n in names if target == "o+mlp" or ".attn." in n], False, "gpt2")).eval()
        fit_lstsq(compiled, streams, batches, weights, "gpt2", CompileSpec(rank=2, bias=False, target=target, match=match, ridge=0.0))
        return compiled

    both, attn_only = compiled_for("o+mlp"), compiled_for("o")
    for name in names:
        src, fit = source.get_base_model().get_submodule(name), both.get_base_model().get_submodule(name)
        delta = lambda m: m.lora_B["default"].weight @ m.lora_A["default"].weight  # noqa: E731
        assert delta(src).norm() > 0.1
        torch.testing.assert_close(delta(fit), delta(src), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        out = {k: m(**batches[0], output_hidden_states=True).hidden_states[-1]
               for k, m in (("source", source), ("both", both), ("attn_only", attn_only), ("base", base))}
    rel = lambda k: float((out[k] - out["source"]).norm() / (out["source"] - out["base"]).norm())  # noqa: E731
    assert rel("both") < 1e-4 and rel("attn_only") > 0.05, (rel("both"), rel("attn_only"))


def test_sinks_are_left_out_of_the_o_fit_and_held_unchanged_by_the_mlp_fit(monkeypatch):
    """Rows that reach the least squares: an o fit leaves sink tokens out; an MLP fit keeps them with
    target zero (its LoRA must not move the massive activation), and neither changes the weights of
    the other tokens."""
    base, source, batch = _tiny_prefix_source()
    sinks = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    sinks[:, 0] = True
    weights = batch["attention_mask"].double().masked_fill(sinks, 0.0)
    calls, fit = [], fit_module.reduced_rank_fit

    def spy(x, target, rank, ridge, bias, w):
        calls.append((x, target, w))
        return fit(x, target, rank, ridge, bias, w)

    monkeypatch.setattr(fit_module, "reduced_rank_fit", spy)
    names = [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, names, False, "gpt2")).eval()
    fit_lstsq(compiled, [prefix_stream(source, batch, "gpt2", mlp=True)], [batch], [weights], "gpt2",
              CompileSpec(rank=2, bias=False, target="o+mlp"), [sinks])
    assert len(calls) == 4  # in forward order: layer 0 o, layer 0 mlp, layer 1 o, layer 1 mlp
    n_content, n_sinks = int(weights.gt(0).sum()), int(sinks.sum())
    for k, (x, target, w) in enumerate(calls):
        if k % 2 == 0:  # o
            assert x.shape[1] == 64 and len(w) == n_content and (w == 1).all()
        else:  # mlp: the content rows and every sink row, whose target is zero
            assert x.shape[1] == 256 and len(w) == n_content + n_sinks and (w == 1).all()
            assert int((target.abs().sum(1) == 0).sum()) == n_sinks


def test_micro_batches_fit_exactly_like_one_batch():
    """The calibration set runs as length-sorted micro-batches in threads that meet at every layer;
    the fitted LoRA must equal the one fitted from a single padded batch of the same sentences."""
    base, source, batch = _tiny_prefix_source()
    parts = micro_batches(batch, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 3, 3, 1]
    assert sum(int(p["attention_mask"].sum()) for p in parts) == int(batch["attention_mask"].sum())
    assert all(bool(p["attention_mask"][:, -1].any()) for p in parts)  # each cut to its longest row
    assert parts[0]["input_ids"].shape[1] < batch["input_ids"].shape[1]

    def fit(batches):
        names = [f"transformer.h.{i}.attn.c_proj" for i in range(2)]
        compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, names, True, "gpt2")).eval()
        streams = [prefix_stream(source, b, "gpt2") for b in batches]
        weights = [b["attention_mask"].double() for b in batches]
        fit_lstsq(compiled, streams, batches, weights, "gpt2", CompileSpec(rank=2, bias=True))
        layers = compiled.get_base_model().transformer.h
        return [(l.attn.c_proj.lora_B["default"].weight @ l.attn.c_proj.lora_A["default"].weight,
                 l.attn.c_proj.lora_B["default"].bias) for l in layers]

    for (w1, b1), (w2, b2) in zip(fit([batch]), fit(parts)):
        assert w1.norm() > 1e-3 * base.transformer.h[0].attn.c_proj.weight.norm()  # a real fit, not zeros
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b2, b1, rtol=1e-4, atol=1e-6)


def test_a_failing_micro_batch_raises_instead_of_hanging():
    base, source, batch = _tiny_prefix_source()
    parts = micro_batches(batch, 3)
    streams = [prefix_stream(source, b, "gpt2") for b in parts][::-1]  # misaligned with the batches
    compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(
        2, ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"], False, "gpt2"))
    with pytest.raises(RuntimeError, match=r"size"):
        fit_lstsq(compiled, streams, parts, [p["attention_mask"].double() for p in parts], "gpt2", CompileSpec(rank=2, bias=False))


# ------------------------------------------------------------------ on trained tiny runs


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    cfg = tiny_train_cfg(tmp, "adapter.init=random", "adapter.m=8", "trainer.max_steps=8", "data.train_limit=256")
    train(cfg)
    return Path(cfg.output_dir)


def compile_cfg(ckpt, *overrides):
    cfg = compose_cfg("compile", [f"ckpt={ckpt}", "logger=csv", "calib_size=64", "eval_size=32", *overrides])
    return cfg


def test_residual_falls_with_rank(prefix_run):
    res, fit = {}, {}
    for r in (1, 4, 64):  # gpt2_tiny: d = 64, so 64 is full rank
        rec = compile_prefix(compile_cfg(prefix_run, f"rank={r}"))
        res[r] = rec["residual_content_mean"]  # held-out validation sentences
        fit[r] = [v["fit_residual"] for v in rec["fit_stats"]["modules"].values()]  # calibration tokens, per layer
        assert len(rec["residuals"]["last"]) == 2 and all(0 <= v < 10 for v in rec["residuals"]["last"])
    assert res[1] > res[4] > res[64], res
    # On calibration data (~1,000 tokens > d = 64, so not vacuous) a larger rank must fit clearly better.
    assert all(f1 > f4 > f64 for f1, f4, f64 in zip(fit[1], fit[4], fit[64])), fit
    assert all(f64 < 0.9 * f1 for f1, f64 in zip(fit[1], fit[64])), fit


def test_adapter_reloads_with_plain_peft_and_merges_exactly(prefix_run, tmp_path):
    out = tmp_path / "c"
    rec = compile_prefix(compile_cfg(prefix_run, "rank=4", "merge=true", f"out_dir={out}"))
    assert (out / "adapter/adapter_model.safetensors").is_file() and (out / "compile.json").is_file()
    assert rec["merge"]["max_abs_logit_diff"] < 1e-4
    cfg = runs.load_run_config(prefix_run)
    model_spec, _, _ = runs.run_specs(cfg)
    base, tok = load_base_model(model_spec)
    ids = torch.tensor([tok("Review: what a film\nSentiment:")["input_ids"]])
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        with peft_model.disable_adapter():
            c = peft_model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the compiled adapter does something


@pytest.fixture(scope="module")
def llama_prefix_run(tmp_path_factory):
    cfg = tiny_train_cfg(tmp_path_factory.mktemp("llama"), "model=llama_tiny", "adapter.init=random", "adapter.m=8",
                         "trainer.max_steps=4")
    train(cfg)
    return Path(cfg.output_dir)


@pytest.mark.parametrize("target", ["o", "o+mlp"])
def test_llama_bias_compile_reloads_and_merges(llama_prefix_run, tmp_path, target):
    """Llama has no biases: the merged model gains zero biases where a lora_bias lands (attention,
    and the MLP for target=o+mlp) and must load back with plain transformers, logits unchanged."""
    run = llama_prefix_run
    out = tmp_path / "cb"
    rec = compile_prefix(compile_cfg(run, "rank=2", f"target={target}", "merge=true", f"out_dir={out}"))
    assert rec["bias"] is True  # the closed form's default
    assert rec["merge"]["max_abs_logit_diff"] < 1e-4
    model_spec, _, _ = runs.run_specs(runs.load_run_config(run))
    base, tok = load_base_model(model_spec)
    ids = torch.tensor([tok("Review: what a film\nSentiment:")["input_ids"]])
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert peft_model.peft_config["default"].lora_bias
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert merged.config.attention_bias and merged.model.layers[0].self_attn.o_proj.bias.abs().max() > 0
    assert merged.config.mlp_bias == (target == "o+mlp")
    if target == "o+mlp":
        assert merged.model.layers[0].mlp.down_proj.bias.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (["rank=0", "bias=false"], ValueError, r"rank=0 with bias=false leaves nothing to fit"),
        (["rank=-2"], ValueError, r"rank: must be an int >= 0"),
        (["rank=65"], ValueError, r"rank=65 exceeds the width of o \(64\)"),
        (["method=distill", "bias=true"], ValueError, r"bias=true is a closed-form option"),
        (["base_model=gpt2"], ValueError, r"base_model=gpt2: but the prefix .* was trained on gpt2_tiny"),
        (["merge_dtype=int8"], ValueError, r"merge_dtype: unknown dtype 'int8'; use one of float32"),
        (["target=q", "method=distill"], ValueError, r"target: q: q is not a module kind of gpt2; use qkv, o, mlp"),
        (["target=zz"], ValueError, r"target: unknown or repeated module kind 'zz'"),
        (["target=o+qkv"], ValueError, r"target: o\+qkv needs method=distill or lstsq\+distill: the closed form fits only"),
        (["target=qkv", "method=lstsq+distill"], ValueError, r"lstsq\+distill needs one of o, mlp in the target"),
        (["distill_steps=0", "method=distill"], ValueError, r"distill_steps: must be a positive int"),
        (["method=foo"], ValueError, r"method: unknown choice 'foo'; use one of sink, lstsq, distill, lstsq\+distill"),
        (["target=o+o"], ValueError, r"target: unknown or repeated module kind 'o'"),
    ],
)
def test_bad_settings_write_nothing(prefix_run, tmp_path, overrides, exc, match):
    before = sorted(p.name for p in prefix_run.iterdir())
    with pytest.raises(exc, match=match):
        compile_prefix(compile_cfg(prefix_run, *overrides, f"out_dir={tmp_path / 'out'}"))
    assert sorted(p.name for p in prefix_run.iterdir()) == before and not (tmp_path / "out").exists()


def test_lora_run_missing_and_corrupt_checkpoints(tmp_path):
    lora = tiny_train_cfg(tmp_path / "l", "adapter=lora")
    train(lora)
    with pytest.raises(ValueError, match=r"is a lora run; compile turns a token adaptation \(prefix, prompt, gated_prefix\) into LoRA"):
        compile_prefix(compile_cfg(lora.output_dir))
    with pytest.raises(ValueError, match=r"no such directory"):
        compile_prefix(compile_cfg(tmp_path / "nope"))
    prefix = tiny_train_cfg(tmp_path / "p", "adapter.init=random")
    train(prefix)
    weights = Path(prefix.output_dir) / "adapter/adapter_model.safetensors"
    weights.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: is corrupt"):
        compile_prefix(compile_cfg(prefix.output_dir))


def test_existing_result_is_kept_unless_overwrite(prefix_run, tmp_path):
    out = tmp_path / "keep"
    compile_prefix(compile_cfg(prefix_run, "rank=2", f"out_dir={out}"))
    stamp = (out / "compile.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"exists; pass overwrite=true"):
        compile_prefix(compile_cfg(prefix_run, "rank=2", f"out_dir={out}"))
    assert (out / "compile.json").stat().st_mtime_ns == stamp
    rec = compile_prefix(compile_cfg(prefix_run, "rank=3", f"out_dir={out}", "overwrite=true"))
    assert json.loads((out / "compile.json").read_text())["rank"] == 3 == rec["rank"]


# ------------------------------------------------------------------ distillation


def test_distill_layers_loss_is_the_squared_residual_and_zero_at_the_teacher():
    """distill_hidden=layers: per layer ‖h_student − h_prefix‖² / ‖h_prefix − h_base‖², the mean of that
    at content tokens and (weighted last_weight) at the classified token, averaged over layers: the
    residuals compile.json reports (layer_residuals), squared. A student that is still the base model
    scores exactly 1, the teacher itself 0."""

    base, source, batch = _tiny_prefix_source()
    names = [f"transformer.h.{i}.attn.c_proj" for i in range(2)]
    student = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, names, False, "gpt2")).eval()  # B = 0
    logged = {}
    for teacher, expected in ((source, 1.0), (student, 0.0)):
        module = DistillModule(student, teacher, [[0], [1]], lr=1e-3, hidden="layers")
        module.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
        with torch.no_grad():
            module.training_step(batch, 0)
        assert abs(logged["distill/mse"] - expected) < 1e-5, logged
    assert logged["distill/kl"] < 1e-6
    torch.manual_seed(1)
    for name in names:  # a student part-way: LoRA B off zero
        torch.nn.init.normal_(student.get_submodule(f"base_model.model.{name}").lora_B["default"].weight, std=0.05)
    res = layer_residuals(base, source, student, [batch], sink_ratio=6.0)
    seen = []
    for w in (1.0, 5.0):  # last_weight: the classified token's weight against all content tokens
        expected = sum((c**2 + w * t**2) / (1 + w) for c, t in zip(res["content"], res["last"])) / len(res["last"])
        module = DistillModule(student, source, [[0], [1]], lr=1e-3, hidden="layers", last_weight=w)
        module.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
        with torch.no_grad():
            module.training_step(batch, 0)
        assert 0.05 < expected and abs(logged["distill/mse"] - expected) < 1e-4 * expected, (w, logged, res)
        seen.append(expected)
    assert abs(seen[0] - seen[1]) > 1e-3 * seen[0]  # the two weightings are told apart


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_distill_schedule_ends_at_zero_only_when_cosine(schedule):
    base, _, _ = _tiny_prefix_source()
    student = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, ["transformer.h.0.attn.c_proj"], False, "gpt2"))
    conf = DistillModule(student, base, [[0], [1]], lr=3e-4, schedule=schedule, steps=10).configure_optimizers()
    opt, sched = (conf["optimizer"], conf["lr_scheduler"]["scheduler"]) if isinstance(conf, dict) else (conf, None)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    assert lrs[0] == 3e-4
    if schedule == "cosine":
        assert opt.param_groups[0]["lr"] < 1e-12 and all(a > b for a, b in zip(lrs, lrs[1:]))
    else:
        assert lrs == [3e-4] * 10


@pytest.mark.parametrize("target", ["v", "q+k+v+o"])
def test_distill_fits_attention_targets_the_closed_form_cannot(llama_prefix_run, target):
    rec = compile_prefix(compile_cfg(llama_prefix_run, "rank=2", "method=distill", f"target={target}", "distill_steps=6",
                                     "distill_lr=1e-3", "distill_hidden=layers"))
    assert (llama_prefix_run / f"compiled-r2-distill-{target.replace('+', '_')}" / "adapter").is_dir()
    kinds = {name.rsplit(".", 1)[-1] for name in rec["target_modules"]}
    assert kinds == {f"{k}_proj" for k in target.split("+")} and len(rec["target_modules"]) == 2 * len(kinds)
    assert rec["fit_stats"]["distill"]["steps"] == 6
    assert rec["residual_content_mean"] < 1.0, rec["residuals"]  # moved from the base model toward the prefix


def test_faithful_preset_sets_the_measured_recipe_and_runs_on_llama(llama_prefix_run, tmp_path):
    """preset=faithful is the README's most faithful r=4 row, setting for setting; it compiles end to end."""
    cfg = compile_cfg(llama_prefix_run, "preset=faithful")
    spec = CompileSpec(**{k: cfg[k] for k in CompileSpec.__dataclass_fields__})
    assert (spec.rank, spec.method, spec.target, spec.bias, spec.last_weight) == (4, "lstsq+distill", "q+k+v+o", True, 3.0)
    assert (spec.distill_steps, spec.distill_lr, spec.distill_schedule, spec.distill_hidden) == (300, 3e-4, "cosine", "layers")
    rec = compile_prefix(compile_cfg(llama_prefix_run, "preset=faithful", "rank=2", "distill_steps=3",
                                     f"out_dir={tmp_path / 'f'}"))
    assert rec["fit_stats"]["distill"]["steps"] == 3 and len(rec["target_modules"]) == 8  # 2 layers x q, k, v, o
    assert rec["residual_last_mean"] < 1.0


def test_lstsq_distill_starts_o_in_closed_form_and_trains_v_from_zero(llama_prefix_run, tmp_path):
    """lstsq+distill with target=v+o: the closed form fits only the o_proj LoRAs (v_proj has no
    per-token closed form); distillation then moves v_proj off PEFT's zero start."""

    out = tmp_path / "vo"
    common = ("rank=2", "target=v+o", "method=lstsq+distill", "distill_hidden=layers", "distill_lr=1e-3")
    rec = compile_prefix(compile_cfg(llama_prefix_run, *common, "distill_steps=4", "merge=true", f"out_dir={out}"))
    assert {n.rsplit(".", 1)[-1] for n in rec["fit_stats"]["modules"]} == {"o_proj"}
    assert {n.rsplit(".", 1)[-1] for n in rec["target_modules"]} == {"v_proj", "o_proj"}
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    v_B = [w for k, w in weights.items() if "v_proj.lora_B" in k and k.endswith("weight")]
    assert len(v_B) == 2 and all(w.abs().max() > 0 for w in v_B)  # distillation moved them off zero
    assert rec["bias"] is True and rec["merge"]["max_abs_logit_diff"] < 1e-4  # v_proj's lora_bias merges too


# ------------------------------------------------------------------ method=sink: the prefix merged into the sink slot


def test_sink_key_is_exact_when_the_prefix_is_a_second_sink():
    """Known answer: one prefix slot equal to the sink (key and value). logsumexp of two equal logits is the
    sink's logit + log 2, a constant shift, so the merged key is exact when the queries carry a constant
    component (q = [1, r]): δ_k = (log 2 / scale)·e_0; the value mix is the sink's own value, δ_v = 0."""
    g = torch.Generator().manual_seed(0)
    n, d, scale = 300, 8, 8 ** -0.5
    q = torch.cat([torch.ones(n, 1), torch.randn(n, d - 1, generator=g)], 1).double()
    k_sink, v_sink = torch.randn(d, generator=g).double(), torch.randn(d, generator=g).double()
    content_lse = torch.randn(n, generator=g).double()
    dk, dv, stats = merged_key_value(q, q, k_sink.expand(n, d), v_sink.expand(n, d), k_sink[None], v_sink[None],
                                     content_lse, scale)
    want = torch.zeros(d, dtype=torch.float64)
    want[0] = math.log(2) / scale
    torch.testing.assert_close(dk, want, atol=1e-5, rtol=0)
    assert dv.abs().max() < 1e-12 and stats["key_fit_residual"] < 1e-5
    # Without the constant component no single key is exact: the fit is a compromise, and says so.
    _, _, loose = merged_key_value(q[:, 1:], q[:, 1:], k_sink[1:].expand(n, d - 1), v_sink[1:].expand(n, d - 1),
                                   k_sink[None, 1:], v_sink[None, 1:], content_lse, scale)
    assert loose["key_fit_residual"] > 0.5


def test_sink_key_is_exact_on_a_tiny_llama_whose_prefix_slot_is_a_second_sink():
    """The same known answer through a Llama layer's own q/k/v and rotary code (collect_rows, fit_layer).
    Every sequence starts with the same token, the sink; the one prefix slot holds the sink's key, rotated
    to where the prefix model puts the sink (position m = 1), and its value. Each query then sees the
    sink's logit twice, so the merged slot's logit is the sink's + log 2. An exact key exists when each
    query carries a constant component: here one query dimension reads only a constant input channel, at
    a rotary frequency ~0 (rope_theta 1e12). Then δ_k = log 2 / (scale·c) on that dimension, δ_v = 0."""
    d, D, c = 8, 32, 3.0
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=d, vocab_size=50, rope_theta=1e12)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.randn(50, D, generator=g)
        emb[:, 0] = 0
        emb *= ((D - 1) / emb.pow(2).sum(1, keepdim=True)).sqrt()  # every row's rms is 1 with channel 0 = 1
        emb[:, 0] = 1
        model.model.embed_tokens.weight.copy_(emb)
        attn = model.model.layers[0].self_attn
        const = [h * d + d // 2 - 1 for h in range(4)]  # the lowest-frequency rotary dimension of each head
        attn.q_proj.weight[const] = 0
        attn.q_proj.weight[const, 0] = c
    ids = torch.cat([torch.full((6, 1), 7), torch.randint(8, 50, (6, 11), generator=g)], 1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    content = mask.clone()
    content[:, 0] = False
    content[:, 5] = False  # a later sink: no query row, but the edit must leave its slot alone
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
        rows = collect_rows(attn, model.model.rotary_emb, hidden, model.model.rotary_emb(hidden, positions), mask,
                            1, content)
        k = attn.k_proj(hidden[:1, :1]).view(1, 1, 2, d).transpose(1, 2)  # (1, n_kv, 1, d), position 0
        v = attn.v_proj(hidden[:1, :1]).view(1, 1, 2, d).transpose(1, 2)
        cos1, sin1 = model.model.rotary_emb(hidden[:1, :1], torch.ones(1, 1, dtype=torch.long))
        pk, pv = rotate(k, cos1, sin1)[0], v[0]  # (n_kv, m=1, d)
    assert torch.equal(rows["x_rest"], hidden[:, 1:].reshape(-1, D))  # u ≈ 0 on every later input, sinks too
    assert rows["heads"][0]["q"].shape[0] == 2 * 6 * 10  # query rows: 2 heads per group x 6 sequences x 10
    dk, dv, u, stats = fit_layer([rows], pk, pv, attn.scaling)
    want = torch.zeros(2, d, dtype=torch.float64)
    want[:, d // 2 - 1] = math.log(2) / (attn.scaling * c)
    torch.testing.assert_close(dk.view(2, d), want, atol=1e-4, rtol=0)
    assert dv.abs().max() < 1e-5
    assert max(stats[f"head{h}"]["key_fit_residual"] for h in range(2)) < 1e-4


def test_sink_direction_annihilates_content_in_the_calibration_span():
    """u: uᵀx_sink = 1, and uᵀx ≈ 0 for any input in the span of the calibration content inputs (here a
    5-dimensional subspace of 16), including inputs not seen in the fit."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 16, generator=g).double()
    x_content = torch.randn(400, 5, generator=g).double() @ basis
    x_sink = torch.randn(1, 16, generator=g).double() * 3
    u, stats = sink_direction(x_content, x_sink.expand(20, 16))
    assert abs(float(x_sink[0] @ u) - 1) < 1e-9 and stats["leak_rms"] < 1e-2
    unseen = torch.randn(50, 5, generator=g).double() @ basis
    assert float((unseen @ u).abs().max()) < 2e-2


def _sink_at_start(monkeypatch):
    """A random tiny Llama has no massive-activation token; mark each sequence's first token as its sink,
    as SmolLM2's is, so method=sink runs its own path instead of falling back."""
    def first_token(base_model, batch, ratio):
        sinks = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        sinks[:, 0] = True
        return sinks

    monkeypatch.setattr(pipeline, "find_sinks", first_token)


def test_sink_edit_moves_only_the_sink_and_merges(llama_prefix_run, tmp_path, monkeypatch):
    """method=sink target=none on llama_tiny: rank-1 LoRAs on k_proj and v_proj whose change of the keys at
    layer 0 (same inputs in both models) is δ at the sink and at most the recorded leak elsewhere; the
    merged model equals the unmerged adapter; the compiled model is closer to the prefix than the base."""
    _sink_at_start(monkeypatch)
    out = tmp_path / "sink"
    rec = compile_prefix(compile_cfg(llama_prefix_run, "method=sink", "target=none", "merge=true", f"out_dir={out}"))
    assert "fallback" not in rec["fit_stats"]["sink"] and rec["merge"]["max_abs_logit_diff"] < 1e-4
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in weights if "lora_A" in k} == {"k_proj", "v_proj"}
    assert all(w.shape[0] == 1 for k, w in weights.items() if "lora_A" in k)  # rank 1
    layer0 = rec["fit_stats"]["modules"]["model.layers.0.self_attn"]
    base, tok = load_base_model(runs.run_specs(runs.load_run_config(llama_prefix_run))[0])
    compiled = PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapter")).eval()
    batch = dict(tok(["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"], padding=True, return_tensors="pt"))
    keys = {}
    for name, model in (("base", base), ("compiled", compiled)):
        grabbed = []
        attn = (model.get_base_model() if name == "compiled" else model).model.layers[0].self_attn
        hook = attn.k_proj.register_forward_hook(lambda m, a, o: grabbed.append(o))
        with torch.no_grad():
            model(**batch)
        hook.remove()
        keys[name] = grabbed[0]
    change = (keys["compiled"] - keys["base"]).norm(dim=-1)  # (B, T)
    real = batch["attention_mask"].bool()
    sink_change, content_change = change[:, 0], change[:, 1:][real[:, 1:]]
    assert sink_change.min() > 0.1
    assert float(content_change.max() / sink_change.min()) <= layer0["leak_max"] * 1.05 + 1e-6
    assert rec["residual_last_mean"] < 1.0  # nearer the prefix than the base model is


def test_a_window_of_layers_compiles_exactly_like_all_layers(llama_prefix_run, tmp_path, monkeypatch):
    """stream_memory_gb caps the prefix model's activations the fit holds. Below one layer's worth, each
    layer comes from its own forward pass; the compiled adapter must be the one-pass adapter, bit for bit."""
    _sink_at_start(monkeypatch)
    whole = compile_prefix(compile_cfg(llama_prefix_run, f"out_dir={tmp_path / 'whole'}"))
    window = compile_prefix(compile_cfg(llama_prefix_run, "stream_memory_gb=1e-9", f"out_dir={tmp_path / 'window'}"))
    n_layers = len(whole["residuals"]["last"])
    assert n_layers >= 2
    assert (whole["fit_stats"]["streams"]["layers_per_pass"], whole["fit_stats"]["streams"]["passes"]) == (n_layers, 1)
    assert (window["fit_stats"]["streams"]["layers_per_pass"], window["fit_stats"]["streams"]["passes"]) == (1, n_layers)
    a = load_file(str(tmp_path / "whole/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "window/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(float(a[k].abs().max()) > 0 for k in a if "o_proj.lora_B" in k)  # a real fit on every layer
    assert window["residuals"] == whole["residuals"]


def test_prefix_streams_hold_one_window_and_match_a_full_capture():
    """PrefixStreams with room for one layer: each layer equals the full forward's, and asking for the
    next layer replaces the window instead of adding to it."""
    base, source, batch = _tiny_prefix_source()
    parts = micro_batches(batch, 4)
    full = [prefix_stream(source, b, "gpt2") for b in parts]
    streams = fit_module.PrefixStreams(source, parts, "gpt2", max_bytes=1)
    assert len(streams) == len(parts) and streams.layers_per_pass == 1
    for i in range(2):
        for j in range(len(parts)):
            got, want = streams[j][i], full[j][i]
            assert torch.equal(got.h_in, want.h_in) and torch.equal(got.attn, want.attn) and got.mlp is None
        assert all(set(held) == {i} for held in streams._held)
    assert streams.passes == 2
    with pytest.raises(IndexError):
        streams[len(parts)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sink_falls_back_without_a_sink_and_says_so(arch, llama_prefix_run, prefix_run, tmp_path):
    """method=sink is the default. A random tiny Llama parks no attention on its first token, and GPT-2's
    learned positions leave no position-free sink slot: the compile warns, records why, and gives exactly
    the closed form's (method=lstsq) result."""
    run = llama_prefix_run if arch == "llama" else prefix_run
    reason = "first token is an attention sink in" if arch == "llama" else "gpt2 has absolute position embeddings"
    with pytest.warns(UserWarning, match=r"method=sink falls back to the closed form"):
        rec = compile_prefix(compile_cfg(run, f"out_dir={tmp_path / 's'}"))
    plain = compile_prefix(compile_cfg(run, "method=lstsq", f"out_dir={tmp_path / 'l'}"))
    assert rec["method"] == "sink" and plain["method"] == "lstsq"
    assert reason in rec["fit_stats"]["sink"]["fallback"]
    assert rec["residual_last_mean"] == plain["residual_last_mean"]
