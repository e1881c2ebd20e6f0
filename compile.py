"""Compile a trained prefix into a LoRA adapter that merges into the base model (feta/compiler.py).

    python compile.py ckpt=multirun/<date>/<time>/0 rank=4
    python compile.py -m ckpt=multirun/<date>/<time>/0 rank=1,2,4,8,16,32
    python compile.py ckpt=<run> rank=4 merge=true            # also write the merged fp32 model
    python compile.py ckpt=<run> preset=faithful              # closed form + distillation, ~30 min on CPU
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from feta import runs
from feta.compiler import CompileSpec, compile_run, merge_compiled
from feta.tracking import log_artifact, make_logger, task_wrapper

log = logging.getLogger("feta")
DTYPES = ("float32", "float16", "bfloat16")


def out_dir_for(cfg: DictConfig, spec: CompileSpec) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    name = (f"compiled-r{spec.rank}" + ("" if spec.method == "lstsq" else f"-{spec.method}")
            + ("" if spec.target == "o" else f"-{spec.target.replace('+', '_')}")
            + ("-nobias" if not spec.bias and spec.method != "distill" else ""))
    return Path(cfg.ckpt) / name


@task_wrapper
def compile_prefix(cfg: DictConfig) -> dict[str, Any]:
    spec = CompileSpec(**{f.name: cfg[f.name] for f in dataclasses.fields(CompileSpec)})
    if cfg.merge_dtype not in DTYPES:
        raise ValueError(f"merge_dtype must be one of {', '.join(DTYPES)}, got {cfg.merge_dtype!r}")
    out = out_dir_for(cfg, spec)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it or out_dir=<another dir>")

    record = compile_run(cfg.ckpt, spec, out, model_override=cfg.base_model)
    if cfg.merge:
        record["merge"] = merge_compiled(out, cfg.merge_dtype)
        runs.write_json(out / "compile.json", record)
    log.info(f"compiled r={spec.rank} in {record['fit_time_s']:.0f} s; residual at the classified token, "
             f"final layer {record['residual_last_final']:.3f}, mean {record['residual_last_mean']:.3f}; {out}")

    source = runs.read_json(Path(cfg.ckpt) / runs.METRICS) if runs.is_finished(cfg.ckpt) else {}
    logger = make_logger(cfg, out, job_type="compile", name=f"{source.get('name', 'prefix')}->r{spec.rank}",
                         group=source.get("wandb_group"))
    if logger is not None:
        for key in ("last", "content", "all"):
            for layer, value in enumerate(record["residuals"][key]):
                logger.log_metrics({f"residual/{key}": value, "layer": layer})
        logger.log_metrics({k: record[k] for k in ("residual_last_final", "residual_last_mean", "fit_time_s")})
        log_artifact(logger, out / runs.ADAPTER, name=f"compiled-{out.parent.name}-{out.name}", type_="adapter")
    return record


@hydra.main(version_base="1.3", config_path="conf", config_name="compile")
def main(cfg: DictConfig) -> float:
    return compile_prefix(cfg)["residual_last_mean"]


if __name__ == "__main__":
    main()
