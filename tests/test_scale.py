"""Scaling out: Hydra launchers (joblib, SLURM), relaunching a sweep, DDP on 2 CPU processes, GPU per job."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from feta.devices import claim_gpu
from tests.conftest import ROOT, compose_cfg

# Dropout off: it draws different random numbers in each DDP process, which no sampler can align.
NO_DROPOUT = ["++model.config.resid_pdrop=0.0", "++model.config.embd_pdrop=0.0", "++model.config.attn_pdrop=0.0"]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_launcher_configs_compose():
    cfg = compose_cfg("train", ["hydra/launcher=local_parallel"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher.backend == "loky"

    cfg = compose_cfg("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    # Lightning under SLURM needs one task per device.
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    assert launcher.max_num_timeout >= 1 and launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)


def test_joblib_sweep_runs_in_parallel_processes_and_relaunch_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = ["-m", "hydra/launcher=local_parallel", "debug=fast", "adapter=prefix,lora", "logger=wandb",
           f"hydra.sweep.dir={sweep}"]
    # logger=wandb with WANDB_MODE=disabled: W&B is off, nothing is written, nothing crashes.
    _run(cmd, WANDB_MODE="disabled")
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [m["adapter"] for m in metrics] == ["prefix", "lora"]
    # Two worker processes (the basic launcher would run both jobs in the launching process, one after
    # the other), and the jobs overlapped in time.
    assert metrics[0]["pid"] != metrics[1]["pid"]
    assert max(m["started_at"] for m in metrics) < min(m["finished_at"] for m in metrics)
    assert metrics[0]["wandb_group"] == metrics[1]["wandb_group"] == "-".join(sweep.parts[-2:])
    for i in (0, 1):
        wandb_dir = sweep / str(i) / "wandb"
        assert not wandb_dir.exists() or not any(wandb_dir.iterdir()), list(wandb_dir.iterdir())

    # Relaunching the same command skips both finished jobs: nothing is retrained or rewritten.
    stamps = [(sweep / str(i) / "metrics.json").stat().st_mtime_ns for i in (0, 1)]
    _run(cmd, WANDB_MODE="disabled")
    assert [(sweep / str(i) / "metrics.json").stat().st_mtime_ns for i in (0, 1)] == stamps
    for i in (0, 1):
        assert "already finished (skip_finished=true)" in (sweep / str(i) / "train.log").read_text()


def test_parallel_jobs_claim_different_gpus(tmp_path):
    fd = os.open(tmp_path / ".gpu1.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another worker trains on GPU 1
    try:
        assert claim_gpu(tmp_path, job_num=3, n_gpus=2) == 0  # 3 % 2 = 1 is taken: GPU 0, not shared
        assert claim_gpu(tmp_path, job_num=1, n_gpus=2) == 0  # this worker's next job: frees GPU 0 first
    finally:
        os.close(fd)
    assert claim_gpu(tmp_path, job_num=1, n_gpus=2) == 1


@pytest.mark.slow  # ~40 s: three processes on 2 busy cores
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 processes x batch 4 (gloo) train the same LoRA as 1 process x batch 8.

    Both runs use strategy=ddp, so both draw their order from Lightning's DistributedSampler (a seeded
    permutation; rank r takes every 2nd index), and each step's global batch is the same 8 sentences.
    DDP averages the two ranks' mean losses' gradients = the mean over 8, so the updates agree up to
    float32 summation order and per-rank padding: measured max |diff| 2e-8 after 4 steps, against 7e-3
    for a plain single-device run whose DataLoader shuffles in another order. Tolerance: 1e-6.
    """
    common = ["debug=fast", "adapter=lora", "trainer=ddp", "trainer.accelerator=cpu", *NO_DROPOUT]
    _run([*common, "trainer.devices=2", "data.batch_size=4", f"output_dir={tmp_path / 'ddp2'}",
          f"hydra.run.dir={tmp_path / 'h2'}"], WANDB_MODE="disabled")
    _run([*common, "trainer.devices=1", "data.batch_size=8", f"output_dir={tmp_path / 'ddp1'}",
          f"hydra.run.dir={tmp_path / 'h1'}"], WANDB_MODE="disabled")
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp2", "ddp1"))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["global_step"] == one["global_step"] == 4
    a, b = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in ("ddp2", "ddp1"))
    assert set(a) == set(b) and any("lora_B" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
        if "lora_B" in k:  # starts at zero: training moved it by far more than the tolerance
            assert b[k].abs().max() > 1e-3, k
