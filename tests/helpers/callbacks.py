"""Callbacks for resume tests: simulated failures, a slowed-down step, and a record of each step's batch
and learning rate."""

import json
import time
from pathlib import Path

import lightning as L


class CrashAt(L.Callback):
    """Raise after optimizer step `step`, as a killed job would stop (after its last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


class SlowSteps(L.Callback):
    """Sleep before each step (or the given steps, counted from 1), after the previous step's checkpoint
    and validation, so a test can kill a tiny run between two checkpoints rather than after it ended."""

    def __init__(self, seconds: float, steps: list[int] | None = None) -> None:
        self.seconds, self.steps = seconds, steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.steps is None or trainer.global_step + 1 in self.steps:
            time.sleep(self.seconds)


class RecordBatches(L.Callback):
    """Append each training step's input ids and learning rate to a JSON-lines file, one line per step,
    flushed at once so the lines survive a kill -9. A resumed run appends the steps it redoes again; the
    last line per step wins."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        line = {"step": trainer.global_step + 1, "epoch": trainer.current_epoch,
                "lr": trainer.optimizers[0].param_groups[0]["lr"], "input_ids": batch["input_ids"].tolist()}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def recorded_batches(path: str | Path, field: str = "input_ids") -> dict[int, list | float]:
    """{step: input ids} (or another recorded field) from a RecordBatches file, the last record of each step."""
    steps = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            steps[row["step"]] = row[field]
    return steps
