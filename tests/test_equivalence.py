"""The FETA claims, tested so that each test can fail.

Real-module tests run tiny random GPT-2 and Llama (GQA: 4 query heads on 2 key/value heads) in float64.
Pure-math tests use random tensors with a known answer, always with N > d_head query positions (else
every span and fit is exact), and each has a control that must come out *not* reproducible.
"""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest
import torch

from feta import equivalence as eq
from feta.adapters import LoraSpec, PrefixSpec, build_adapter
from feta.data.spec import SST2_INSTRUCTION
from feta.models import load_base_model, named_model

F64 = torch.float64
SPECS = {"gpt2": named_model("gpt2_tiny"), "llama": named_model("llama_tiny")}


pytestmark = pytest.mark.usefixtures("one_thread")


def base(arch: str, impl: str = "sdpa"):
    model, tokenizer = load_base_model(SPECS[arch])
    model.set_attn_implementation(impl)
    return model.to(F64).eval(), tokenizer


def data(B: int = 4, T: int = 16, seed: int = 0):
    """Token ids with right padding on two rows, so pad handling is exercised."""
    ids = torch.randint(0, 5000, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, T - 4:] = 0
    mask[-1, T // 2:] = 0
    return ids, mask


def layer_point(arch: str, impl: str = "sdpa", layer: int = 1, m: int = 6, seed: int = 0):
    """A layer of a random model, its captured inputs (base run), and a random prefix (kv_heads, m, dh)."""
    model, _ = base(arch, impl)
    ids, mask = data(seed=seed)
    with torch.no_grad():
        inputs, _ = eq.capture_inputs(model, ids, mask)
    attn = eq.attention_modules(model)[layer]
    H, kvH, dh = eq.geometry(attn)
    gen = torch.Generator().manual_seed(seed + 1)
    prefix = tuple(torch.randn(kvH, m, dh, generator=gen, dtype=F64) for _ in range(2))
    return model, attn, *inputs[layer], mask, prefix


# ---------------------------------------------------------------------------------------------------
# Gating identity, through the real modules.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,impl,tol", [("gpt2", "sdpa", 1e-12), ("gpt2", "eager", 1e-12),
                                           ("llama", "sdpa", 1e-12), ("llama", "eager", 1e-6)])
