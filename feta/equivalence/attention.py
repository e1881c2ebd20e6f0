"""Pure tensor math of the equivalence measurements, per key/value head group: content log-attention,
spans, ridge fits, linearity remainders and the Jacobians of a layer's attention map. Masks, rotary and
attention with a prefix are feta.attention's, which the compile shares.

Tensors in, tensors out: no modules, hooks or I/O (those live in `capture`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import jvp, vmap

from feta.attention import attend, rotate, scores

TARGETS = ("q", "k", "v", "o")  # the attention weights a LoRA can move: W_q, W_k, W_v, W_o
EPS = (1e-1, 1e-2, 1e-3, 1e-4)  # linearity steps, relative to the direction's norm
ALPHAS = (0.0, 1e-6, 1e-4, 1e-2)  # ridge strengths, in units of σ_max² of the fitted Jacobian

KV = tuple[Tensor, Tensor]  # one layer's prefix keys and values, (kv_heads, m, dh) each
Rotary = tuple[Tensor, Tensor] | None  # a layer's rotary (cos, sin); None without rotary (GPT-2)
Inputs = tuple[Tensor, Rotary]  # a layer's captured input: hidden states (B, T, d) and its rotary


def content_log_attention(q: Tensor, k: Tensor, pk: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """log attention among content keys, renormalized over content: (B, H, T, T). q, k (B, H, T, dh),
    key heads already repeated; pk (H, m, dh), m may be 0. Taken from the full softmax over
    [prefix; content], so a prefix's effect on the ratios is measured, not assumed."""
    s_p = scale * torch.einsum("bhtd,hmd->bhtm", q, pk)
    s_c = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed[:, None], torch.finfo(q.dtype).min)
    log_a = torch.log_softmax(torch.cat([s_p, s_c], -1), -1)[..., pk.shape[1]:]  # (B, H, T, T)
    return log_a - torch.logsumexp(log_a, -1, keepdim=True)


def ratio_change(log_a: Tensor, log_b: Tensor, allowed: Tensor, valid: Tensor) -> float:
    """max |log a − log b| over allowed pairs of real queries: 0 iff no ratio a_ij / a_ik changed."""
    keep = (allowed & valid[:, :, None])[:, None].expand_as(log_a)
    return float((log_a - log_b)[keep].abs().max())


def rank_formulas(m: int, N: int, d_head: int, g: int = 1) -> dict[str, int]:
    """Rank of one key/value head's prefix span for N query positions and g query heads per key head.
    value part: δz_i = Σ_j a_ij δv_j, the (gN × m) prefix attention ⊗ I_dh: dh·min(m, gN);
    key part: δz_i = s·a_ij (v_j − z_i) q_i·δk_j, rank ≤ min(dh, gN) per prefix token. All are capped
    by the output dimension gN·dh (reached by the key part once m > gN)."""
    dim = g * N * d_head
    value, key = d_head * min(m, g * N), min(m * min(d_head, g * N), dim)
    return {"value": value, "key": key, "total": min(value + key, dim)}


