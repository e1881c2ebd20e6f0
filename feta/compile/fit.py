"""The closed form (`method=lstsq`, and `method=sink`'s second step): a reduced-rank ridge fit per module.

For every layer l, in order, a LoRA on the attention output projection W (input x, per token) is fitted
to the prefix-induced change of that projection's output (`match=module`, the default):

    delta_l = o_prefix_l - W x_compiled_l                                 # (n_tokens, d)
    min_{rank(ΔW) <= r}  sum_t w_t ||delta_t - ΔW x_t||^2 + ridge ||ΔW||^2

`match=stream` targets the whole residual stream after attention instead (h_mid_prefix − h_in_compiled
− W x), so a layer also tries to undo earlier layers' error; on SmolLM2 it was worse (85.6% vs 86.7%).
`target=o+mlp` also fits the MLP's output projection, to the MLP's change (or, with match=stream, to
what the layer's output still lacks); at r=4 on SmolLM2 it lost accuracy (82.5% / 85.7%): a rank-4 map
leaves 0.84-0.94 of the MLP's change (relative residual on the calibration tokens), and what it does
fit does not carry over to held-out sentences. q/k/v change attention itself, so only distill fits them.

"Sequential": x comes from the compiled model itself, layers < l already compiled (feta/compile/layers.py
runs the layers one at a time). The fit never holds the calibration tokens themselves: `LstsqStats`
accumulates XᵀX, XᵀΔ, ΣX, ΣΔ and the weights in float64 micro-batch by micro-batch (as GPTQ does), so its
memory is set by the module's width, not by the calibration set.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from feta.compile.spec import MODULE_PATTERNS
from feta.errors import UserError


class LstsqStats:
    """Running float64 sums of a weighted least-squares problem T ≈ X ΔWᵀ + b, added micro-batch by
    micro-batch; `solve` gives the same fit as one call on all rows, up to float64 round-off.

    The weighted sums define the fit; the unweighted ones the reported residual (the share of ‖T‖ over the
    fitted rows that the fit leaves). They are one set while every weight is 1, the default."""

    def __init__(self) -> None:
        self.w = self.wx = self.wt = self.wxx = self.wxt = None  # weighted: Σw, Σw·x, Σw·t, Σw·xxᵀ, Σw·xtᵀ
        self.unweighted: dict[str, Tensor] | None = None  # n, Σx, Σt, Σxxᵀ, Σxtᵀ once a weight is not 1
        self.tt = 0.0  # Σ‖t‖², unweighted

    def add(self, X: Tensor, T: Tensor, w: Tensor | None = None) -> None:
        """Rows X (n, d_in), targets T (n, d_out), weights w (n,)."""
        X, T = X.double(), T.double()
        w = torch.ones(X.shape[0], dtype=X.dtype, device=X.device) if w is None else w.double()
        if self.w is None:
            zeros = lambda *s: torch.zeros(*s, dtype=X.dtype, device=X.device)  # noqa: E731
            d_in, d_out = X.shape[1], T.shape[1]
            self.w, self.wx, self.wt, self.wxx, self.wxt = zeros(()), zeros(d_in), zeros(d_out), zeros(d_in, d_in), zeros(d_in, d_out)
        if self.unweighted is None and not bool((w == 1).all()):  # until now both sets were one
            self.unweighted = {"n": self.w.clone(), "x": self.wx.clone(), "t": self.wt.clone(), "xx": self.wxx.clone(),
                               "xt": self.wxt.clone()}
        Xw = X * w[:, None]
        self.w += w.sum()
        self.wx += Xw.sum(0)
        self.wt += (T * w[:, None]).sum(0)
        self.wxx += Xw.T @ X
        self.wxt += Xw.T @ T
        self.tt += float(T.pow(2).sum())
        if self.unweighted is not None:
            u = self.unweighted
            u["n"] += X.shape[0]
            u["x"] += X.sum(0)
            u["t"] += T.sum(0)
            u["xx"] += X.T @ X
            u["xt"] += X.T @ T

    def solve(self, rank: int, ridge: float = 1e-4, bias: bool = False) -> tuple[Tensor, Tensor, Tensor | None, float]:
        """(A (rank, d_in), B (d_out, rank), b (d_out,) or None, relative residual).

        Weighted ridge reduced-rank regression: the rank truncation keeps the top directions of the fitted
        values X·ΔW_ridgeᵀ (the metric of the inputs), the optimal rank-r solution of the (unregularized)
        weighted problem. float64: XᵀX of LLM activations spans many orders of magnitude."""
        gram, cross = self.wxx, self.wxt
        if bias:  # the bias is unpenalized: centre with the weighted means and solve for it last
            mx, mt = self.wx / self.w, self.wt / self.w
            gram = gram - self.w * torch.outer(mx, mx)
            cross = cross - self.w * torch.outer(mx, mt)
        d_in, d_out = cross.shape
        lam = ridge * gram.diagonal().mean()
        eye = torch.eye(d_in, dtype=gram.dtype, device=gram.device)
        coef = torch.linalg.solve(gram + lam * eye, cross)  # (d_in, d_out)
        if rank > 0:
            # Top right singular vectors of the fitted values, from their (d_out, d_out) Gram matrix.
            _, vecs = torch.linalg.eigh(coef.T @ gram @ coef)  # ascending eigenvalues
            V = vecs[:, -rank:].flip(1)  # (d_out, rank)
            A, B = (coef @ V).T, V
        else:
            A, B = gram.new_zeros(0, d_in), gram.new_zeros(d_out, 0)
        b = (mt - B @ (A @ mx)) if bias else None
        return A, B, b, self._residual(B @ A, b)

    def _residual(self, W: Tensor, b: Tensor | None) -> float:
        """‖T − X Wᵀ − b‖ / ‖T‖ over the rows added (unweighted), from the sums alone."""
        u = self.unweighted or {"n": self.w, "x": self.wx, "t": self.wt, "xx": self.wxx, "xt": self.wxt}
        C = W.T  # (d_in, d_out)
        err = self.tt - 2 * float((C * u["xt"]).sum()) + float(((u["xx"] @ C) * C).sum())
        if b is not None:
            err += float(-2 * b @ u["t"] + 2 * (u["x"] @ C) @ b + u["n"] * (b @ b))
        return max(err, 0.0) ** 0.5 / max(self.tt, 1e-60) ** 0.5


def reduced_rank_fit(
    X: Tensor, T: Tensor, rank: int, ridge: float = 1e-4, bias: bool = False, w: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weighted ridge reduced-rank regression T ≈ X ΔWᵀ (+ b), ΔW = B·A of rank <= `rank`, on rows held at
    once. X: (n, d_in), T: (n, d_out), w: (n,). Returns A (rank, d_in), B (d_out, rank), b (d_out,) or None."""
    stats = LstsqStats()
    stats.add(X, T, w)
    return stats.solve(rank, ridge, bias)[:3]


