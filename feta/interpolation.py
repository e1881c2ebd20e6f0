"""Interpolating two trained prefixes (or two soft prompts): θ(w) = (1 − w)·θ_A + w·θ_B.

    python analyze.py analysis=interpolate ckpt=<prefix run A> analysis.other=<prefix run B> 'analysis.weights=[0,0.5,1]'

A cheap probe of the loss landscape between two token adaptations of the same shape (same model,
kind and m; e.g. two seeds, or two lengths of training). Writes <A>/analysis/interpolation.csv and
interpolation.png: validation accuracy at each w, and agreement with A's and B's predictions.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from feta import runs  # noqa: E402
from feta.data import TaskDataModule, TaskKind  # noqa: E402
from feta.errors import UserError  # noqa: E402
from feta.kinds import kinds  # noqa: E402
from feta.evaluation import load_models, predict  # noqa: E402

INTERPOLABLE = kinds(interpolable=True)


def check_pair(run_a: Path, run_b: Path):
    """Both runs must be finished token adaptations of the same shape; returns their targets."""
    a, b = runs.resolve_run(run_a), runs.resolve_run(run_b)
    for name, t in (("ckpt", a), ("analysis.other", b)):
        if t.kind not in INTERPOLABLE:
            raise UserError(f"{name}={t.run_dir}", f"is a {t.kind} run", f"interpolate {' or '.join(INTERPOLABLE)} runs")
    for key in ("kind", "m", "projection"):
        va, vb = a.cfg.adapter.get(key), b.cfg.adapter.get(key)
        if va != vb:
            raise UserError("analysis.other", f"adapter.{key} differs ({va} in ckpt, {vb} in other)",
                            "interpolate two runs of the same adapter shape")
    if a.cfg.model.name != b.cfg.model.name:
        raise UserError("analysis.other", f"ckpt is on {a.cfg.model.name}, other on {b.cfg.model.name}",
                        "interpolate two runs of one base model")
    return a, b


def interpolate(run_a: Path, run_b: Path, weights: list[float], out_dir: Path, val_limit: int | None = None,
                val_seed: int | None = None) -> pd.DataFrame:
    """Accuracy along the straight line between two prefixes; writes CSV and plot to out_dir."""
    a, b = check_pair(Path(run_a), Path(run_b))
    model, tokenizer, _, data_spec = load_models(a)
    data_spec = data_spec.with_validation(val_limit, val_seed)
    if data_spec.task is not TaskKind.classification:
        raise UserError("analysis=interpolate", f"scores accuracy; {a.run_dir} is a {data_spec.task.value} run",
                        "interpolate classification runs")
    dm = TaskDataModule(data_spec, tokenizer, seed=a.cfg.seed)
    theta_a = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    # PEFT saves the same keys it loads; safetensors only (never unpickle a user's file).
    theta_b = load_file(str(runs.adapter_dir(b.run_dir) / "adapter_model.safetensors"))
    if theta_a.keys() != theta_b.keys() or any(theta_a[k].shape != theta_b[k].shape for k in theta_a):
        raise UserError("analysis.other", f"the adapters in {a.run_dir} and {b.run_dir} hold different tensors",
                        "interpolate two runs of the same adapter shape")
    preds = {}
    for w in sorted({0.0, 1.0, *map(float, weights)}):
        mixed = {k: (1 - w) * theta_a[k] + w * theta_b[k].to(theta_a[k].dtype) for k in theta_a}
        set_peft_model_state_dict(model, mixed)
        preds[w], labels = predict(model, dm)
    rows = [{"w": w, "val_acc": float((p == labels).float().mean()),
             "agreement_with_a": float((p == preds[0.0]).float().mean()),
             "agreement_with_b": float((p == preds[1.0]).float().mean())} for w, p in preds.items()]
    table = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "interpolation.csv", index=False)
    _plot(table, out_dir / "interpolation.png", a.name, b.name)
    return table


def _plot(table: pd.DataFrame, path: Path, name_a: str, name_b: str) -> None:
    long = table.melt(id_vars="w", var_name="measure", value_name="fraction")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=long, x="w", y="fraction", hue="measure", marker="o", ax=ax)
    ax.set_xlabel(f"w: (1 − w)·A + w·B   (A = {name_a}, B = {name_b})")
    ax.set_ylabel("fraction of validation sentences")
    ax.set_title("Interpolating two trained token adaptations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
