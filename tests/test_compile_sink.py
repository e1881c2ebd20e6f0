"""method=sink, the default compile: the prefix folded into the attention sink's key and value, then
the closed form on o_proj; and its fallback where a model has no sink."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from compile import compile_prefix
from feta import runs
from feta.compile.sink import collect_rows, fit_layer, merged_key_value, sink_direction
from feta.attention import rotate
from feta.models import load_base_model
from tests.conftest import compile_cfg


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


def test_sink_edit_moves_only_the_sink_and_merges(llama_prefix_run, first_token_sink, tmp_path):
    """method=sink target=none on llama_tiny: rank-1 LoRAs on k_proj and v_proj whose change of the keys at
    layer 0 (same inputs in both models) is δ at the sink and at most the recorded leak elsewhere; the
    merged model equals the unmerged adapter; the compiled model is closer to the prefix than the base."""
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


def test_a_compile_that_barely_moves_says_so_in_one_line(llama_prefix_run, tmp_path, caplog):
    """A ridge a million times the inputs' scale shrinks the closed form to ~0: the compiled model is the base
    model, and the compile ends with one warning naming both agreements and what to try; the default fit
    does not warn. (target=none where no sink applies would fit nothing at all: refused up front.)"""
    with pytest.raises(ValueError, match=r"target=none: method=sink cannot apply .*; set target=o"):
        compile_prefix(compile_cfg(llama_prefix_run, "method=sink", "target=none", f"out_dir={tmp_path / 'n'}"))
    assert not (tmp_path / "n").exists()
    with caplog.at_level("WARNING", logger="feta"):
        rec = compile_prefix(compile_cfg(llama_prefix_run, "method=lstsq", "bias=false", "ridge=1e6",
                                         f"out_dir={tmp_path / 'r'}"))
    nt = rec["next_token"]
    assert abs(nt["next_token_agreement"] - nt["base_next_token_agreement"]) <= 1 / nt["positions"] and nt["base_next_token_agreement"] < 0.99
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "feta"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"next-token agreement {nt['next_token_agreement']:.3f}, the base model's {nt['base_next_token_agreement']:.3f}" in lines[0]
    assert "preset=faithful" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="feta"):
        compile_prefix(compile_cfg(llama_prefix_run, "method=lstsq", f"out_dir={tmp_path / 'l'}"))
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "feta"]
