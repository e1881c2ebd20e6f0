"""The closed-form fit on problems with known answers, and the layer-by-layer pipeline that feeds it:
statistics summed over micro-batches, one model seen three ways, each layer on the compiled model's own
inputs."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig, get_peft_model

from feta.adapters import compiled_lora_config
from feta.compile.spec import CompileSpec
from feta.compile import layers, memory, sequential
from feta.compile.fit import LstsqStats, numbered_modules, reduced_rank_fit, target_modules
from feta.compile.sequential import fit_sequential
from feta.compile.spec import LAYER
from feta.compile.tokens import detect_sinks, micro_batches
from feta.compile.views import CompileModel, View
from feta.decoding import CachedLM
from feta.schema import to_spec
from tests.conftest import compose_cfg
from tests.helpers.sources import saved, scored_batch, tiny_base, tiny_prefix_source


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


@pytest.mark.parametrize("bias", [False, True])
def test_statistics_summed_over_chunks_give_the_one_batch_fit_and_its_residual(bias):
    """LstsqStats: the fit and the (unweighted) residual from sums over chunks with mixed weights equal those
    of all rows at once, here computed directly."""
    X, W, b = _low_rank_problem(n=300)
    g = torch.Generator().manual_seed(1)
    T = X @ W.T + b + 0.5 * torch.randn(X.shape[0], W.shape[0], generator=g, dtype=torch.float64)
    w = torch.ones(300, dtype=torch.float64)
    w[200:] = 3.0  # weights other than 1 only in the last chunk: the unweighted sums start late
    whole = LstsqStats()
    whole.add(X, T, w)
    chunked = LstsqStats()
    for rows in torch.arange(300).split(70):
        chunked.add(X[rows], T[rows], w[rows])
    A1, B1, b1, r1 = whole.solve(2, 1e-4, bias)
    A2, B2, b2, r2 = chunked.solve(2, 1e-4, bias)
    torch.testing.assert_close(B2 @ A2, B1 @ A1, atol=1e-9, rtol=1e-9)
    direct = (T - X @ (B1 @ A1).T - (b1 if bias else 0)).norm() / T.norm()
    assert abs(r1 - float(direct)) < 1e-9 and abs(r2 - float(direct)) < 1e-9 and 0.05 < r1 < 1


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


# ------------------------------------------------------------------ the layer-by-layer fit


def _fit(cm: CompileModel, batches, spec: CompileSpec, arch: str, sinks=None) -> dict:
    sinks = sinks or [torch.zeros_like(b["attention_mask"], dtype=torch.bool) for b in batches]
    weights = [b["attention_mask"].double().masked_fill(s, 0.0) for b, s in zip(batches, sinks)]
    return fit_sequential(cm, batches, weights, sinks, arch, spec, "cpu")


def _deltas(model, names) -> list[torch.Tensor]:
    out = []
    for name in names:
        m = model.get_submodule(name)
        out.append((m.lora_B["default"].weight @ m.lora_A["default"].weight).detach())
    return out


def _capture(model, name: str, batch, pre: bool) -> torch.Tensor:
    """The input (pre) or output of module `name` in one forward of `model` (a PeftModel: through its adapter)."""
    seen = []
    module = getattr(model, "get_base_model", lambda: model)().get_submodule(name)
    hook = (module.register_forward_pre_hook(lambda m, a: seen.append(a[0])) if pre else
            module.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("model_name", ["gpt2_tiny", "llama_tiny"])
def test_each_layer_is_fitted_on_the_compiled_models_own_inputs(model_name, tmp_path):
    """Known answer, computed directly: layer by layer, full-batch least squares of the prefix model's attention
    output change on the inputs that the model compiled so far (layers < l already fitted) gives o_proj; the
    layer-wise pipeline over micro-batches must give the same LoRAs. Fitting a layer on the prefix model's
    own inputs instead gives another fit, by far more than the tolerance."""
    base, tok = tiny_base(model_name)
    arch = to_spec(compose_cfg("train", [f"model={model_name}"]), "model").arch
    torch.manual_seed(0)
    source = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    batch = scored_batch(tok, [f"Review: a {'very ' * k}good {'and long ' * (k % 3)}film\nSentiment:" for k in range(12)])
    spec = CompileSpec(rank=2, bias=True, method="lstsq")
    names = list(target_modules(base, arch, "o"))
    attn = [n.rsplit(".", 1)[0] for n in names]
    mask = batch["attention_mask"].bool()
    # Direct: one padded batch, each layer from full forwards of the model fitted so far.
    direct = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, names, True, arch)).eval()
    wrong = []
    for name, parent in zip(names, attn):
        module = direct.get_base_model().get_submodule(name)
        x = _capture(direct, name, batch, pre=True)
        target = _capture(source, parent, batch, pre=False) - module.base_layer(x)
        A, B, b = reduced_rank_fit(x[mask], target[mask], 2, spec.ridge, True)
        x_prefix = _capture(source, name, batch, pre=True)  # the prefix model's own input
        A_w, B_w, _ = reduced_rank_fit(x_prefix[mask], target[mask], 2, spec.ridge, True)
        wrong.append((B_w @ A_w).float())
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
            module.lora_B["default"].bias.copy_(b)
    # Layer-wise, over length-sorted micro-batches of 5.
    cm = CompileModel(copy.deepcopy(base), saved(source, tmp_path), "PREFIX_TUNING",
                      compiled_lora_config(2, names, True, arch))
    _fit(cm, micro_batches(batch, 5), spec, arch)
    want, got = _deltas(direct.get_base_model(), names), _deltas(cm.model, names)
    for layer, (w, g, bad) in enumerate(zip(want, got, wrong)):
        assert w.norm() > 1e-3, "a real fit, not zeros"
        assert (g - w).norm() < 1e-3 * w.norm(), layer  # float32 activations, summed in another order
        if layer > 0:  # layer 0's inputs are the same in both models (the embeddings)
            assert (bad - w).norm() > 0.1 * w.norm(), layer


def test_micro_batches_fit_exactly_like_one_batch(tmp_path):
    """The calibration set runs as length-sorted micro-batches; the fitted LoRA must equal the one fitted
    from a single padded batch of the same sentences."""
    base, source, batch = tiny_prefix_source()
    parts = micro_batches(batch, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 3, 3, 1]
    assert sum(int(p["attention_mask"].sum()) for p in parts) == int(batch["attention_mask"].sum())
    assert all(bool(p["attention_mask"][:, -1].any()) for p in parts)  # each cut to its longest row
    assert parts[0]["input_ids"].shape[1] < batch["input_ids"].shape[1]
    adapter = saved(source, tmp_path)
    names = [f"transformer.h.{i}.attn.c_proj" for i in range(2)]

    def fit(batches):
        cm = CompileModel(copy.deepcopy(base), adapter, "PREFIX_TUNING", compiled_lora_config(2, names, True, "gpt2"))
        _fit(cm, batches, CompileSpec(rank=2, bias=True), "gpt2")
        return [(d, cm.model.get_submodule(n).lora_B["default"].bias) for d, n in zip(_deltas(cm.model, names), names)]

    for (w1, b1), (w2, b2) in zip(fit([batch]), fit(parts)):
        assert w1.norm() > 1e-3 * base.transformer.h[0].attn.c_proj.weight.norm()  # a real fit, not zeros
        # Exact up to float32 forwards of differently padded batches: measured |w2 - w1| <= 1e-5 of w1's largest
        # entry (1.9e-6 of 0.19 on gpt2_tiny's layer 1); a fit that saw the padding would be off by percents.
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=5e-5 * float(w1.abs().max()))
        torch.testing.assert_close(b2, b1, rtol=1e-4, atol=1e-6)


class _TwoLoras(CompileModel):
    """A weight-space source, for known answers: adapter "source" of the same PeftModel is the source, adapter
    "default" the LoRA being fitted."""

    def __init__(self, peft_model) -> None:
        self.lora, self.model, self.slots, self.gated, self.m, self.peft_type = peft_model, peft_model.get_base_model(), None, None, 0, "LORA"
        self.base = View(self, self.base_mode)
        self.source = View(self, self.source_mode, self.source_inputs)
        self.compiled = View(self, contextlib.nullcontext)

    @contextlib.contextmanager
    def source_mode(self):
        self.lora.base_model.set_adapter("source")
        try:
            yield
        finally:
            self.lora.base_model.set_adapter("default")


@pytest.mark.parametrize("match", ["module", "stream"])
def test_a_weight_space_source_is_recovered_on_the_modules_it_changed(match):
    """Known answer: a source that IS a rank-2 LoRA on the attention and MLP output projections. The
    closed form with target=o+mlp must recover both updates (so the compiled model equals the
    source); target=o alone cannot reproduce the MLP's change."""
    base, tok = tiny_base()
    names = [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    words = "good bad dull bright slow long short warm cold odd".split()
    texts = [f"Review: a {a} and {b} film, {c} at times\nSentiment:" for a in words for b in words[:6] for c in words[6:8]]
    batches = micro_batches(scored_batch(tok, texts), 16)  # ~1,700 tokens > 256 = d_in of the MLP projection

    def two_loras(target):
        model = get_peft_model(copy.deepcopy(base), compiled_lora_config(
            2, [n for n in names if target == "o+mlp" or ".attn." in n], False, "gpt2"))
        torch.manual_seed(0)
        model.add_adapter("source", LoraConfig(r=2, lora_alpha=2, target_modules=names, fan_in_fan_out=True,
                                               init_lora_weights=False))
        model.base_model.set_adapter("default")
        return _TwoLoras(model.eval())

    both, attn_only = two_loras("o+mlp"), two_loras("o")
    for cm, target in ((both, "o+mlp"), (attn_only, "o")):
        _fit(cm, batches, CompileSpec(rank=2, bias=False, target=target, match=match, ridge=0.0), "gpt2")
    for name in names:
        module = both.model.get_submodule(name)
        src = module.lora_B["source"].weight @ module.lora_A["source"].weight
        assert src.norm() > 0.1
        torch.testing.assert_close(_deltas(both.model, [name])[0], src, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        kw = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
        out = {k: v(**kw, output_hidden_states=True).hidden_states[-1]
               for k, v in (("source", both.source), ("both", both.compiled), ("attn_only", attn_only.compiled),
                            ("base", both.base))}
    rel = lambda k: float((out[k] - out["source"]).norm() / (out["source"] - out["base"]).norm())  # noqa: E731
    assert rel("both") < 1e-4 and rel("attn_only") > 0.05, (rel("both"), rel("attn_only"))


def test_a_source_without_effect_compiles_to_a_zero_lora(tmp_path):
    """LLaMA-Adapter starts with its gates at zero: no effect, so every target is zero and the fitted LoRA
    must be exactly zero (up to float32 round-off). It fails if the source and compiled streams are
    misaligned (another layer, shifted positions): then the targets are of the order of the activations."""
    base, tok = tiny_base("llama_tiny")
    gated = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2))
    names = list(target_modules(base, "llama", "o"))
    cm = CompileModel(copy.deepcopy(base), saved(gated, tmp_path), "ADAPTION_PROMPT",
                      compiled_lora_config(2, names, False, "llama"))
    batch = scored_batch(tok, ["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"])
    _fit(cm, [batch], CompileSpec(rank=2, bias=False), "llama")
    for name, delta in zip(names, _deltas(cm.model, names)):
        assert delta.norm() < 1e-6 * cm.model.get_submodule(name).base_layer.weight.norm(), (name, float(delta.norm()))


