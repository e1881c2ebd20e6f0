"""train.py on gpt2_tiny: the run-directory contract, adapter round trip, resume, sweeps, bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft import PeftModel

from feta.models import load_base_model
from feta.scoring import class_log_probs
from feta.schema import to_spec
from tests.conftest import ROOT, tiny_train_cfg
from tests.helpers.callbacks import recorded_batches
from train import train


def _batch(dm, n=16):
    dm.setup()
    return dm.collate(dm.splits["validation"][:n])


@pytest.mark.parametrize("adapter", ["prefix", "lora"])
def test_run_writes_contract_and_adapter_round_trips(tmp_path, adapter):
    cfg = tiny_train_cfg(tmp_path, f"adapter={adapter}", "logger=wandb", "logger.mode=offline", "adapter.init=random" if adapter == "prefix" else "adapter.alpha=8")
    metrics, obj = train(cfg)
    run = Path(cfg.output_dir)
    for rel in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "checkpoints/last.ckpt", "metrics.json"):
        assert (run / rel).is_file(), rel
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["global_step"] == 4 and saved["val_size"] == 64 and 0.0 <= saved["val_acc"] <= 1.0

    trained = obj["model"].eval()
    n_peft, _ = trained.get_nb_trainable_parameters()
    assert saved["trainable_params"] == n_peft > 0

    # Reload with plain PEFT on a fresh base model: the same logits, bit for bit.
    base, _ = load_base_model(to_spec(cfg, "model"))
    batch = _batch(obj["datamodule"])
    ids = obj["datamodule"].task.verbalizer_ids
    with torch.no_grad():
        fresh_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fresh_label_logits = class_log_probs(base, batch["input_ids"], batch["attention_mask"], ids)
    reloaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()  # wraps `base` in place
    with torch.no_grad():
        a = class_log_probs(trained, batch["input_ids"], batch["attention_mask"], ids)
        b = class_log_probs(reloaded, batch["input_ids"], batch["attention_mask"], ids)
        with trained.disable_adapter():
            base_after = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    # Training touched only the adapter: the frozen base computes exactly what a fresh one does.
    assert torch.equal(base_after, fresh_logits)
    # ...and the adapter did learn something (its output differs from the base model's).
    assert not torch.allclose(a, fresh_label_logits)


def test_base_weights_bit_identical(tmp_path):
    cfg = tiny_train_cfg(tmp_path, "adapter=lora")
    _, obj = train(cfg)
    fresh, _ = load_base_model(to_spec(cfg, "model"))
    fresh_sd = fresh.state_dict()
    trained_sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in obj["model"].state_dict().items() if "lora_" not in k}
    assert set(trained_sd) == set(fresh_sd)
    assert all(torch.equal(trained_sd[k], fresh_sd[k]) for k in fresh_sd)


def test_resume_after_crash_continues_at_last_checkpoint(tmp_path):
    cfg = tiny_train_cfg(tmp_path, "trainer.max_steps=6", "+callbacks.crash._target_=tests.helpers.callbacks.CrashAt",
                         "+callbacks.crash.step=5")
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        train(cfg)
    run = Path(cfg.output_dir)
    assert (run / "checkpoints/last.ckpt").is_file() and not (run / "metrics.json").exists()
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    # Only the adapter's tensors are checkpointed, not the frozen base model.
    assert set(ckpt["state_dict"]) == {"model.prompt_encoder.default.embedding.weight"}

    with open_dict(cfg):
        cfg.callbacks = {}
    metrics, _ = train(cfg)
    assert metrics["resumed_from_step"] == 4 and metrics["global_step"] == 6


def test_finished_run_is_not_redone_or_overwritten(tmp_path):
    cfg = tiny_train_cfg(tmp_path)
    first, _ = train(cfg)
    path = Path(cfg.output_dir) / "metrics.json"
    stamp = path.stat().st_mtime_ns
    again, objects = train(cfg)
    assert objects == {} and again == first and path.stat().st_mtime_ns == stamp


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny_train_cfg(tmp_path)
    first, _ = train(cfg)
    for flag in ("skip_finished=true", "skip_finished=false"):  # a finished run is not another config's result
        other = tiny_train_cfg(tmp_path, "adapter.m=8", flag)
        with pytest.raises(ValueError, match=r"different 'adapter'"):
            train(other)
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text()) == first


def test_resume_refuses_a_different_lr_schedule(tmp_path):
    train(tiny_train_cfg(tmp_path))
    other = tiny_train_cfg(tmp_path, "lr_schedule=cosine", "skip_finished=false")
    with pytest.raises(ValueError, match=r"different 'lr_schedule' \(constant vs cosine\)"):
        train(other)


def test_cosine_schedule_sets_each_steps_lr(tmp_path):
    record = tmp_path / "steps.jsonl"
    cfg = tiny_train_cfg(tmp_path, "lr_schedule=cosine", "adapter.lr=0.01",
                         "+callbacks.record._target_=tests.helpers.callbacks.RecordBatches",
                         f"+callbacks.record.path={record}")
    metrics, _ = train(cfg)
    lrs = recorded_batches(record, field="lr")
    n = metrics["global_step"]
    assert n == 4
    # Half a cosine from 0.01 to 0 over the 4 steps, by hand: 0.01 * (1 + cos(pi * s / 4)) / 2.
    assert [lrs[k] for k in range(1, n + 1)] == pytest.approx([0.01, 0.0085355339, 0.005, 0.0014644661], rel=1e-8)


def test_two_job_multirun_writes_two_runs_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "debug=fast", "adapter=prefix,lora", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [m["adapter"] for m in metrics] == ["prefix", "lora"]
    assert metrics[0]["wandb_group"] == metrics[1]["wandb_group"] == "-".join(sweep.parts[-2:])
