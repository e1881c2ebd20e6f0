"""The markdown report: one table per base model, columns chosen by the task, written by DataFrame.to_markdown."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from feta.report.table import Latency, Metric, reference_residuals, setups, task_axes

Cell = Callable[[Any], str]


def fmt(x: Any, spec: str = "", suffix: str = "") -> str:
    """`x` formatted, or "—" where it was not measured."""
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return "—"
    return f"{x:{spec}}{suffix}"


def _fmt_time(x: Any) -> str:
    # Whole units once the value has three digits; a decimal below, where it still carries information.
    return fmt(x, ".0f" if not pd.isna(x) and x >= 100 else ".1f")


def _fmt_ratio(ratio: Any, iqr: Any) -> str:
    # The IQR beside the ratio: on CPU most ratios sit within the noise.
    return fmt(ratio, ".2f", "×") + ("" if pd.isna(iqr) or pd.isna(ratio) else f" ±{iqr:.2f}")


def _residual(row: Any) -> str:
    if pd.isna(row.residual_last_mean):
        return "—"
    return f"{row.residual_last_mean:.2f} / {row.residual_last_max:.2f}"


def metric_header(metric: Metric) -> str:
    return metric.name + (" %" if metric.unit == "%" else "")


def _columns(task: str, metric: Metric, lat: Latency) -> list[tuple[str, Cell]]:
    """(header, cell of a row) per column of the task's table."""
    pct = lambda col: (lambda row: fmt(getattr(row, col), ".1f"))  # noqa: E731
    head = [("run", lambda row: str(row.name)), (metric_header(metric), pct("metric"))]
    latency = [(f"latency {lat.unit}" if lat.phase == "prefill" else f"decode {lat.unit}",
                lambda row: _fmt_time(getattr(row, lat.column))),
               ("ratio to base", lambda row: _fmt_ratio(getattr(row, lat.ratio), getattr(row, lat.iqr)))]
    params = [("trainable params", lambda row: fmt(row.trainable_params, ","))]
    if task == "generation":
        return (head + [("ROUGE-L", pct("rouge_l"))] + latency + params
                + [("identical outputs %", pct("identical_outputs")), ("token agreement %", pct("token_agreement")),
                   ("on source outputs %", pct("own_token_agreement")), ("BLEU vs source", pct("bleu_vs_source")),
                   ("gain kept %", pct("gain_recovered")), ("residual (last) mean / max", _residual)])
    return (head + [("macro-F1 %", pct("macro_f1"))] + latency
            + [("decode µs/token", lambda row: _fmt_time(row.decode_us)),
               ("decode ratio", lambda row: _fmt_ratio(row.decode_ratio, row.decode_ratio_iqr))]
            + params + [("class agreement %", pct("class_agreement")), ("residual (last) mean / max", _residual),
                        (f"ref {metric_header(metric)}", pct("ref_metric")),
                        ("ref latency µs/token", lambda row: fmt(row.ref_latency_us, ".1f"))])


def _intro(df: pd.DataFrame, task: str, metric: Metric, lat: Latency) -> list[str]:
    sizes = " / ".join(str(v) for v in sorted({int(v) for v in df["val_size"].dropna()})) or "an unknown number of"
    measured = setups(df)
    if not measured:
        timing = "No latency was measured."
    else:
        warn = " (more than one setup: latencies are not comparable across them)" if len(measured) > 1 else ""
        what = ("at prefill, batch 1" if lat.phase == "prefill" else "while decoding greedily, batch 1")
        timing = (f"Latency: {lat.unit} {what}, in the deployed form (merged LoRA where measured, else the "
                  f"adapter), and its ratio to the base model timed in the same process (± the IQR of that ratio "
                  f"where measured); measured on {'; '.join(measured)}{warn}.")
    if task == "generation":
        return [f"BLEU (0-100, corpus BLEU against all references) and ROUGE-L (0-100) on {sizes} validation "
                f"inputs; {len(df)} evaluated run(s). " + timing,
                "Identical outputs: share of inputs whose greedy output equals the source prefix's; token agreement: "
                "share of teacher-forced next-token predictions equal to the source's, on the references; on source "
                "outputs: the same on the source's own greedy outputs; BLEU vs source: the compiled model's outputs "
                "scored against the source prefix's; gain kept: (BLEU − base) / (source − base)."]
    residuals = reference_residuals()
    return [f"Validation {metric.name} ({metric.unit}) on {sizes} examples; {len(df)} evaluated run(s). " + timing,
            "Class agreement: share of a compiled model's predicted classes equal to its source prefix's. Reference "
            "columns: "
            "the reference run (GPT-2 small on CUDA, so its latency is not comparable with another device"
            + (f"; its compiled residuals were {residuals}" if residuals else "")
            + "), filled only where model and setting match."]


def markdown(df: pd.DataFrame, skipped: list[str]) -> str:
    """The whole results.md of a one-task table."""
    task, metric, lat = task_axes(df)
    models = df["model"].unique().tolist()
    lines = ["# feta results", ""]
    if len(models) > 1:
        lines += [f"**Warning: this table mixes base models ({', '.join(models)}); compare rows only within one "
                  "model's section.**", ""]
    lines += [" ".join(_intro(df, task, metric, lat)), ""]
    columns = _columns(task, metric, lat)
    for model, g in df.groupby("model", sort=False):
        rows = list(g.itertuples())
        shown = pd.DataFrame({head: [cell(row) for row in rows] for head, cell in columns})
        # Cells are formatted already; numparse would re-align "1,234" and "—" as numbers.
        align = ("left",) + ("right",) * (len(columns) - 1)  # names read left to right, numbers line up right
        lines += [f"## {model}", "", shown.to_markdown(index=False, disable_numparse=True, colalign=align), ""]
    lines += ["## Skipped runs", ""] + ([f"- {s}" for s in skipped] or ["None."]) + [""]
    return "\n".join(lines)