def test_gating_identity_real_attention(arch, impl, tol):
    model, attn, x, pos, mask, _ = layer_point(arch, impl)
    H, kvH, dh = eq.geometry(attn)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        q, _, _ = eq.project(attn, x, pos)
        # keys along each group's mean query, logits spread over ±8: a generic prefix with λ up to ~1
        qm = torch.stack([q[:, h * (H // kvH):(h + 1) * (H // kvH)].transpose(1, 2)[mask.bool()].reshape(-1, dh).mean(0)
                          for h in range(kvH)])  # (kv_heads, dh)
        t = torch.linspace(-8, 8, 6, dtype=F64)
        spread = t[None, :, None] * qm[:, None] / (attn.scaling * qm.pow(2).sum(-1))[:, None, None]
        # near-constant prefix logits: λ_i ≈ m / (m + i + 1), from ~0.05 (m = 1, late tokens) to ~0.99 (m = 64)
        prefixes = [(spread, torch.randn(kvH, 6, dh, generator=gen, dtype=F64))] + [
            (0.1 * torch.randn(kvH, m, dh, generator=gen, dtype=F64), torch.randn(kvH, m, dh, generator=gen, dtype=F64))
            for m in (1, 64)]
        results = [eq.check_gating(attn, x, pos, p, mask) for p in prefixes]
    lam_min, lam_max = min(r["lam_min"] for r in results), max(r["lam_max"] for r in results)
    assert lam_min < 0.07 and lam_max > 0.98, f"λ must spread over ~0.05-0.99, got [{lam_min}, {lam_max}]"
    for r in results:
        assert r["max_abs_err"] < tol, r
        assert r["pure_vs_module"] < tol, r  # the pure per-group math is the module's math
    assert max(r["max_abs_err"] for r in results) > 0  # computed, not short-circuited


# ---------------------------------------------------------------------------------------------------
# Linearity, jvp vs finite differences, LoRA read-out, content ratios: real modules.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_explicit_mask_matches_the_models_own_attention(arch):
    """The explicit masks of the library against the model's own forward (causal, padding, PEFT prefix)."""
    model, tok = base(arch)
    prefix_model = build_adapter(load_base_model(SPECS[arch])[0], tok, PrefixSpec(m=4, init="text", init_text=SST2_INSTRUCTION),
                                 arch).to(F64).eval()
    ids, mask = data()
    valid = mask.bool()
    for net, prefix in [(model, None), (prefix_model, eq.prefix_of(prefix_model, F64))]:
        attns, outs = eq.attention_modules(net), {}
        hooks = [a.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out[0]))
                 for i, a in enumerate(attns)]
        with torch.no_grad():
            inputs, _ = eq.capture_inputs(net, ids, mask)
        for h in hooks:
            h.remove()
        for l, attn in enumerate(attns):
            m = 0 if prefix is None else prefix[l][0].shape[1]
            mine = eq.module_call(attn, *inputs[l], eq.additive_mask(eq.content_allowed(mask), m, F64),
                                  None if prefix is None else prefix[l])
            assert (mine - outs[l])[valid].abs().max() < 1e-12
    # the text init of the library is PEFT's (which ran in float32, when the adapter was built)
    text = eq.text_prefix(model, torch.tensor(tok(SST2_INSTRUCTION, add_special_tokens=False)["input_ids"][:4]))
    for (k, v), (pk, pv) in zip(text, eq.prefix_of(prefix_model, F64)):
        assert (k - pk).abs().max() < 1e-6 and (v - pv).abs().max() < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_linearity_remainders(arch):
    model, attn, x, pos, mask, prefix = layer_point(arch)
    gen = torch.Generator().manual_seed(5)
    lora = {t: 0.1 * eq.math_weight(attn, t).norm() * eq.random_lowrank(eq.math_weight(attn, t).shape, 4, gen, F64)
            for t in eq.TARGETS}
    with torch.no_grad():
        at_prefix = eq.check_linearity(attn, x, pos, mask, prefix, {}, seed=0)
        at_lora = eq.check_linearity(attn, x, pos, mask, None, lora, seed=1)
    for res in (at_prefix, at_lora):
        for name in ("prefix", "q", "k"):
            if name in res:
                r = res[name]
                ratios = [a / b for a, b in zip(r[:-1], r[1:])]
                assert all(7 < f < 14 for f in ratios), f"{name}: remainder {r} must fall ~10x per 10x smaller step"
        for name in ("v", "o"):
            assert max(res[name]) <= 1e-10, f"{name} is exactly linear in ΔW: remainder {res[name]} must be roundoff"


