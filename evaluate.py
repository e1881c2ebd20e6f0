"""Evaluate runs and build the sweep report (feta/evaluation.py, feta/report/).

    python evaluate.py ckpt=multirun/<date>/<time>/0               # one run -> eval.json
    python evaluate.py ckpt=multirun/<date>/<time>/0/compiled-r64  # a compiled prefix
    python evaluate.py ckpt=multirun/<date>/<time>                 # a sweep -> eval.json each + report/

Analyses of a run (equivalence, task vector, interpolation) are analyze.py's.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from feta import runs, storage
from feta.cli import cli, run_main, task_wrapper
from feta.evaluation import evaluate_run
from feta.report import build_report, log_to_wandb
from feta.report.multitask import MULTITASK, is_multitask, write_multitask
from feta.schema import EvaluateConfig, check_output_dir
from feta.tracking import finish_wandb, make_logger, run_logger

log = logging.getLogger("feta")


def _done(run_dir: Path, settings: EvaluateConfig) -> bool:
    """True when the run's eval.json is complete and scored the validation subset asked for now."""
    path = run_dir / runs.EVAL
    if not path.is_file():
        return False
    ev = runs.read_json(path, "evaluate.py overwrite=true")
    if "main_metric" not in ev:
        return False
    try:
        data_spec = runs.run_specs(runs.resolve_run(run_dir).cfg)[1]
    except ValueError:  # an unfinished or broken run: reported by the caller
        return False
    want = data_spec.with_validation(settings.val_limit, settings.val_seed)
    if (ev.get("val_limit"), ev.get("val_seed")) != (want.val_limit, want.val_seed):
        log.info(f"{run_dir}: eval.json scored val_limit={ev.get('val_limit')}, val_seed={ev.get('val_seed')}; "
                 f"scoring val_limit={want.val_limit}, val_seed={want.val_seed}")
        return False
    return True


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    settings: EvaluateConfig = OmegaConf.to_object(cfg)  # every check, before anything is read or written
    ckpt = Path(settings.ckpt)
    found = runs.find_runs(ckpt)
    for run_dir in {ckpt, *found}:  # eval.json, outputs.jsonl and report/ go into them
        check_output_dir("ckpt", run_dir)
    results, failed = {}, []
    for run_dir in found:
        if _done(run_dir, settings) and not settings.overwrite:
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
            if _done(run_dir, settings) and not settings.overwrite:  # another evaluate.py finished it meanwhile
                results[str(run_dir)] = runs.read_json(run_dir / runs.EVAL)
                continue
            ev = evaluate_run(run_dir, OmegaConf.to_container(cfg, resolve=True))
        results[str(run_dir)] = ev
        main = ev["main_metric"]
        agreement = next(((k, ev[k]) for k in ("class_agreement", "identical_outputs") if ev.get(k) is not None), None)
        log.info(f"{ev['name']}: {main}={ev[main]:.4f}" + (
            f", {agreement[0].replace('_', ' ')} with the prefix {agreement[1]:.3f}" if agreement else ""))
        _log_run(cfg, run_dir, ev)
    if failed:
        warnings.warn("skipped unfinished or broken runs:\n  " + "\n  ".join(failed))
    out = {"runs": results, "skipped": failed}
    reported = settings.report and not (len(found) == 1 and found[0] == ckpt)
    jobs = storage.run_dirs(ckpt, (runs.CONFIG,)) if reported else []
    if reported and is_multitask(jobs):  # several tasks: one table of each task's score per configuration
        write_multitask(jobs, ckpt / MULTITASK)
        out["report"] = {"md": str(ckpt / MULTITASK)}
        log.info(f"runs of several tasks, each task's score per configuration: {ckpt / MULTITASK}")
    elif reported:
        report = build_report(ckpt)
        out["report"] = {k: str(v) for k, v in report["files"].items()}
        log.info(f"report: {ckpt / 'report'}")
        logger = make_logger(cfg, ckpt / "report", job_type="report", name="report")
        if logger is not None and type(logger).__name__ == "WandbLogger":
            log_to_wandb(report, logger.experiment)
    return out


def _log_run(cfg: DictConfig, run_dir: Path, ev: dict) -> None:
    logger = run_logger(cfg, run_dir, "evaluate", f"eval-{ev['name']}", run_dir)
    if logger is None:
        return
    scalars = {k: ev[k] for k in ("val_acc", "macro_f1", "bleu", "rouge_l", "class_agreement", "identical_outputs",
                                  "token_agreement", "own_token_agreement", "bleu_vs_source") if ev.get(k) is not None}
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
