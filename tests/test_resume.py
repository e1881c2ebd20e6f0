"""Resuming an interrupted run: `kill -9` a tiny LoRA run (dropout on) after a checkpoint, rerun the same
command, and the adapter, the step count and every step's batch equal the uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from feta.data import TaskDataModule
from feta.data.datamodule import ResumableDistributedShuffle
from feta.models import load_base_model
from feta.schema import to_spec
from feta.checkpoints import AtomicCheckpointIO
from tests.conftest import ROOT, tiny_train_cfg
from tests.helpers.callbacks import recorded_batches

TOLERANCE = 1e-6  # measured: 0.0 (the resumed run repeats the same float operations)
# gpt2_tiny at batch 8 on 64 sentences: 8 steps per epoch, so 12 steps cross an epoch boundary.
# A decaying LR: a resumed run must continue the schedule, not restart it.
FAST = ["debug=fast", "adapter=lora", "~logger", "trainer.max_epochs=2", "trainer.max_steps=12",
        "checkpoint_every_n_steps=1", "lr_schedule=linear", "warmup_steps=2",
        # 2 s before step 9: the test sees checkpoint 8 and kills the run before step 9 ends.
        "+callbacks.slow._target_=tests.helpers.callbacks.SlowSteps", "+callbacks.slow.seconds=2",
        "+callbacks.slow.steps=[9]"]


def _command(run: Path, args: list[str]) -> list[str]:
    """train.py with `args` into `run`, recording each step's batch into <run>-batches.jsonl."""
    return [sys.executable, "train.py", *args, f"output_dir={run}", f"hydra.run.dir={run}-hydra",
            "+callbacks.record._target_=tests.helpers.callbacks.RecordBatches",
            f"+callbacks.record.path={run}-batches.jsonl"]


def _env() -> dict[str, str]:
    # One thread: on shared cores, idle-spinning threads slow gpt2_tiny's tiny matmuls several-fold.
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _start(cmd: list[str], run: Path) -> subprocess.Popen:
    log = run.parent / f"{run.name}.log"
    with log.open("a") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _finished(proc: subprocess.Popen, run: Path) -> dict:
    """Wait for a run started by `_start`; its metrics.json."""
    assert proc.wait(timeout=600) == 0, (run.parent / f"{run.name}.log").read_text()[-3000:]
    return json.loads((run / "metrics.json").read_text())


def _checkpoint_step(run: Path) -> int:
    """The step of the run's last.ckpt, -1 when there is none yet."""
    path = run / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return -1
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def _kill_after_checkpoint(cmd: list[str], run: Path, k: int, delay: float = 0.0) -> int:
    """Start `cmd`, kill -9 it `delay` s after its last.ckpt reaches step k; returns the checkpoint's step."""
    proc = _start(cmd, run)
    deadline = time.monotonic() + 300
    try:
        while _checkpoint_step(run) < k:
            assert proc.poll() is None, f"the run ended before checkpoint {k}; see {run.name}.log"
            assert time.monotonic() < deadline, f"no checkpoint {k} after 300 s"
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill; see {run.name}.log"
    assert not (run / "metrics.json").exists()
    return _checkpoint_step(run)  # it loads: a kill cannot leave it half-written


def _max_abs_diff(a: Path, b: Path) -> float:
    x, y = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert set(x) == set(y) and any("lora_B" in k for k in x)
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory) -> dict:
    """The uninterrupted reference and a run killed after checkpoint 8 (the first epoch's last step,
    which the epoch's validation follows), then rerun with the same command."""
    root = tmp_path_factory.mktemp("resume")
    ref, run = root / "reference", root / "killed"
    proc = _start(_command(ref, FAST), ref)  # alongside the killed run: two processes, two cores
    try:
        killed_at = _kill_after_checkpoint(_command(run, FAST), run, k=8)
        resumed = _finished(_start(_command(run, FAST), run), run)
        reference = _finished(proc, ref)
    finally:
        proc.kill()  # only if a failure left it running
    return {"root": root, "ref": ref, "run": run, "reference": reference, "resumed": resumed,
            "killed_at": killed_at}


def test_gpt2_tiny_trains_with_dropout():
    base, _ = load_base_model(to_spec(tiny_train_cfg(Path("unused")), "model"))
    # Without dropout a resumed run would match even with a wrong RNG restore.
    assert base.config.resid_pdrop > 0 and base.config.attn_pdrop > 0


