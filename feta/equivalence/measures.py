"""The five measurements, one layer at a time: the gating identity, linearity, content attention
ratios, the prefix span against LoRA perturbations (the m × r grid and its spectrum), and least-squares
conversion both ways.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from feta.attention import additive_mask, content_allowed, gate, rotate
from feta.equivalence.attention import (ALPHAS, KV, TARGETS, Inputs, Rotary, content_log_attention, design, jacobian,
                                        outside_energy, perturbation, random_lowrank, rank_formulas, ratio_change,
                                        remainders, ridge_residuals, span_basis, truncate)
from feta.equivalence.capture import (attention_modules, capture_inputs, geometry, group_delta, layer_groups,
                                      math_weight, module_call, project)

PrefixAt = Callable[[int], list[KV] | None]  # m -> the per-layer prefix of length m at a point, None if it has none


def check_gating(attn: torch.nn.Module, x: Tensor, pos: Rotary, prefix: KV, attention_mask: Tensor) -> dict[str, float]:
    """The real module with the prefix as KV cache vs (1−λ)·Attn(content) + λ·Attn(prefix): both
    attentions are the real module with the other part masked out; λ is the log-sum-exp formula on the
    captured q, k. Compared per head before o_proj (λ differs per head); also pure `attend` vs module."""
    allowed, valid = content_allowed(attention_mask), attention_mask.bool()
    (B, T, _), (H, _, dh), m = x.shape, geometry(attn), prefix[0].shape[1]
    z = {keep: module_call(attn, x, pos, additive_mask(allowed, 0 if keep == "content" else m, x.dtype, keep),
                           None if keep == "content" else prefix, capture_z=True).view(B, T, H, dh)
         for keep in ("all", "content", "prefix")}
    err, pure, lams = 0.0, 0.0, []
    for gr in layer_groups(attn, x, pos, prefix, attention_mask):
        lam = gate(gr.q, gr.k, gr.v, gr.pk, gr.pv, gr.allowed, gr.scale)[0].transpose(1, 2)[..., None]  # (B, T, g, 1)
        hs = slice(gr.q_rows.start // dh, gr.q_rows.stop // dh)
        mix = (1 - lam) * z["content"][:, :, hs] + lam * z["prefix"][:, :, hs]
        err = max(err, float((z["all"][:, :, hs] - mix)[valid].abs().max()))
        pure = max(pure, float((gr.z.transpose(1, 2) - z["all"][:, :, hs])[valid].abs().max()))
        lams.append(lam[valid].flatten())
    lam = torch.cat(lams)
    return {"max_abs_err": err, "pure_vs_module": pure, "lam_min": float(lam.min()), "lam_max": float(lam.max())}


def check_linearity(attn: torch.nn.Module, x: Tensor, pos: Rotary, attention_mask: Tensor, prefix: KV | None,
                    deltas: dict[str, Tensor], seed: int) -> dict[str, list[float]]:
    """Remainders through the real module (output after o_proj, real tokens) at the point (prefix, W + deltas),
    for the prefix map (if a prefix is given) and LoRA on q, k, v, o. Seeded random directions: the
    prefix's scaled to ‖P‖, LoRA's of rank 4 scaled to ‖W‖, so that ε is a relative step."""
    gen, valid = torch.Generator().manual_seed(seed), attention_mask.bool()
    mask = additive_mask(content_allowed(attention_mask), prefix[0].shape[1] if prefix else 0, x.dtype)
    run = lambda P, ds: module_call(attn, x, pos, mask, P, ds)[valid]  # noqa: E731  (N, d)
    out = {}
    if prefix is not None:
        P0 = torch.stack(prefix)  # (2, kv_heads, m, dh)
        dP = torch.randn(P0.shape, generator=gen, dtype=x.dtype)
        out["prefix"] = remainders(lambda P: run((P[0], P[1]), deltas), P0, dP * P0.norm() / dP.norm())
    for t in TARGETS:
        W = math_weight(attn, t)
        moved = lambda D, t=t: run(prefix, {**deltas, t: deltas[t] + D if t in deltas else D})  # noqa: E731
        out[t] = remainders(moved, torch.zeros_like(W), random_lowrank(W.shape, 4, gen, x.dtype) * W.norm())
    return out


def check_content_ratios(attn: torch.nn.Module, point_in: Inputs, base_in: Inputs, prefix: KV, attention_mask: Tensor,
                         deltas: dict[str, Tensor]) -> dict[str, float]:
    """max |Δ log(attention ratio)| among content tokens: the prefix at fixed inputs (the same q, k with
    and without the prefix keys) and at each model's own inputs; LoRA on q or k at the base inputs."""
    H, kvH, dh = geometry(attn)
    allowed, valid = content_allowed(attention_mask), attention_mask.bool()
    rep = lambda t, dim=1: t.repeat_interleave(H // kvH, dim=dim)  # noqa: E731  key heads -> query heads
    log_att = lambda q, k, pk=torch.zeros(H, 0, dh, dtype=prefix[0].dtype): content_log_attention(  # noqa: E731
        q, rep(k), pk, allowed, attn.scaling)
    q, k, _ = project(attn, *point_in)
    qb, kb, _ = project(attn, *base_in)
    l_prefix, l_base = log_att(q, k, rep(prefix[0], 0)), log_att(qb, kb)
    out = {"prefix_fixed_inputs": ratio_change(l_prefix, log_att(q, k), allowed, valid),
           "prefix_own_inputs": ratio_change(l_prefix, l_base, allowed, valid)}
    (x, pos), (B, T, _) = base_in, base_in[0].shape
    for t in ("q", "k"):
        if t in deltas:
            d = rotate((x @ deltas[t].T).view(B, T, -1, dh).transpose(1, 2), *(pos or (None, None)))
            moved = log_att(qb + d, kb) if t == "q" else log_att(qb, kb + d)
            out[f"lora_{t}"] = ratio_change(moved, l_base, allowed, valid)
    return out


def span_point(base: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prefix_at: PrefixAt, layers: list[int],
               heads: list[int], ms: Sequence[int], rs: Sequence[int], source: list[dict[str, Tensor]], rtol: float,
               draws: int, seed: int) -> dict:
    """The reproducibility grid at one point: for each m, the span of the prefix map (m tokens; inputs from
    the model run with them), and the energy share outside it of (a) random rank-r LoRA perturbations on
    q, k, v, o, the same directions at every m and point; (b) the LoRA source truncated to rank r;
    (c) a random vector, 1 − rank/dim. For (a) the expected share cannot depend on r: Gaussian factors
    give E[vec(BA) vec(BA)ᵀ] = r·I, so r only changes the sampling noise. (b) is where r can matter.
    prefix_at(m) gives the per-layer prefix, or None where the point has no prefix of length m."""
    attns, gen = attention_modules(base), torch.Generator().manual_seed(seed)
    dirs = {(l, t, r, i): random_lowrank(group_delta(attns[l], t, math_weight(attns[l], t)).shape, r, gen, base.dtype)
            for l in layers for t in TARGETS for r in rs for i in range(draws)}
    dirs.update({(l, t, r, "source"): group_delta(attns[l], t, truncate(dW, r))
                 for l in layers for t, dW in source[l].items() for r in rs})
    energy = {kind: torch.zeros(2, len(TARGETS), len(ms), len(rs), dtype=torch.float64) for kind in ("random", "source")}
    rank, dim = torch.zeros(len(ms), dtype=torch.float64), torch.zeros(len(ms), dtype=torch.float64)
    for mi, m in enumerate(ms):
        prefix = prefix_at(m)
        if prefix is None:  # no prefix of length m at this point: NaN (None in the JSON)
            rank[mi] = dim[mi] = float("nan")
            continue
        inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
        for l in layers:
            groups = layer_groups(attns[l], *inputs[l], prefix[l], attention_mask)
            for gr in (groups[h] for h in heads):
                J = jacobian(gr, "prefix")  # (N·g·dh, 2·m·dh)
                U, _ = span_basis(J, rtol)
                rank[mi], dim[mi] = rank[mi] + U.shape[1], dim[mi] + J.shape[0]
                for (ti, t), (ri, r) in ((a, b) for a in enumerate(TARGETS) for b in enumerate(rs)):
                    for i in [*range(draws), "source"]:
                        if (l, t, r, i) in dirs:
                            o_e = outside_energy(U, perturbation(gr, t, dirs[(l, t, r, i)][gr.rows(t)]))
                            energy["source" if i == "source" else "random"][:, ti, mi, ri] += torch.tensor(o_e)
    share = {kind: e[0] / e[1] for kind, e in energy.items()}  # (targets, m, r)
    return {"outside": {t: share["random"][ti].tolist() for ti, t in enumerate(TARGETS)},
            "source_outside": {t: share["source"][ti].tolist() for ti, t in enumerate(TARGETS) if t in source[layers[0]]},
            "baseline": (1 - rank / dim).tolist(), "rank": rank.tolist(), "dim": dim.tolist()}


def prefix_spectrum(base: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prefix_at: PrefixAt, layer: int,
                    heads: list[int], ms: Sequence[int], rtol: float) -> dict:
    """Singular spectrum of one layer's prefix span vs m, summed over the groups: the measured rank of
    the whole map and of its key and value parts, beside the rank formulas."""
    attn = attention_modules(base)[layer]
    parts = ("total", "key", "value")
    res: dict = {"ms": [], "spectrum": [], **{f"{w}_{p}": [] for w in ("rank", "formula") for p in parts}}
    for m in ms:
        prefix = prefix_at(m)
        if prefix is None:
            continue
        inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
        groups = layer_groups(attn, *inputs[layer], prefix[layer], attention_mask)
        sv, counts = [], dict.fromkeys(res.keys() - {"ms", "spectrum"}, 0)
        for gr in (groups[h] for h in heads):
            J = jacobian(gr, "prefix")  # key columns, then value columns
            half = J.shape[1] // 2
            for part, cols in zip(parts, (slice(None), slice(0, half), slice(half, None))):
                s = torch.linalg.svdvals(J[:, cols])  # singular values only: no basis needed here
                counts[f"rank_{part}"] += int((s > rtol * s[0]).sum())
                sv += [s] if part == "total" else []
            for part, n in rank_formulas(m, int(gr.valid.sum()), gr.q.shape[-1], gr.q.shape[1]).items():
                counts[f"formula_{part}"] += n
        s_all = torch.cat(sv).sort(descending=True).values
        res["ms"].append(m)
        res["spectrum"].append((s_all / s_all[0]).tolist())
        for key, n in counts.items():
            res[key].append(n)
    return res


def conversion(base: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prefix: list[KV], layers: list[int],
               heads: list[int], source: list[dict[str, Tensor]], seed: int, max_entries: float = 3e7) -> dict:
    """Least-squares conversion at the trained prefix, first order, both ways: prefix → LoRA (a random δP
    scaled to ‖P‖, fitted by a full-rank ΔW on one target) and LoRA → prefix (the LoRA source's
    perturbation on one target, fitted by δP). Fit on the first half of the sentences, held out on the
    rest; residuals pooled over layers and groups. q and k need their whole Jacobian (no separable
    form): above max_entries entries they are skipped, and the JSON says so."""
    attns, gen = attention_modules(base), torch.Generator().manual_seed(seed)
    B = input_ids.shape[0]
    parts = slice(0, (B + 1) // 2), slice((B + 1) // 2, B)
    inputs, _ = capture_inputs(base, input_ids, attention_mask, prefix)
    acc: dict = {}
    out: dict = {"alphas": list(ALPHAS), "prefix_to_lora": {}, "lora_to_prefix": {}, "skipped": set()}

    def add(way, t, r, y2, D):  # pool squared residuals (alphas, 2) and squared target norms (2,)
        res, n2 = acc.get((way, t), (0, 0))
        acc[(way, t)] = (res + r, n2 + y2)
        out[way].setdefault(t, {"unknowns_per_output": D.shape[1], "fit_rows_per_group": D.shape[0],
                                "vacuous": D.shape[0] <= D.shape[1]})  # then any fit is exact

    for l in layers:
        x, pos = inputs[l]
        sub = lambda p: (x[p], None if pos is None else tuple(c[p] if c.shape[0] == B else c for c in pos))  # noqa: E731
        gfit, gheld = (layer_groups(attns[l], *sub(p), prefix[l], attention_mask[p]) for p in parts)
        src = {t: group_delta(attns[l], t, dW) for t, dW in source[l].items()}
        for h in heads:
            dP = torch.randn((2, *gfit[h].pk.shape), generator=gen, dtype=x.dtype)
            dP = (dP * torch.stack([gfit[h].pk, gfit[h].pv]).norm() / dP.norm()).reshape(-1)
            Jp = jacobian(gfit[h], "prefix"), jacobian(gheld[h], "prefix")
            yp = Jp[0] @ dP, Jp[1] @ dP
            ys, names = [], []
            for t in TARGETS:
                if t in ("q", "k") and Jp[0].shape[0] * int(torch.tensor(gfit[h].delta_shape(t)).prod()) > max_entries:
                    out["skipped"].add(t)
                else:
                    D = design(gfit[h], t), design(gheld[h], t)
                    Y = yp[0].view(D[0].shape[0], -1), yp[1].view(D[1].shape[0], -1)
                    r = ridge_residuals(D[0], Y[0], D[1], Y[1]).sum(-1)  # summed over output coordinates
                    add("prefix_to_lora", t, r, torch.stack([yp[0].pow(2).sum(), yp[1].pow(2).sum()]), D[0])
                if t in src:  # J·δ by jvp: no LoRA Jacobian needed this way round
                    dW = src[t][gfit[h].rows(t)]
                    ys.append((perturbation(gfit[h], t, dW), perturbation(gheld[h], t, dW)))
                    names.append(t)
            if names:  # one SVD of the prefix Jacobian serves every LoRA target
                Y = torch.stack([y[0] for y in ys], 1), torch.stack([y[1] for y in ys], 1)
                r = ridge_residuals(Jp[0], Y[0], Jp[1], Y[1])
                for i, t in enumerate(names):
                    y2 = torch.stack([Y[0][:, i].pow(2).sum(), Y[1][:, i].pow(2).sum()])
                    add("lora_to_prefix", t, r[..., i], y2, Jp[0])
    for (way, t), (res, n2) in acc.items():
        rel = (res / n2).sqrt()  # (alphas, 2): relative residual ‖J w − y‖ / ‖y‖
        out[way][t].update(fit=rel[:, 0].tolist(), heldout=rel[:, 1].tolist())
    out["skipped"] = sorted(out["skipped"])
    return out

