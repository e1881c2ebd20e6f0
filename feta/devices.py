"""Which device a job trains on when a parallel launcher runs several jobs on one multi-GPU machine.

No Hydra launcher assigns GPUs: with `hydra/launcher=local_parallel` every job
would otherwise pick GPU 0. A one-GPU job claims a GPU of its own with an exclusive lock file in the
sweep directory (`.gpu<i>.lock`), starting from GPU `hydra.job.num % n_gpus`. A joblib worker keeps its
lock until it starts its next job, so with `n_jobs` = number of GPUs no two running jobs share one.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("feta")
_held: int | None = None  # the lock file descriptor this process holds on its GPU


def claim_gpu(lock_dir: Path, job_num: int, n_gpus: int) -> int:
    """Index of a GPU no other process holds, preferring `job_num % n_gpus`; shares one if all are held."""
    global _held
    if _held is not None:  # this worker's previous job is done
        os.close(_held)
        _held = None
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_gpus):
        i = (job_num + k) % n_gpus
        fd = os.open(lock_dir / f".gpu{i}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held = fd
        return i
    i = job_num % n_gpus
    log.warning(f"all {n_gpus} GPUs are held by other jobs of this sweep; job {job_num} shares GPU {i} "
                f"(set hydra.launcher.n_jobs <= {n_gpus})")
    return i


def job_devices(cfg: DictConfig) -> Any:
    """`trainer.devices` for this job: `[gpu index]` for a one-GPU job under the joblib launcher on a
    machine with several GPUs, else `cfg.trainer.devices` unchanged."""
    devices = cfg.trainer.get("devices", 1)
    if devices != 1 or cfg.trainer.get("accelerator") not in ("gpu", "cuda", "auto"):
        return devices
    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra (tests, notebooks)
        return devices
    if hc.mode != RunMode.MULTIRUN or "joblib" not in str(hc.launcher.get("_target_", "")):
        return devices
    n = torch.cuda.device_count()
    if n < 2:
        return devices
    gpu = claim_gpu(Path(hc.sweep.dir), int(hc.job.num), n)
    log.info(f"job {hc.job.num} trains on GPU {gpu} of {n}")
    return [gpu]