def test_sinks_are_left_out_of_the_o_fit_and_held_unchanged_by_the_mlp_fit(monkeypatch, tmp_path):
    """Rows that reach the least squares: an o fit leaves sink tokens out; an MLP fit keeps them with
    target zero (its LoRA must not move the massive activation), and neither changes the weights of
    the other tokens."""
    base, source, batch = tiny_prefix_source()
    sinks = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    sinks[:, 0] = True
    calls = []

    class Spy(LstsqStats):
        def add(self, X, T, w=None):
            calls.append((X, T, w))
            super().add(X, T, w)

    monkeypatch.setattr(sequential, "LstsqStats", Spy)
    names = [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    cm = CompileModel(copy.deepcopy(base), saved(source, tmp_path), "PREFIX_TUNING",
                      compiled_lora_config(2, names, False, "gpt2"))
    _fit(cm, [batch], CompileSpec(rank=2, bias=False, target="o+mlp"), "gpt2", [sinks])
    assert len(calls) == 4  # in forward order: layer 0 o, layer 0 mlp, layer 1 o, layer 1 mlp
    n_content, n_sinks = int((batch["attention_mask"].bool() & ~sinks).sum()), int(sinks.sum())
    for k, (x, target, w) in enumerate(calls):
        if k % 2 == 0:  # o
            assert x.shape[1] == 64 and len(w) == n_content and (w == 1).all()
        else:  # mlp: the content rows and every sink row, whose target is zero
            assert x.shape[1] == 256 and len(w) == n_content + n_sinks and (w == 1).all()
            assert int((target.abs().sum(1) == 0).sum()) == n_sinks


@pytest.mark.parametrize("model_name", ["gpt2_tiny", "llama_tiny"])
def test_the_memory_plan_covers_the_caches_the_fit_holds(model_name, tmp_path):
    """What the compile says it needs before it starts: its calibration caches are at least what the two
    caught streams and the source's attention outputs take, and not more than half as much again."""
    base, tok = tiny_base(model_name)
    arch = to_spec(compose_cfg("train", [f"model={model_name}"]), "model").arch
    source = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    batches = micro_batches(scored_batch(tok, [f"Review: a {'very ' * k}good film\nSentiment:" for k in range(40)]), 8)
    cm = CompileModel(base, saved(source, tmp_path), "PREFIX_TUNING",
                      compiled_lora_config(2, list(target_modules(base, arch, "o")), True, arch))
    need = memory.plan(cm.model, batches, batches, CompileSpec(method="lstsq"), 4, torch.device("cpu"))
    first = cm.model.get_submodule(numbered_modules(cm.model, LAYER[arch], arch)[0])
    compiled, src = (layers.catch(view, first, batches, "cpu") for view in (cm.compiled, cm.source))
    held = compiled.nbytes() + src.nbytes() + sum(h.numel() * h.element_size() for h in compiled.hidden)
    assert held <= need.caches <= 1.5 * held, (held, need.caches)
    assert need.store == "cpu" and need.tokens == sum(b["input_ids"].numel() for b in batches)


@pytest.mark.parametrize("model_name", ["gpt2_tiny", "llama_tiny"])
def test_a_decode_batch_fits_the_memory_it_is_given(model_name):
    """The calibration decode's batch: its rows' KV caches (prefix + prompt + new tokens) take no more than
    the share of `memory_gb` it may use, and the width stays within 1 and DECODE_ROWS."""
    base, tok = tiny_base(model_name)
    source = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids = torch.randint(1, 1000, (2, 20))
    _, cache = CachedLM(source).prefill(ids)
    per_row = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 2
    width = 4 + 20
    small, large = (memory.decode_batch(source, width, memory_gb) for memory_gb in (0.02, 0.2))
    assert 2 <= small and 9 * small <= large < memory.DECODE_ROWS  # in proportion to the memory given
    assert large * per_row <= memory.DECODE_SHARE * 0.2 * memory.GB
    assert memory.decode_batch(source, width, 1e-9) == 1
    assert memory.decode_batch(source, width, 100.0) == memory.DECODE_ROWS
