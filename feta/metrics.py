"""Task metrics: classification through one torchmetrics collection (usable in a LightningModule's
validation loop and in evaluation alike), generation through sacrebleu BLEU and rouge-score ROUGE-L."""

from __future__ import annotations

from itertools import zip_longest

import sacrebleu
import torch
from rouge_score import rouge_scorer
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassRecall)


# Which way is better for each metric a run records: +1 higher, -1 lower. A sweep's objective is returned
# times its sign, so that higher always means better to the sweeper.
DIRECTION = {"val_acc": 1, "val_macro_f1": 1, "val_token_acc": 1, "val_loss": -1, "bleu": 1, "rouge_l": 1,
             "val_task_mean": 1, "task_mean": 1}
# What each task kind's training validation records (metrics.json), the choices of `optimized_metric`.
# A mixture (data=mix) records each task's as val_<task>_<metric>, and val_task_mean, the mean of their
# main metrics.
TRAIN_METRICS = {"classification": ("val_acc", "val_macro_f1", "val_loss"), "generation": ("val_token_acc", "val_loss"),
                 "mixture": ("val_task_mean",)}


def classification_metrics(num_classes: int) -> MetricCollection:
    """val_acc (micro accuracy), macro_f1, per_class_acc (each class's recall: the accuracy on its
    examples) and confusion (rows true class, columns predicted), keyed as in eval.json.

    update(preds, labels) takes class indices (N,) or scores (N, K) against labels (N,). torchmetrics
    leaves a class out of macro_f1 when it has neither examples nor predictions, and gives a class
    without examples a per_class_acc of 0.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return MetricCollection({
        "val_acc": MulticlassAccuracy(num_classes, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        "per_class_acc": MulticlassRecall(num_classes, average=None),
        "confusion": MulticlassConfusionMatrix(num_classes),
    })


def classification_report(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """{"val_acc", "macro_f1", "per_class_acc", "confusion"} of predicted class indices `preds` (N,)
    against `labels` (N,), as plain Python numbers (computed by `classification_metrics`)."""
    collection = classification_metrics(num_classes)
    collection.update(preds.detach().cpu(), labels.detach().cpu())
    values = collection.compute()
    return {
        "val_acc": float(values["val_acc"]),
        "macro_f1": float(values["macro_f1"]),
        "per_class_acc": [float(v) for v in values["per_class_acc"]],
        "confusion": values["confusion"].long().tolist(),
    }


def generation_metrics(outputs: list[str], references: list[list[str]]) -> dict:
    """{"bleu", "rouge_l"}, both 0-100, of generated `outputs` against every reference of each input.

    bleu: sacrebleu's corpus BLEU (default 13a tokenization, exp smoothing) with all references at once.
    rouge_l: per input the best ROUGE-L F1 over its references (rouge-score, no stemming), averaged.
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} reference lists")
    if not outputs:
        raise ValueError("no outputs to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"inputs {empty[:5]} have no reference")
    # sacrebleu wants one stream per reference rank (stream k holds every input's k-th reference). An
    # input with fewer references gets None there, which sacrebleu skips; an empty string would count
    # as a real (empty) reference and could become the closest reference length.
    streams = [list(stream) for stream in zip_longest(*references)]
    bleu = sacrebleu.corpus_bleu(outputs, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(outputs, references)]
    return {"bleu": float(bleu), "rouge_l": 100.0 * sum(rouge) / len(rouge)}
