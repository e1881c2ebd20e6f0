"""The closed-form fit on synthetic problems with known answers, and the prefix model's activations
it reads a window of layers at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file

from compile import compile_prefix
from feta.adapters import compiled_lora_config
from feta.compile import CompileSpec
from feta.compile import fit as fit_module
from feta.compile.fit import fit_lstsq, prefix_stream, reduced_rank_fit
from feta.compile.tokens import detect_sinks, micro_batches
from feta.data import last_real_token
from feta.models import load_base_model
from feta.schema import to_spec
from tests.conftest import compile_cfg, compose_cfg


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


def tiny_prefix_source():

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
    base, source, batch = tiny_prefix_source()
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
    base, source, batch = tiny_prefix_source()
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
    base, source, batch = tiny_prefix_source()
    parts = micro_batches(batch, 3)
    streams = [prefix_stream(source, b, "gpt2") for b in parts][::-1]  # misaligned with the batches
    compiled = get_peft_model(copy.deepcopy(base), compiled_lora_config(
        2, ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"], False, "gpt2"))
    with pytest.raises(RuntimeError, match=r"size"):
        fit_lstsq(compiled, streams, parts, [p["attention_mask"].double() for p in parts], "gpt2", CompileSpec(rank=2, bias=False))


# ------------------------------------------------------------------ on trained tiny runs


def test_prefix_streams_hold_one_window_and_match_a_full_capture():
    """PrefixStreams with room for one layer: each layer equals the full forward's, and asking for the
    next layer replaces the window instead of adding to it."""
    base, source, batch = tiny_prefix_source()
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


def test_a_window_of_layers_compiles_exactly_like_all_layers(llama_prefix_run, first_token_sink, tmp_path):
    """stream_memory_gb caps the prefix model's activations the fit holds. Below one layer's worth, each
    layer comes from its own forward pass; the compiled adapter must be the one-pass adapter, bit for bit."""
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
