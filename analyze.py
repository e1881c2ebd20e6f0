"""Analyze one trained run (feta/analysis.py): what evaluate.py's scores do not show.

    python analyze.py analysis=equivalence ckpt=<prefix run> analysis.lora=<LoRA run>   # the FETA measurements
    python analyze.py analysis=task_vector ckpt=<LoRA run | compiled dir> analysis.precision=fp16
    python analyze.py analysis=interpolate ckpt=<prefix run A> analysis.other=<prefix run B>

Each writes <ckpt>/analysis/ (JSON, CSV and figures) and logs them to the run's W&B group.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from feta.analysis import run_analysis
from feta.cli import cli, run_main, task_wrapper
from feta.errors import check_path
from feta.schema import AnalyzeConfig, check_output_dir


@task_wrapper
def analyze(cfg: DictConfig) -> dict[str, Any]:
    settings: AnalyzeConfig = OmegaConf.to_object(cfg)  # every check, before anything is read or written
    ckpt = check_path(f"ckpt={settings.ckpt}", settings.ckpt, "directory", "pass a run or compiled directory")
    check_output_dir("ckpt", ckpt / "analysis")
    return run_analysis(cfg, ckpt, settings.val_limit, settings.val_seed)


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    run_main(analyze, cfg)


if __name__ == "__main__":
    cli(main)
