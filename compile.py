"""Compile a trained prefix into a LoRA adapter that merges into the base model (feta/compile/).

    python compile.py ckpt=multirun/<date>/<time>/0           # method=sink, r=64: <run>/compiled-r64/
    python compile.py -m ckpt=multirun/<date>/<time>/0 rank=4,16,64
    python compile.py ckpt=<run> merge=true                   # also write the merged fp32 model
    python compile.py ckpt=<run> preset=faithful              # closed form + distillation, ~30 min on CPU
    python compile.py ckpt=<run> device=cuda dtype=bfloat16   # on a GPU, bf16 forwards (the fit stays float64)
    python compile.py ckpt=<PEFT adapter dir> data=sst2       # a plain PEFT prefix / prompt / LLaMA-Adapter
    python compile.py ckpt=<PEFT adapter dir> calib_file=prompts.txt model=smollm2
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from feta import runs
from feta.cli import cli, run_main, task_wrapper
from feta.compile.pipeline import compile_run
from feta.compile.source import resolve_source
from feta.compile.spec import CompileSpec
from feta.errors import UserError, check_path
from feta.schema import CompileConfig, check_output_dir, to_spec
from feta.tracking import compiled_artifact_name, log_artifact, make_logger, use_artifact

log = logging.getLogger("feta")


@task_wrapper
def compile_prefix(cfg: DictConfig) -> dict[str, Any]:
    settings: CompileConfig = OmegaConf.to_object(cfg)  # runs every check before anything is read or written
    spec = CompileSpec(**{name: getattr(settings, name) for name in CompileSpec.__dataclass_fields__})
    check_path(f"ckpt={settings.ckpt}", settings.ckpt, "directory", "pass a prefix run directory or a PEFT adapter directory")
    out = Path(settings.out_dir) if settings.out_dir else Path(settings.ckpt) / spec.dir_name
    check_output_dir("out_dir", out)
    if out.exists() and not settings.overwrite:
        raise UserError(f"out_dir={out}", "exists", "pass overwrite=true to replace it, or out_dir=<another dir>")

    source = resolve_source(settings.ckpt, to_spec(cfg, "model") if cfg.model else None,
                            to_spec(cfg, "data") if cfg.data else None, settings.calib_file, settings.base_model)
    # Read (and check) a run's metrics before anything is written; a plain PEFT adapter has none.
    metrics = (runs.read_json(Path(settings.ckpt) / runs.METRICS)
               if source.run_dir is not None and runs.is_finished(source.run_dir) else {})
    record = compile_run(source, spec, out, merge_dtype=settings.merge_dtype if settings.merge else None,
                         overwrite=settings.overwrite)
    agree = record["next_token"]
    log.info(f"compiled r={spec.rank} in {record['fit_time_s']:.0f} s; residual at the scored positions, "
             f"final layer {record['residual_last_final']:.3f}, mean {record['residual_last_mean']:.3f}; next-token "
             f"agreement {agree['next_token_agreement']:.3f} (base model {agree['base_next_token_agreement']:.3f}), KL "
             f"{agree['next_token_kl']:.4f} (base model {agree['base_next_token_kl']:.4f}); {out}")
    if "own_outputs" in record:
        own = record["own_outputs"]
        log.info(f"on the source's own greedy continuations of {own['prompts']} held-out prompts: identical "
                 f"{own['identical_outputs']:.1%}, BLEU against them {own['bleu_vs_source']:.1f}, token agreement "
                 f"{own['own_token_agreement']:.3f} (base model {own['base_own_token_agreement']:.3f}), KL "
                 f"{own['own_token_kl']:.4f}")

    logger = make_logger(cfg, out, job_type="compile", name=f"{metrics.get('name', source.ckpt.name)}->r{spec.rank}",
                         group=metrics.get("wandb_group"))
    if logger is not None:
        for key in ("last", "content", "all"):
            for layer, value in enumerate(record["residuals"][key]):
                logger.log_metrics({f"residual/{key}": value, "layer": layer})
        logger.log_metrics({**{k: record[k] for k in ("residual_last_final", "residual_last_mean", "fit_time_s")},
                            **{f"next_token/{k}": v for k, v in record["next_token"].items()},
                            **{f"own_outputs/{k}": v for k, v in record.get("own_outputs", {}).items()}})
        use_artifact(logger, metrics.get("artifact"), source.adapter_dir)  # a feta run's artifact only
        log_artifact(logger, out / runs.ADAPTER, name=compiled_artifact_name(metrics.get("artifact", "adapter"), out))
    return record


@hydra.main(version_base="1.3", config_path="conf", config_name="compile")
def main(cfg: DictConfig) -> float | None:
    record = run_main(compile_prefix, cfg)
    return None if record is None else record["residual_last_mean"]


if __name__ == "__main__":
    cli(main)
