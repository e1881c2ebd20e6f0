"""Evaluate runs and build the sweep report (feta/evaluation.py, feta/report/).

    python evaluate.py ckpt=multirun/<date>/<time>/0               # one run -> eval.json
    python evaluate.py ckpt=multirun/<date>/<time>/0/compiled-r4   # a compiled prefix
    python evaluate.py ckpt=multirun/<date>/<time>                 # a sweep -> eval.json each + report/
    python evaluate.py analysis=task_vector ckpt=<LoRA run | compiled dir> analysis.precision=fp16
    python evaluate.py analysis=interpolate ckpt=<prefix run A> analysis.other=<prefix run B>
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import wandb
from omegaconf import DictConfig, OmegaConf

from feta import runs, storage
from feta.cli import cli, run_main, task_wrapper
from feta.evaluation import equivalence_analysis, evaluate_run
from feta.interpolation import interpolate
from feta.report import build_report, log_to_wandb
from feta.schema import EvaluateConfig, check_output_dir
from feta.task_vector import task_vector_analysis
from feta.tracking import compiled_artifact_name, finish_wandb, make_logger, use_artifact

log = logging.getLogger("feta")


def _done(run_dir: Path) -> bool:
    path = run_dir / runs.EVAL
    return path.is_file() and "main_metric" in runs.read_json(path, "evaluate.py overwrite=true")


def _wandb(cfg: DictConfig, log_dir: Path, job_type: str, name: str, run_dir: Path):
    """A W&B logger in the run's sweep group, or None when not logging to W&B."""
    run = runs.resolve_run(run_dir)
    metrics = runs.read_json(run.training_dir / runs.METRICS) if runs.is_finished(run.training_dir) else {}
    logger = make_logger(cfg, log_dir, job_type=job_type, name=name, group=metrics.get("wandb_group"))
    if logger is None or type(logger).__name__ != "WandbLogger":
        return None
    artifact = metrics.get("artifact")
    if artifact and run.source_dir is not None:
        artifact = compiled_artifact_name(artifact, run.run_dir)  # the compiled adapter compile.py logged
    use_artifact(logger, artifact, run.run_dir / runs.ADAPTER)  # lineage: train (-> compile) -> evaluate
    return logger


def analyze(cfg: DictConfig, settings: EvaluateConfig) -> dict[str, Any]:
    ckpt, analysis = Path(settings.ckpt), settings.analysis
    out_dir = ckpt / "analysis"
    logger = None
    if analysis.kind == "equivalence":
        result = equivalence_analysis(ckpt, Path(analysis.lora) if analysis.lora else None, out_dir,
                                      OmegaConf.to_container(cfg.analysis))
        if (logger := _wandb(cfg, out_dir, "analysis", f"equivalence-{ckpt.name}", ckpt)) is not None:
            logger.experiment.log({p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))})
    elif analysis.kind == "task_vector":
        result, table = task_vector_analysis(ckpt, analysis.precision, out_dir)
        if (logger := _wandb(cfg, out_dir, "analysis", f"task_vector-{analysis.precision}-{ckpt.name}", ckpt)):
            logger.log_table(f"task_vector/{analysis.precision}", dataframe=table)
        log.info(f"task vector ({analysis.precision}): {result['untouched_changed']} untouched tensors changed, "
                 f"max |τ − B·A·scale| {result['lora_max_abs_diff']:.2e}; {result['csv']}")
    else:
        table = interpolate(ckpt, Path(analysis.other), list(analysis.weights), out_dir, settings.val_limit)
        if (logger := _wandb(cfg, out_dir, "analysis", f"interpolate-{ckpt.name}", ckpt)) is not None:
            logger.log_table("interpolation", dataframe=table)
        log.info(f"interpolation {ckpt} -> {analysis.other}:\n{table.to_string(index=False)}")
        result = {"interpolation": table.to_dict("records")}
    return result


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    settings: EvaluateConfig = OmegaConf.to_object(cfg)  # every check, before anything is read or written
    ckpt = Path(settings.ckpt)
    if settings.analysis is not None:
        return analyze(cfg, settings)
    found = runs.find_runs(ckpt)
    for run_dir in {ckpt, *found}:  # eval.json, outputs.jsonl and report/ go into them
        check_output_dir("ckpt", run_dir)
    results, failed = {}, []
    for run_dir in found:
        if _done(run_dir) and not settings.overwrite:
            log.info(f"{run_dir}: eval.json exists (overwrite=true to redo)")
            results[str(run_dir)] = runs.read_json(run_dir / runs.EVAL)
            continue
        try:
            runs.resolve_run(run_dir)
        except ValueError as e:  # unfinished or broken: reported, not fatal in a sweep
            if len(found) == 1:
                raise
            failed.append(f"{run_dir}: {e}")
            continue
        with storage.path_lock(f"ckpt={run_dir}", run_dir / runs.EVAL):
            if _done(run_dir) and not settings.overwrite:  # another evaluate.py finished it meanwhile
                results[str(run_dir)] = runs.read_json(run_dir / runs.EVAL)
                continue
            ev = evaluate_run(run_dir, OmegaConf.to_container(cfg, resolve=True))
        results[str(run_dir)] = ev
        main = ev["main_metric"]
        log.info(f"{ev['name']}: {main}={ev[main]:.4f}" + (
            f", agreement with the prefix {ev['agreement_with_source']:.3f}" if ev["agreement_with_source"] is not None else ""))
        _log_run(cfg, run_dir, ev)
    if failed:
        warnings.warn("skipped unfinished or broken runs:\n  " + "\n  ".join(failed))
    out = {"runs": results, "skipped": failed}
    if settings.report and not (len(found) == 1 and found[0] == ckpt):
        report = build_report(ckpt)
        out["report"] = {k: str(v) for k, v in report["files"].items()}
        log.info(f"report: {ckpt / 'report'}")
        logger = make_logger(cfg, ckpt / "report", job_type="report", name="report")
        if logger is not None and type(logger).__name__ == "WandbLogger":
            log_to_wandb(report, logger.experiment)
    return out


def _log_run(cfg: DictConfig, run_dir: Path, ev: dict) -> None:
    logger = _wandb(cfg, run_dir, "evaluate", f"eval-{ev['name']}", run_dir)
    if logger is None:
        return
    scalars = {k: ev[k] for k in ("val_acc", "macro_f1", "bleu", "rouge_l", "agreement_with_source",
                                  "token_agreement", "bleu_vs_source") if ev.get(k) is not None}
    logger.log_metrics({f"eval/{k}": v for k, v in scalars.items()})
    if "confusion" in ev:
        classes = ev["classes"]
        data = [[t, p, ev["confusion"][i][j]] for i, t in enumerate(classes) for j, p in enumerate(classes)]
        logger.log_table("eval/confusion", columns=["true", "predicted", "count"], data=data)
    if ev["latency"]:
        cols = ["name", "phase", "batch", "us_per_token", "ratio_to_base", "ratio_iqr"]
        logger.log_table("eval/latency", columns=cols, data=[[r.get(c) for c in cols] for r in ev["latency"]["rows"]])
    finish_wandb()  # one W&B run per evaluated run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_main(evaluate, cfg)


if __name__ == "__main__":
    cli(main)