def test_killed_run_resumes_to_the_uninterrupted_adapter(killed_once):
    ref, resumed, killed_at = killed_once["reference"], killed_once["resumed"], killed_once["killed_at"]
    assert killed_at == 8
    assert resumed["resumed_from_step"] == killed_at  # really resumed mid-run, from where it was killed
    assert resumed["global_step"] == ref["global_step"] == 12 and resumed["epochs"] == ref["epochs"]
    assert _max_abs_diff(killed_once["ref"], killed_once["run"]) <= TOLERANCE
    assert resumed["val_loss"] == pytest.approx(ref["val_loss"], abs=TOLERANCE)


def test_resumed_run_sees_the_uninterrupted_batches(killed_once):
    root = killed_once["root"]
    reference = recorded_batches(root / "reference-batches.jsonl")
    resumed = recorded_batches(root / "killed-batches.jsonl")
    assert sorted(reference) == sorted(resumed) == list(range(1, 13))
    assert [s for s in reference if reference[s] != resumed[s]] == []
    # The two epochs are two different orders of the same 64 sentences.
    assert reference[1] != reference[9]


def test_resumed_run_continues_the_lr_schedule(killed_once):
    root = killed_once["root"]
    reference = recorded_batches(root / "reference-batches.jsonl", field="lr")
    resumed = recorded_batches(root / "killed-batches.jsonl", field="lr")
    # Step k runs after k-1 scheduler steps: warmup s/2, then linear decay (12-s)/10, times adapter.lr 1e-3.
    expected = [1e-3 * (s / 2 if s < 2 else (12 - s) / 10) for s in range(12)]
    assert [reference[k] for k in range(1, 13)] == pytest.approx(expected, rel=1e-12)
    assert [resumed[k] for k in range(1, 13)] == [reference[k] for k in range(1, 13)]


