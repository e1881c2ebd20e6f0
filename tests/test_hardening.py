"""Faults a run must survive without a wrong result: two writers at one directory, a write that fails
(a full disk), a loss that turns non-finite, a stale lock, a CSV with a byte-order mark, a clamped size."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import feta.checkpoints
from feta import storage
from feta.data import TaskDataModule, read_file
from feta.errors import UserError
from feta.models import load_base_model
from feta.schema import to_spec
from compile import compile_prefix
from evaluate import evaluate
from tests.conftest import ROOT, compile_cfg, compose_cfg, tiny_train_cfg
from train import train

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _train_command(run: Path, *args: str) -> list[str]:
    return [sys.executable, "train.py", "debug=fast", "~logger", "adapter=lora", *args, f"output_dir={run}",
            f"hydra.run.dir={run}-hydra-{re.sub(r'[^a-z0-9]+', '_', ' '.join(args))}"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _adapter_rank(run: Path) -> tuple[int, int]:
    """(r in config.yaml, r in the saved adapter_config.json)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return cfg["adapter"]["r"], json.loads((run / "adapter" / "adapter_config.json").read_text())["r"]


def test_two_trainings_started_together_at_one_output_dir(tmp_path):
    """Exactly one trains; the other exits 2 with one line; config.yaml and the adapter agree."""
    run = tmp_path / "run"
    procs = [_start(_train_command(run, f"adapter.r={r}")) for r in (2, 4)]
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    refused = next(err for code, err in outs if code == 2)
    assert "Traceback" not in refused
    # Whoever came second met the lock, or (had the first finished already) its config.
    assert re.search(r"^error: output_dir=.*: (is being written by process \d+ \(lock .*\.run\.lock\)|holds a run "
                     r"with a different 'adapter')", _error_line(refused)), refused[-2000:]
    config_r, adapter_r = _adapter_rank(run)
    assert config_r == adapter_r


def test_a_second_writer_meets_the_lock_and_a_killed_holder_leaves_it(tmp_path):
    run = tmp_path / "run"
    slow = ("+callbacks.slow._target_=tests.helpers.callbacks.SlowSteps", "+callbacks.slow.seconds=60",
            "+callbacks.slow.steps=[2]")
    holder = _start(_train_command(run, "trainer.max_steps=4", *slow))
    lock = storage.lock_file(run)
    deadline = time.time() + 300
    while not (run / "config.yaml").is_file() and time.time() < deadline:  # the holder is training
        assert holder.poll() is None, holder.stderr.read()[-2000:]
        time.sleep(0.5)
    assert lock.read_text().strip() == str(holder.pid)

    second = subprocess.run(_train_command(run, "trainer.max_steps=4"), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 2 and holder.poll() is None, second.stderr[-2000:]
    assert _error_line(second.stderr) == (f"error: output_dir={run}: is being written by process {holder.pid} "
                                          f"(lock {lock}); wait for that process to end, or write elsewhere")

    holder.kill()  # like kill -9: the lock file stays, but its flock dies with the process
    holder.wait()
    assert lock.is_file()
    third = subprocess.run(_train_command(run, "trainer.max_steps=4"), cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4
    assert not lock.exists()


def test_path_lock_in_process(tmp_path):
    target = tmp_path / "new" / "deeper" / "run"
    with storage.path_lock("output_dir=x", target):
        with pytest.raises(UserError, match=rf"output_dir=x: is being written by process {os.getpid()} "):
            with storage.path_lock("output_dir=x", target):
                pass
    assert not (tmp_path / "new").exists()  # the parents made for the lock are gone with it
    stale = storage.lock_file(tmp_path / "run")
    stale.write_text("999999999\n")  # a holder that died without removing its file
    with storage.path_lock("output_dir=run", tmp_path / "run"):
        assert stale.read_text() == f"{os.getpid()}\n"


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_checkpoint_write_keeps_the_last_one_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
    overrides = ("adapter=lora", "~logger", "trainer.max_steps=8", "checkpoint_every_n_steps=2")
    cfg = tiny_train_cfg(tmp_path / "a", *overrides)
    save, calls = torch.save, []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of step 4
            _no_space()
        return save(*args, **kwargs)

    monkeypatch.setattr(feta.checkpoints.torch, "save", save_then_fail)
    with pytest.raises(UserError, match=r"last\.ckpt: could not be written \(No space left on device\); free disk"):
        train(cfg)
    monkeypatch.setattr(feta.checkpoints.torch, "save", save)
    run = Path(cfg.output_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not list((run / "checkpoints").glob("*.partial")) and not (run / "metrics.json").exists()

    resumed, _ = train(cfg)
    assert resumed["resumed_from_step"] == 2 and resumed["global_step"] == 8
    whole_cfg = tiny_train_cfg(tmp_path / "b", *overrides)
    train(whole_cfg)
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(whole_cfg.output_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_failed_writes_keep_the_previous_file_and_directory(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    storage.write_json(path, {"a": 1})
    monkeypatch.setattr(storage.os, "replace", _no_space)
    with pytest.raises(UserError, match=r"eval\.json: could not be written \(No space left on device\)"):
        storage.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["eval.json"]

    folder = tmp_path / "adapter"
    with storage.atomic_dir(folder) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(UserError, match=r"adapter: could not be written \(No space left on device\)"):
        with storage.atomic_dir(folder) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
            _no_space()
    assert (folder / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "eval.json"]


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = tiny_train_cfg(tmp_path, "adapter=lora", "adapter.lr=1e30", "~logger", "checkpoint_every_n_steps=1")
    with pytest.raises(UserError, match=r"training step (\d+): the training (loss is nan|loss is inf|weights hold)") as e:
        train(cfg)
    step = int(re.search(r"training step (\d+)", str(e.value)).group(1))
    run = Path(cfg.output_dir)
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()
    if step > 1:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == step - 1
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_utf8_byte_order_mark_is_not_part_of_the_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\na fine film,pos\n".encode("utf-8-sig"))
    assert read_file(path, ["text", "label"]) == [{"text": "a fine film", "label": "pos"}]


def test_a_size_above_what_there_is_says_both_numbers(tmp_path, caplog):
    cfg = tiny_train_cfg(tmp_path, "data.train_limit=100000", "data.val_limit=5000")
    model_spec, data_spec = to_spec(cfg, "model"), to_spec(cfg, "data")
    _, tokenizer = load_base_model(model_spec)
    with caplog.at_level(logging.WARNING, logger="feta"):
        dm = TaskDataModule(data_spec, tokenizer)
        dm.setup()
    n_train, n_val = len(dm.splits["train"]), len(dm.splits["validation"])
    assert n_train < 100000 and n_val < 5000
    assert f"data.train_limit=100000 is more than the {n_train:,} examples there are: using all {n_train:,}" in caplog.text
    assert f"data.val_limit=5000 is more than the {n_val:,} examples there are" in caplog.text



def test_compile_and_evaluate_meet_a_held_lock(prefix_run, tmp_path):
    out = tmp_path / "compiled"
    with storage.path_lock("held by the test", out):
        with pytest.raises(UserError, match=rf"out_dir={out}: is being written by process {os.getpid()} "):
            compile_prefix(compile_cfg(prefix_run, f"out_dir={out}", "~logger"))
    assert not out.exists()
    with storage.path_lock("held by the test", prefix_run / "eval.json"):
        with pytest.raises(UserError, match=rf"ckpt={prefix_run}: is being written by process {os.getpid()} "):
            evaluate(compose_cfg("evaluate", [f"ckpt={prefix_run}", "~logger", "latency.enabled=false",
                                              "overwrite=true"]))