def output_perturbation(attn, groups, target: str, delta) -> torch.Tensor:
    """The library's per-group J·δ, assembled over groups and mapped through o_proj: (N, d)."""
    H, kvH, dh = eq.geometry(attn)
    N = int(groups[0].valid.sum())
    dz = torch.zeros(N, H * dh, dtype=F64)
    for h, gr in enumerate(groups):
        d = delta[:, h] if target == "prefix" else eq.group_delta(attn, target, delta)[gr.rows(target)]
        dz[:, gr.q_rows] = eq.perturbation(gr, target, d).view(N, -1)
    return dz @ eq.math_weight(attn, "o").T


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_jvp_matches_finite_difference_of_real_module(arch):
    model, attn, x, pos, mask, prefix = layer_point(arch)
    valid, m = mask.bool(), prefix[0].shape[1]
    full_mask = eq.additive_mask(eq.content_allowed(mask), m, F64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        groups = eq.layer_groups(attn, x, pos, prefix, mask)
        P = torch.stack(prefix)
        dirs = {"prefix": torch.randn(P.shape, generator=gen, dtype=F64) * P.norm() / P.numel() ** 0.5}
        dirs.update({t: eq.math_weight(attn, t).norm() * eq.random_lowrank(eq.math_weight(attn, t).shape, 2, gen, F64)
                     for t in eq.TARGETS})
        h = 1e-5
        for target, d in dirs.items():
            def run(s):
                if target == "prefix":
                    return eq.module_call(attn, x, pos, full_mask, (P[0] + s * d[0], P[1] + s * d[1]))[valid]
                return eq.module_call(attn, x, pos, full_mask, prefix, {target: s * d})[valid]
            fd = (run(h) - run(-h)) / (2 * h)  # central difference of the real module: here, not in the library
            lib = output_perturbation(attn, groups, target, d)
            rel = float((lib - fd).norm() / fd.norm())
            assert rel < 1e-6, f"{arch} {target}: jvp vs finite difference, relative error {rel}"
            # group_map is exact, not only to first order: at a finite step, its change mapped through W_o
            # (for o: M = W_o⁻¹ΔW_o before o_proj) is the real module's change
            step = 0.3 * d
            group_steps = [step[:, h] if target == "prefix" else eq.group_delta(attn, target, step)[gr.rows(target)]
                           for h, gr in enumerate(groups)]
            mine = torch.cat([eq.group_map(gr, target)(s).view(fd.shape[0], -1) for gr, s in zip(groups, group_steps)], 1)
            z0 = torch.cat([gr.z.transpose(1, 2)[valid].reshape(fd.shape[0], -1) for gr in groups], dim=1)
            moved = ((mine - z0) @ eq.math_weight(attn, "o").T) - (run(0.3) - run(0.0))
            assert moved.abs().max() < 1e-12, f"{arch} {target}: group_map vs module at a finite step"


@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn", "c_proj"]),
                                          ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_lora_deltas_by_layer_reproduce_peft_lora(arch, targets):
    model, tok = load_base_model(SPECS[arch])
    lora = build_adapter(model, tok, LoraSpec(r=4, targets=targets), arch).to(F64).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        deltas = eq.lora_deltas_by_layer(lora)
        assert sorted(deltas[0]) == ["k", "o", "q", "v"]
        ids, mask = data()
        inputs, _ = eq.capture_inputs(lora, ids, mask)
        plain, _ = base(arch)
        for l, (attn_lora, attn) in enumerate(zip(eq.attention_modules(lora), eq.attention_modules(plain))):
            x, pos = inputs[l]
            m4 = eq.additive_mask(eq.content_allowed(mask), 0, F64)
            want = eq.module_call(attn_lora, x, pos, m4)
            got = eq.module_call(attn, x, pos, m4, deltas=deltas[l])
            assert (want - got).abs().max() < 1e-12
            assert (want - eq.module_call(attn, x, pos, m4)).abs().max() > 1e-3  # the LoRA does something


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_content_ratios_prefix_keeps_lora_qk_changes(arch):
    model, attn, x, pos, mask, prefix = layer_point(arch)
    gen = torch.Generator().manual_seed(9)
    lora = {t: 0.1 * eq.math_weight(attn, t).norm() * eq.random_lowrank(eq.math_weight(attn, t).shape, 4, gen, F64)
            for t in ("q", "k")}
    with torch.no_grad():
        r = eq.check_content_ratios(attn, (x, pos), (x, pos), prefix, mask, lora)
    assert r["prefix_fixed_inputs"] < 1e-12
    assert r["lora_q"] > 1e-3 and r["lora_k"] > 1e-3


# ---------------------------------------------------------------------------------------------------
# Known answers on random tensors: spans, ranks, least squares.
# ---------------------------------------------------------------------------------------------------

def random_group(B=2, T=8, dh=4, d=8, m=3, pk=None, pv=None, g=1, seed=0, wseed=100, pad=False) -> eq.Group:
    """One key/value head with g query heads: random weights and prefix (from wseed), random inputs (from
    seed). Two seeds with one wseed are the same layer on fit and held-out data. pad: the last row is
    half padding."""
    w = torch.Generator().manual_seed(wseed)
    Wq, Wk, Wv = (torch.randn(n, d, generator=w, dtype=F64) / d**0.5 for n in (g * dh, dh, dh))
    pk_, pv_ = torch.randn(m, dh, generator=w, dtype=F64), torch.randn(m, dh, generator=w, dtype=F64)
    pk, pv = (pk_ if pk is None else pk), (pv_ if pv is None else pv)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    q, k, v = (x @ Wq.T).view(B, T, g, dh).transpose(1, 2), x @ Wk.T, x @ Wv.T
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[0, T // 2:] = 0
    allowed = eq.content_allowed(mask)
    z = eq.attend(q, k, v, pk, pv, allowed, 0.5)
    return eq.Group(q, k, v, pk, pv, z, z.transpose(1, 2).reshape(B, T, g * dh), x, None, None, allowed, mask.bool(),
                    0.5, slice(0, g * dh), slice(0, dh))


def fit_and_heldout(J_fit, y_fit, J_held, y_held) -> tuple[float, float]:
    """Relative residuals of the minimum-norm least-squares fit, in sample and on held-out data."""
    r = eq.ridge_residuals(J_fit, y_fit[:, None], J_held, y_held[:, None])[0, :, 0]
    return float((r[0] / y_fit.pow(2).sum()).sqrt()), float((r[1] / y_held.pow(2).sum()).sqrt())


def share_outside(U, deltas) -> float:
    o, e = zip(*(eq.outside_energy(U, d) for d in deltas))
    return sum(o) / sum(e)


def lora_perturbations(gr, n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {t: [eq.perturbation(gr, t, torch.randn(gr.delta_shape(t), generator=gen, dtype=F64)) for _ in range(n)]
            for t in eq.TARGETS}


def test_zero_or_identical_prefix_keeps_rank_of_m1():
    dh, N = 4, 16  # N > dh: not vacuous
    gen = torch.Generator().manual_seed(0)
    p, w = torch.randn(dh, generator=gen, dtype=F64), torch.randn(dh, generator=gen, dtype=F64)
    for m in (1, 2, 4, 8):
        for pk, pv in [(torch.zeros(m, dh, dtype=F64),) * 2, (p.expand(m, dh), w.expand(m, dh))]:
            U, _ = eq.span_basis(eq.jacobian(random_group(pk=pk, pv=pv, m=m), "prefix"), 1e-8)
            assert U.shape[1] == 2 * dh, f"m={m}: {U.shape[1]} != 2·d_head"
    generic = eq.span_basis(eq.jacobian(random_group(m=4), "prefix"), 1e-8)[0].shape[1]
    assert generic == eq.rank_formulas(4, N, dh)["total"] > 2 * dh  # control: distinct tokens do add rank


@pytest.mark.parametrize("m,B,T", [(2, 2, 8), (8, 2, 8), (24, 2, 8), (3, 1, 3)])
def test_rank_formulas_match_measured_ranks(m, B, T):
    gr, dh = random_group(B=B, T=T, m=m), 4
    J = eq.jacobian(gr, "prefix")
    f = eq.rank_formulas(m, B * T, dh)
    assert eq.span_basis(J[:, : m * dh], 1e-8)[0].shape[1] == f["key"]
    assert eq.span_basis(J[:, m * dh:], 1e-8)[0].shape[1] == f["value"]
    assert eq.span_basis(J, 1e-8)[0].shape[1] == f["total"]


def test_m_at_least_N_reproduces_any_lora():
    dh, N = 4, 6  # N > d_head, so only the prefix length makes this exact
    gen = torch.Generator().manual_seed(1)
    for m, reproducible in [(6, True), (8, True), (2, False)]:
        gr, held = random_group(B=1, T=N, dh=dh, m=m), random_group(B=1, T=N, dh=dh, m=m, seed=1)
        J, J_held = eq.jacobian(gr, "prefix"), eq.jacobian(held, "prefix")
        U, _ = eq.span_basis(J, 1e-10)
        for t in eq.TARGETS:
            dW = torch.randn(gr.delta_shape(t), generator=gen, dtype=F64)
            fit, heldout = fit_and_heldout(J, eq.perturbation(gr, t, dW), J_held, eq.perturbation(held, t, dW))
            share = share_outside(U, [eq.perturbation(gr, t, dW)])
            if reproducible:
                assert share < 1e-20 and fit < 1e-8, f"m={m} ≥ N={N}: LoRA on {t} is in the span ({share}, {fit})"
                assert heldout > 0.1, f"m={m}: exact in sample is a vacuous pass; held-out {heldout} must show it"
            else:
                assert share > 1e-3, f"control m={m} < N={N}: LoRA on {t} should not be reproducible, share {share}"


def query_to_prefix_part(gr: eq.Group, dq: torch.Tensor) -> torch.Tensor:
    """The part of a query perturbation's effect that flows through the scores against prefix keys."""
    def f(q_prefix):
        s_p = gr.scale * torch.einsum("bgtd,md->bgtm", q_prefix, gr.pk)
        s_c = (gr.scale * torch.einsum("bgtd,bsd->bgts", gr.q, gr.k)).masked_fill(~gr.allowed[:, None], -1e300)
        a = torch.softmax(torch.cat([s_p, s_c], -1), -1)
        m = gr.pk.shape[0]
        z = torch.einsum("bgtm,md->bgtd", a[..., :m], gr.pv) + torch.einsum("bgts,bsd->bgtd", a[..., m:], gr.v)
        return z.transpose(1, 2)[gr.valid].reshape(-1)
    return torch.func.jvp(f, (gr.q,), (dq,))[1]


def test_query_lora_content_to_prefix_part_reproducible_iff_N_le_dhead():
    dh, m, d = 6, 3, 10
    gen = torch.Generator().manual_seed(3)
    for N, reproducible in [(4, True), (6, True), (12, False)]:
        gr, held = random_group(B=1, T=N, dh=dh, d=d, m=m), random_group(B=1, T=N, dh=dh, d=d, m=m, seed=1)
        dWq = torch.randn(dh, d, generator=gen, dtype=F64)  # one query LoRA, applied to both data sets
        y, y_held = (query_to_prefix_part(g_, (g_.x @ dWq.T)[:, None]) for g_ in (gr, held))
        J, J_held = (eq.jacobian(g_, "prefix")[:, : m * dh] for g_ in (gr, held))  # key part only
        share = share_outside(eq.span_basis(J, 1e-10)[0], [y])
        fit, heldout = fit_and_heldout(J, y, J_held, y_held)
        if reproducible:
            assert share < 1e-20 and fit < 1e-8, f"N={N} ≤ d_head={dh}: share outside {share}, fit {fit}"
            assert heldout > 0.1, f"N={N}: in-sample exactness must not pass for transfer, held-out {heldout}"
        else:
            assert share > 1e-3, f"control N={N} > d_head={dh}: share outside {share}"


def test_design_matrices_reproduce_the_jacobian():
    """The small design matrices of the separable maps (v, o) give exactly J·vec(δ)."""
    gr = random_group(B=2, T=8, dh=4, d=8, m=3, g=2, pad=True)  # GQA: two query heads share one key/value head
    gen = torch.Generator().manual_seed(2)
    for t in ("v", "o"):
        delta = torch.randn(gr.delta_shape(t), generator=gen, dtype=F64)
        D = eq.design(gr, t)
        assert ((D @ delta.T).reshape(-1) - eq.perturbation(gr, t, delta)).abs().max() < 1e-13
        assert ((D @ delta.T).reshape(-1) - eq.jacobian(gr, t) @ delta.reshape(-1)).abs().max() < 1e-13


def test_span_recovers_planted_and_random_baseline():
    gen = torch.Generator().manual_seed(0)
    rows, cols, rank = 400, 60, 30
    J = torch.randn(rows, rank, generator=gen, dtype=F64) @ torch.randn(rank, cols, generator=gen, dtype=F64)
    U, _ = eq.span_basis(J, 1e-8)
    assert U.shape[1] == rank
    planted = [J @ torch.randn(cols, generator=gen, dtype=F64) for _ in range(20)]
    assert share_outside(U, planted) < 1e-24
    random = [torch.randn(rows, generator=gen, dtype=F64) for _ in range(200)]
    assert abs(share_outside(U, random) - (1 - rank / rows)) < 0.01


def test_ridge_fit_and_heldout_side_by_side():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    cols, w = 40, r(40, 1)
    J_fit, J_held = r(300, cols), r(300, cols)
    noise = 1e-3
    res = eq.ridge_residuals(J_fit, J_fit @ w + noise * r(300, 1), J_held, J_held @ w + noise * r(300, 1))
    rel = (res[..., 0] / (J_fit @ w).pow(2).sum()).sqrt()  # (alphas, 2)
    assert (rel[:2] < 1e-3).all(), rel  # a well-posed fit: fit and held-out both at the noise level
    # Vacuous: fewer rows than unknowns. The fit is exact, the held-out residual tells the truth.
    J_small = r(30, cols)
    y_small, y_held = r(30, 1), r(300, 1)
    res = eq.ridge_residuals(J_small, y_small, J_held, y_held)
    fit, held = (res[0, 0, 0] / y_small.pow(2).sum()).sqrt(), (res[0, 1, 0] / y_held.pow(2).sum()).sqrt()
    assert fit < 1e-10 and held > 0.5, (fit, held)


def test_content_log_attention_pure():
    gen = torch.Generator().manual_seed(0)
    B, H, T, dh, m = 2, 3, 10, 4, 5
    q, k = torch.randn(B, H, T, dh, generator=gen, dtype=F64), torch.randn(B, H, T, dh, generator=gen, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.long)
    allowed, valid = eq.content_allowed(mask), mask.bool()
    pk = 3 * torch.randn(H, m, dh, generator=gen, dtype=F64)
    base = eq.content_log_attention(q, k, pk[:, :0], allowed, 0.5)
    assert eq.ratio_change(eq.content_log_attention(q, k, pk, allowed, 0.5), base, allowed, valid) < 1e-13
    moved = eq.content_log_attention(q + 0.1 * torch.randn(q.shape, generator=gen, dtype=F64), k, pk[:, :0], allowed, 0.5)
    assert eq.ratio_change(moved, base, allowed, valid) > 1e-2


# ---------------------------------------------------------------------------------------------------
# The public entry point on a tiny random GPT-2.
# ---------------------------------------------------------------------------------------------------

def adapted(arch: str, seed: int = 0):
    """(base, prefix model, LoRA model) on separate copies: PEFT's LoRA edits its base in place."""
    model, tok = base(arch)
    prefix = build_adapter(load_base_model(SPECS[arch])[0], tok, PrefixSpec(m=4, init="text", init_text=SST2_INSTRUCTION), arch)
    lora = build_adapter(load_base_model(SPECS[arch])[0], tok, LoraSpec(r=4), arch)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "trained": move off the init, so nothing sits at a special point
        emb = prefix.prompt_encoder["default"].embedding.weight
        emb.add_(0.3 * emb.std() * torch.randn(emb.shape, generator=gen))
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return model, prefix, lora


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_analyze_writes_json_and_figures(tmp_path, arch):
    model, prefix, lora = adapted(arch)
    ids, mask = data(B=8, T=20)  # 148 real tokens > d = 64
    heads = [0] if arch == "llama" else None  # Llama: one key/value head with its two query heads
    res = eq.analyze(model, prefix, lora, ids, mask, tmp_path, layers=[1], heads=heads, ms=(1, 4), rs=(1, 4), draws=1)
    on_disk = json.loads((tmp_path / "equivalence.json").read_text())
    assert on_disk["setup"]["N_real_tokens"] == res["setup"]["N_real_tokens"] == int(mask.sum())
    gat = on_disk["gating"]
    assert gat["max_abs_err"] < 1e-12 and gat["pure_vs_module"] < 1e-12 and 0 < gat["lam_min"] <= gat["lam_max"] < 1
    assert on_disk["setup"]["peft_prefix_logits_match"] < 1e-10
    for where in ("at_prefix", "at_lora"):
        for name, r in on_disk["linearity"][where].items():
            assert len(r) == len(eq.EPS) and all(0 <= v < 1 for v in r), (where, name, r)
    assert set(on_disk["linearity"]["at_prefix"]) == {"prefix", "q", "k", "v", "o"}
    for p in ("trained", "text"):
        point = on_disk["span"]["points"][p]
        assert all(0 <= b < 1 for b in point["baseline"])
        for t in eq.TARGETS:
            for row in point["outside"][t] + point["source_outside"].get(t, []):
                assert all(0 <= v <= 1 for v in row), (p, t, row)
    for row in on_disk["content_ratios"]:  # the default LoRA targets include q on both architectures
        assert row["prefix_fixed_inputs"] < 1e-12 and row["lora_q"] > 1e-6
    for way in ("prefix_to_lora", "lora_to_prefix"):
        for t, v in on_disk["conversion"][way].items():
            assert all(0 <= f < 10 for f in v["fit"]) and all(0 <= h < 1e6 for h in v["heldout"]), (way, t, v)
            assert not v["vacuous"], (way, t, v)
    sp = on_disk["spectrum"]
    assert sp["rank_value"] == sp["formula_value"] and sp["rank_key"] == sp["formula_key"]
    assert len(on_disk["verdicts"]) == 5 and on_disk["verdicts"][0]["verdict"] == "exact"

    for name in ("linearity.png", "span_grid.png", "prefix_spectrum.png"):
        path = tmp_path / name
        assert path.stat().st_size > 10_000, name
        img = mpimg.imread(path)
        assert img[..., :3].std() > 0.05, f"{name} is (nearly) a single colour"


def test_analyze_rejects_vacuous_data_and_adapted_base(tmp_path):
    model, prefix, lora = adapted("gpt2")
    ids = torch.randint(0, 5000, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match=r"12 real tokens ≤ d_head = 16.*vacuous"):
        eq.analyze(model, prefix, None, ids, mask, tmp_path)
    with pytest.raises(ValueError, match="base_model has LoRA layers"):
        eq.analyze(lora.get_base_model(), prefix, None, *data(B=8, T=20), tmp_path)


@pytest.mark.slow
def test_analyze_llama_default_grid(tmp_path):
    """The default m × r grid (1…32 each) on one Llama layer: ranks follow the formulas up to m = 32."""
    model, prefix, lora = adapted("llama")
    ids, mask = data(B=12, T=24)
    res = eq.analyze(model, prefix, lora, ids, mask, tmp_path, layers=[1], draws=1)
    assert res["gating"]["max_abs_err"] < 1e-12
    sp = res["spectrum"]
    assert sp["ms"] == [1, 2, 4, 8, 16, 32] and sp["rank_value"] == sp["formula_value"] and sp["rank_key"] == sp["formula_key"]
    assert len(res["span"]["points"]["text"]["outside"]["q"]) == 6 and not res["span"]["boundary_at_r_eq_m"]
    assert (tmp_path / "span_grid.png").stat().st_size > 10_000
