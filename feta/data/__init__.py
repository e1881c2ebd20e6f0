"""Tasks and their data: classification over K verbalized classes, and generation (prompt -> target).

    spec = DataSpec(...)                      # conf/data/*.yaml
    dm = TaskDataModule(spec, tokenizer)      # examples -> batches (Task.encode)
    dm.task.encode(examples)                  # input_ids, attention_mask, labels, scored
    MixDataModule(MixSpec(tasks=[...]), tok)  # several tasks, batches of one task each (data=mix)
"""

from feta.data.datamodule import TaskDataModule, note_clamp, seeded_subset
from feta.data.files import read_file, read_splits
from feta.data.mix import MixDataModule, MixSpec
from feta.data.spec import DataSource, DataSpec, TaskKind
from feta.data.tasks import (IGNORE, ClassificationTask, GenerationTask, Task, encode_continuations, encode_prompts,
                             last_real_token, make_task)

__all__ = [
    "IGNORE", "ClassificationTask", "DataSource", "DataSpec", "GenerationTask", "MixDataModule", "MixSpec", "Task",
    "TaskDataModule", "TaskKind",
    "encode_continuations", "encode_prompts", "last_real_token", "make_task", "note_clamp", "read_file", "read_splits", "seeded_subset",
]