def test_checkpoint_holds_the_loader_position(killed_once):
    ckpt = torch.load(killed_once["run"] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 12
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # Step 12 = the 4th batch of 8 in the second epoch.
    assert loader["_sampler_iter_state"]["sampler_state"] == {"epoch": 1, "position": 4 * 8}
    assert ckpt["torch_rng_state"].dtype == torch.uint8


@pytest.mark.parametrize("n", [64, 61])  # 61: a short last batch
def test_training_order_is_the_plain_shuffled_dataloaders(tmp_path, n):
    """The resumable loader gives the batches `DataLoader(shuffle=True, generator=seeded)` gives
    Lightning (which takes len(loader) batches an epoch), every epoch, so runs keep their numbers."""
    cfg = tiny_train_cfg(tmp_path, f"data.train_limit={n}", "seed=3")
    dm = TaskDataModule(to_spec(cfg, "data"), load_base_model(to_spec(cfg, "model"))[1], seed=cfg.seed)
    dm.setup()
    plain = DataLoader(dm.splits["train"], batch_size=dm.spec.batch_size, shuffle=True, collate_fn=dm.collate,
                       generator=torch.Generator().manual_seed(cfg.seed))
    resumable = dm.train_dataloader()
    assert len(resumable) == len(plain) == 8
    for epoch in range(3):
        resumable.sampler.set_epoch(epoch)  # as Lightning does
        expected, got = iter(plain), iter(resumable)
        for _ in range(len(plain)):
            assert torch.equal(next(expected)["input_ids"], next(got)["input_ids"]), f"epoch {epoch}"


def test_ddp_order_is_lightnings_distributed_samplers():
    """Under DDP each process takes its share of the order Lightning's DistributedSampler would draw."""
    data = list(range(61))
    for rank in (0, 1):
        ours = ResumableDistributedShuffle(data, seed=3, num_replicas=2, rank=rank)
        lightnings = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for epoch in range(3):
            ours.set_epoch(epoch)
            lightnings.set_epoch(epoch)
            assert list(ours) == list(lightnings) and len(list(ours)) == 31


def test_loader_resumes_at_every_position(tmp_path):
    """A fresh loader given the state after any batch continues that epoch and then the next ones."""
    cfg = tiny_train_cfg(tmp_path, "data.train_limit=40")
    dm = TaskDataModule(to_spec(cfg, "data"), load_base_model(to_spec(cfg, "model"))[1], seed=cfg.seed)

    def stream(loader, start_epoch: int = 0) -> list[torch.Tensor]:
        out = []
        for epoch in range(start_epoch, 3):
            loader.sampler.set_epoch(epoch)
            out += [b["input_ids"] for b in loader]
        return out

    whole = stream(dm.train_dataloader())
    per_epoch = len(whole) // 3
    for stop in range(1, 2 * per_epoch + 1):  # stopped after batch `stop` (of epoch `epoch`)
        first, epoch, seen = dm.train_dataloader(), (stop - 1) // per_epoch, []
        for e in range(epoch + 1):
            first.sampler.set_epoch(e)
            it = iter(first)
            seen += [next(it)["input_ids"] for _ in range(per_epoch if e < epoch else stop - e * per_epoch)]
        second = dm.train_dataloader()
        second.load_state_dict(first.state_dict())
        rest = stream(second, epoch)
        assert len(seen) + len(rest) == len(whole), stop
        assert all(torch.equal(a, b) for a, b in zip(seen + rest, whole)), stop


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "w": torch.ones(4)}, path)
    with pytest.raises(Exception):  # dies while writing: a lambda cannot be pickled
        io.save_checkpoint({"global_step": 4, "w": torch.ones(4), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the failed write's partial file is gone


@pytest.mark.slow  # ~3 min: 12 processes of gpt2_tiny
def test_ten_random_kills_across_two_epochs(tmp_path):
    """10 kills at seeded random steps of a 2-epoch, 30-step run, each a random part of a step after the
    checkpoint (in the next step, its checkpoint write or a validation), each resumed with the same command."""
    args = ["debug=fast", "adapter=lora", "~logger", "data.train_limit=120", "trainer.max_epochs=2",
            "trainer.max_steps=-1", "checkpoint_every_n_steps=1",
            "+callbacks.slow._target_=tests.helpers.callbacks.SlowSteps", "+callbacks.slow.seconds=0.2"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    proc = _start(_command(ref, args), ref)
    rng = random.Random(0)
    killed_at = [0]
    try:
        for k in sorted(rng.sample(range(1, 25), 10)):
            killed_at.append(_kill_after_checkpoint(_command(run, args), run, k=max(k, killed_at[-1] + 1),
                                                    delay=rng.uniform(0, 0.3)))
        resumed = _finished(_start(_command(run, args), run), run)
        reference = _finished(proc, ref)
    finally:
        proc.kill()
    killed_at = killed_at[1:]
    assert len(killed_at) == 10 and killed_at == sorted(set(killed_at)) and killed_at[-1] < 30
    assert any(s < 15 for s in killed_at) and any(s > 15 for s in killed_at)  # kills in both epochs
    assert resumed["resumed_from_step"] == killed_at[-1]
    assert resumed["global_step"] == reference["global_step"] == 30 and resumed["epochs"] == reference["epochs"]
    assert _max_abs_diff(ref, run) <= TOLERANCE
    a, b = (recorded_batches(tmp_path / f"{n}-batches.jsonl") for n in ("reference", "killed"))
    assert sorted(a) == sorted(b) == list(range(1, 31)) and all(a[s] == b[s] for s in a)


@pytest.mark.slow  # ~1.5 min: 3 processes
def test_ddp_run_resumes_from_an_epochs_last_step(tmp_path):
    """strategy=ddp (one CPU process) keeps the loader's place in DistributedSampler's order too: a crash
    in step 9 resumes from checkpoint 8, the first epoch's last, and trains steps 9-12."""
    args = [a for a in FAST if "callbacks.slow" not in a] + ["trainer=ddp", "trainer.accelerator=cpu",
                                                           "trainer.devices=1"]
    crash = ["+callbacks.crash._target_=tests.helpers.callbacks.CrashAt", "+callbacks.crash.step=9"]
    ref, run = tmp_path / "reference", tmp_path / "crashed"
    proc = _start(_command(ref, args), ref)
    try:
        assert _start(_command(run, args + crash), run).wait(timeout=600) != 0
        resumed = _finished(_start(_command(run, args), run), run)
        reference = _finished(proc, ref)
    finally:
        proc.kill()
    assert resumed["resumed_from_step"] == 8
    assert resumed["global_step"] == reference["global_step"] == 12
    assert _max_abs_diff(ref, run) <= TOLERANCE