def target_modules(model: torch.nn.Module, arch: str, target: str) -> dict[str, tuple[int, str]]:
    """{module name: (layer index, module kind)} for `target` ("o", "o+mlp", ...), layer by layer."""
    found = {}
    patterns = MODULE_PATTERNS[arch]
    for kind in [k for k in target.split("+") if k != "none"]:
        if kind not in patterns:
            raise UserError("target", f"{target}: {kind} is not a module kind of {arch}",
                            f"use {', '.join(patterns)} (joined by +)")
        found.update({name: (i, kind) for i, name in numbered_modules(model, patterns[kind], arch).items()})
    order = list(patterns)
    return dict(sorted(found.items(), key=lambda item: (item[1][0], order.index(item[1][1]))))


def numbered_modules(model: torch.nn.Module, regex: str, arch: str) -> dict[int, str]:
    """{layer index: module name} of the modules whose name ends in `regex` (its group 1: the layer)."""
    pattern = re.compile(r"(?:^|\.)" + regex + r"$")
    found = {}
    for name, _ in model.named_modules():
        match = pattern.search(name)
        if match:
            found[int(match.group(1))] = name
    if not found:
        raise ValueError(f"no module matches {regex} in this {arch} model")
    return dict(sorted(found.items()))


@torch.no_grad()
def write_lora(module, A: Tensor, B: Tensor, b: Tensor | None) -> None:
    """Load (A, B, b) into a PEFT LoRA layer of rank A.shape[0] whose scale is 1 (alpha = r)."""
    name = module.active_adapters[0]
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    dtype, device = lora_A.weight.dtype, lora_A.weight.device
    lora_A.weight.zero_()
    lora_B.weight.zero_()
    lora_A.weight[: A.shape[0]] = A.to(device, dtype)  # rank 0 (bias only) leaves the rank-1 slot at zero
    lora_B.weight[:, : B.shape[1]] = B.to(device, dtype)
    if b is not None:
        lora_B.bias.copy_(b.to(device, dtype))
    elif lora_B.bias is not None:
        lora_B.bias.zero_()
    assert module.scaling[name] == 1.0, f"compiled LoRA expects scale 1, got {module.scaling[name]}"