def span_basis(J: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Orthonormal basis (rows, rank) of J's columns with σ > rtol·σ_max, and all singular values."""
    U, s, _ = torch.linalg.svd(J, full_matrices=False)
    return U[:, : int((s > rtol * s[0]).sum()) if s[0] > 0 else 0], s


def outside_energy(U: Tensor, delta: Tensor) -> tuple[float, float]:
    """(‖δ − U Uᵀ δ‖², ‖δ‖²): δ's energy outside span(U), and its total (so that shares pool)."""
    return float((delta - U @ (U.T @ delta)).pow(2).sum()), float(delta.pow(2).sum())


def ridge_residuals(J_fit: Tensor, Y_fit: Tensor, J_held: Tensor, Y_held: Tensor, rtol: float = 1e-10) -> Tensor:
    """Squared residuals of W(α) = argmin ‖J_fit W − Y_fit‖² + α σ_max² ‖W‖², on the fit rows and on
    held-out rows, (len(ALPHAS), 2, k) for k right-hand sides Y (rows, k). α = 0 is the minimum-norm
    least-squares fit (σ < rtol·σ_max dropped). float64: the small σ decide the held-out error."""
    U, s, Vh = torch.linalg.svd(J_fit, full_matrices=False)
    C = U.T @ Y_fit  # (rank, k)
    out = []
    for alpha in ALPHAS:
        f = torch.where(s > rtol * s[0], 1 / s, 0) if alpha == 0 else s / (s**2 + alpha * s[0] ** 2)
        W = Vh.T @ (f[:, None] * C)  # (cols, k)
        out.append(torch.stack([(J_fit @ W - Y_fit).pow(2).sum(0), (J_held @ W - Y_held).pow(2).sum(0)]))
    return torch.stack(out)


def remainders(f: Callable[[Tensor], Tensor], theta0: Tensor, x: Tensor,
               eps: Sequence[float] = EPS) -> list[float]:
    """‖f(θ₀+εx) − f(θ₀) − εJx‖ / ‖f(θ₀+εx) − f(θ₀)‖ per ε, Jx from one jvp. Falls ∝ ε for
    a map linear to first order; stays at roundoff for an exactly linear one."""
    f0, Jx = jvp(f, (theta0,), (x,))
    return [float((f(theta0 + e * x) - f0 - e * Jx).norm() / (f(theta0 + e * x) - f0).norm()) for e in eps]


def random_lowrank(shape: tuple[int, ...], r: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """B·A with Gaussian B (out, r) and A (r, in), unit Frobenius norm: a random rank-r LoRA direction."""
    W = torch.randn(shape[0], r, generator=gen, dtype=dtype) @ torch.randn(r, shape[1], generator=gen, dtype=dtype)
    return W / W.norm()


def truncate(dW: Tensor, r: int) -> Tensor:
    """ΔW's best rank-r approximation (its top r singular directions)."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@dataclass
class Group:
    """One key/value head and its g query heads at a point, at fixed inputs: tensors only."""

    q: Tensor  # (B, g, T, dh), rotated
    k: Tensor  # (B, T, dh), rotated
    v: Tensor  # (B, T, dh)
    pk: Tensor  # (m, dh) prefix keys, as stored in the cache (already rotated)
    pv: Tensor  # (m, dh)
    z: Tensor  # (B, g, T, dh) this group's output before o_proj
    z_all: Tensor  # (B, T, H·dh) all heads' output before o_proj: the input of LoRA on o
    x: Tensor  # (B, T, d) layer input: the input of LoRA on q, k, v
    cos: Tensor | None  # (B or 1, T, dh) rotary
    sin: Tensor | None
    allowed: Tensor  # (B, T, T)
    valid: Tensor  # (B, T) real query positions
    scale: float
    q_rows: slice  # this group's rows of W_q, and of o_proj's input
    kv_rows: slice  # this group's rows of W_k and W_v

    def rows(self, target: str) -> slice:
        return self.kv_rows if target in ("k", "v") else self.q_rows

    def delta_shape(self, target: str) -> tuple[int, ...]:
        """prefix: (2, m, dh) = [δP_k; δP_v]; q, k, v: this group's rows of ΔW (out, in); o: rows of
        M = W_o⁻¹ΔW_o, the same change before o_proj (W_o is invertible), so W_o·M z = ΔW_o z."""
        g, dh, d = self.q.shape[1], self.q.shape[-1], self.x.shape[-1]
        return {"prefix": (2, self.pk.shape[0], dh), "q": (g * dh, d), "k": (dh, d), "v": (dh, d),
                "o": (g * dh, self.z_all.shape[-1])}[target]


def group_map(gr: Group, target: str) -> Callable[[Tensor], Tensor]:
    """δ ↦ the group's output at real tokens (N·g·dh,) with `target` moved by δ. Exact, not linearized:
    nonlinear in δ for the prefix, q and k; linear for v; affine for o."""
    B, g, T, dh = gr.q.shape
    heads = lambda t: t.view(B, T, g, dh).transpose(1, 2)  # noqa: E731  (B, T, g·dh) -> (B, g, T, dh)
    out = lambda z: z.transpose(1, 2)[gr.valid].reshape(-1)  # noqa: E731  real tokens, flattened
    rest = (gr.allowed, gr.scale)
    return {
        "prefix": lambda d: out(attend(gr.q, gr.k, gr.v, gr.pk + d[0], gr.pv + d[1], *rest)),
        "q": lambda d: out(attend(gr.q + rotate(heads(gr.x @ d.T), gr.cos, gr.sin), gr.k, gr.v, gr.pk, gr.pv, *rest)),
        "k": lambda d: out(attend(gr.q, gr.k + rotate(gr.x @ d.T, gr.cos, gr.sin), gr.v, gr.pk, gr.pv, *rest)),
        "v": lambda d: out(attend(gr.q, gr.k, gr.v + gr.x @ d.T, gr.pk, gr.pv, *rest)),
        "o": lambda d: out(gr.z + heads(gr.z_all @ d.T)),
    }[target]


def perturbation(gr: Group, target: str, delta: Tensor) -> Tensor:
    """The first-order change J·δ of the group's output (N·g·dh,), one jvp at δ = 0."""
    return jvp(group_map(gr, target), (gr.x.new_zeros(gr.delta_shape(target)),), (delta,))[1]


def jacobian(gr: Group, target: str, chunk: int = 256) -> Tensor:
    """The Jacobian at δ = 0, (N·g·dh, numel δ), columns in δ's row-major order (prefix: the key part,
    then the value part), by vmap over basis tangents in chunks."""
    shape = gr.delta_shape(target)
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=gr.x.dtype).view(n, *shape)
    return vmap(lambda e: perturbation(gr, target, e), chunk_size=chunk)(basis).T


def design(gr: Group, target: str) -> Tensor:
    """A matrix D whose ridge fit is the fit of J_target, far smaller for the separable maps:
    v: J·vec(δ) = vec(X̄ δᵀ), X̄ (N·g, d) the content-attention-weighted inputs x̄_i = Σ_j a_ij x_j;
    o: J·vec(δ) = vec(Z δᵀ), Z (N, H·dh) the head outputs. q, k and the prefix: D = J itself.
    The target y (N·g·dh,) is fitted as y.view(D.shape[0], -1), one column per output coordinate."""
    if target == "v":
        s_p, s_c = scores(gr.q, gr.k, gr.pk, gr.allowed, gr.scale)
        a = torch.softmax(torch.cat([s_p, s_c], -1), -1)[..., gr.pk.shape[0]:]  # (B, g, T, T) content part
        return (a @ gr.x[:, None]).transpose(1, 2)[gr.valid].reshape(-1, gr.x.shape[-1])  # (N·g, d)
    if target == "o":
        return gr.z_all[gr.valid]  # (N, H·dh)
    return jacobian(gr, target)

