"""Evaluate runs and build the sweep report (feta/evaluation.py, feta/report.py).

    python evaluate.py ckpt=multirun/<date>/<time>/0               # one run -> eval.json
    python evaluate.py ckpt=multirun/<date>/<time>/0/compiled-r4   # a compiled prefix
    python evaluate.py ckpt=multirun/<date>/<time>                 # a sweep -> eval.json each + report/
    python evaluate.py analysis=task_vector ckpt=<LoRA run | compiled dir> precision=fp16   # merge artifacts
    python evaluate.py analysis=interpolate ckpt=<prefix run A> other=<prefix run B>      # (1 − w)·A + w·B
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from feta import runs
from feta.evaluation import EVAL, equivalence_analysis, evaluate_run, find_runs, resolve
from feta.tracking import make_logger, task_wrapper

log = logging.getLogger("feta")


def _done(run_dir: Path) -> bool:
    try:
        return "val_acc" in runs.read_json(run_dir / EVAL)
    except (FileNotFoundError, ValueError):
        return False


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    ckpt = Path(cfg.ckpt)
    if cfg.analysis == "equivalence":
        out_dir = ckpt / "analysis"
        settings = OmegaConf.to_container(cfg.equivalence, resolve=True)
        result = equivalence_analysis(ckpt, Path(cfg.lora) if cfg.lora else None, out_dir, settings)
        logger = _analysis_wandb(cfg, ckpt, f"equivalence-{ckpt.name}")
        if logger is not None:
            import wandb

            logger.experiment.log({p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))})
        return result
    if cfg.analysis == "task_vector":
        from feta.task_vector import task_vector_analysis

        summary, table = task_vector_analysis(ckpt, cfg.precision, ckpt / "analysis")
        logger = _analysis_wandb(cfg, ckpt, f"task_vector-{cfg.precision}-{ckpt.name}")
        if logger is not None:
            logger.log_table(f"task_vector/{cfg.precision}", dataframe=table)
            logger.log_metrics({f"task_vector/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        log.info(f"task vector ({cfg.precision}): {summary['untouched_changed']} untouched tensors changed, "
                 f"max |τ − B·A·scale| {summary['lora_max_abs_diff']:.2e}; {summary['csv']}")
        return summary
    if cfg.analysis == "interpolate":
        from feta.interpolation import interpolate

        if not cfg.other:
            raise ValueError("analysis=interpolate needs other=<a second prefix run> (ckpt is the first)")
        table = interpolate(ckpt, Path(cfg.other), list(cfg.weights), ckpt / "analysis", cfg.val_limit)
        logger = _analysis_wandb(cfg, ckpt, f"interpolate-{ckpt.name}")
        if logger is not None:
            logger.log_table("interpolation", dataframe=table)
        log.info(f"interpolation {ckpt} -> {cfg.other}:\n{table.to_string(index=False)}")
        return {"interpolation": table.to_dict("records")}
    if cfg.analysis is not None:
        raise ValueError(f"analysis must be null, equivalence, task_vector or interpolate, got {cfg.analysis!r}")
    targets = find_runs(ckpt)
    settings = OmegaConf.to_container(cfg, resolve=True)
    results, failed = {}, []
    for run_dir in targets:
        if _done(run_dir) and not cfg.overwrite:
            log.info(f"{run_dir}: eval.json exists (overwrite=true to redo)")
            results[str(run_dir)] = runs.read_json(run_dir / EVAL)
            continue
        try:
            resolve(run_dir)
        except (FileNotFoundError, ValueError) as e:  # unfinished or broken: reported, not fatal in a sweep
            if len(targets) == 1:
                raise
            failed.append(f"{run_dir}: {e}")
            continue
        ev = evaluate_run(run_dir, settings)
        results[str(run_dir)] = ev
        log.info(f"{ev['name']}: val_acc={ev['val_acc']:.4f}" + (
            f", agreement with the prefix {ev['agreement_with_source']:.3f}" if ev["agreement_with_source"] is not None else ""))
        _log_run(cfg, run_dir, ev)
    if failed:
        warnings.warn("skipped unfinished or broken runs:\n  " + "\n  ".join(failed))
    out = {"runs": results, "skipped": failed}
    if cfg.report and not (len(targets) == 1 and targets[0] == ckpt):
        from feta.report import build_report, log_to_wandb

        report = build_report(ckpt)
        out["report"] = {k: str(v) for k, v in report["files"].items()}
        log.info(f"report: {ckpt / 'report'}\n{report['table'][['name', 'val_acc', 'latency_us', 'latency_ratio']]}")
        logger = make_logger(cfg, ckpt / "report", job_type="report", name="report", group=_group(targets[0]))
        if logger is not None and type(logger).__name__ == "WandbLogger":
            log_to_wandb(report, logger.experiment)
    return out


def _analysis_wandb(cfg: DictConfig, ckpt: Path, name: str):
    """The W&B logger of an analysis of `ckpt` (in its run's group), or None when not logging to W&B."""
    logger = make_logger(cfg, ckpt / "analysis", job_type="analysis", name=name, group=_group(ckpt))
    return logger if logger is not None and type(logger).__name__ == "WandbLogger" else None


def _group(run_dir: Path) -> str | None:
    target = resolve(run_dir)
    metrics = runs.read_json((target.source_dir or target.run_dir) / runs.METRICS) if runs.is_finished(
        target.source_dir or target.run_dir) else {}
    return metrics.get("wandb_group")


def _log_run(cfg: DictConfig, run_dir: Path, ev: dict) -> None:
    logger = make_logger(cfg, run_dir, job_type="evaluate", name=f"eval-{ev['name']}", group=_group(run_dir))
    if logger is None:
        return
    logger.log_metrics({"eval/val_acc": ev["val_acc"], **{f"eval/acc_class{i}": a for i, a in enumerate(ev["per_class_acc"])}})
    if ev["agreement_with_source"] is not None:
        logger.log_metrics({"eval/agreement_with_source": ev["agreement_with_source"]})
    if hasattr(logger, "log_table"):
        data = [[t, p, ev["confusion"][t][p]] for t in (0, 1) for p in (0, 1)]
        logger.log_table("eval/confusion", columns=["true", "predicted", "count"], data=data)
        if ev["latency"]:
            rows = ev["latency"]["rows"]
            cols = ["name", "phase", "batch", "us_per_token", "ratio_to_base", "ratio_iqr"]
            logger.log_table("eval/latency", columns=cols, data=[[r[c] for c in cols] for r in rows])
    from feta.tracking import finish_wandb

    finish_wandb()  # one W&B run per evaluated run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
