"""feta.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from feta.metrics import classification_metrics, classification_report, generation_metrics

# 3 classes, 10 examples. Rows: true class; columns: predicted.
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
PREDS = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 0, 1])
CONFUSION = [[2, 1, 0],
             [0, 3, 0],
             [1, 1, 2]]
# Recall per class: 2/3, 3/3, 2/4. Precision per class (columns): 2/3, 3/5, 2/2.
# F1 = 2PR/(P+R): 2/3, 0.75, 2/3.
PER_CLASS = [2 / 3, 1.0, 0.5]
MACRO_F1 = (2 / 3 + 0.75 + 2 / 3) / 3
ACC = 7 / 10  # micro; the mean of PER_CLASS (0.722) would be the macro accuracy


def test_classification_report_hand_computed():
    report = classification_report(PREDS, LABELS, 3)
    assert report["val_acc"] == pytest.approx(ACC)
    assert report["macro_f1"] == pytest.approx(MACRO_F1)
    assert report["per_class_acc"] == pytest.approx(PER_CLASS)
    assert report["confusion"] == CONFUSION
    assert isinstance(report["confusion"][0][0], int) and isinstance(report["val_acc"], float)


def test_collection_accumulates_and_resets():
    """As in a validation loop: batches accumulate until compute, and reset starts over."""
    metrics = classification_metrics(3)
    metrics.update(PREDS[:4], LABELS[:4])
    metrics.update(PREDS[4:], LABELS[4:])
    values = metrics.compute()
    assert float(values["val_acc"]) == pytest.approx(ACC)
    assert values["confusion"].tolist() == CONFUSION
    metrics.reset()
    metrics.update(torch.tensor([2, 2]), torch.tensor([2, 2]))
    values = metrics.compute()
    assert float(values["val_acc"]) == 1.0
    assert values["confusion"].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 2]]


def test_scores_and_indices_agree():
    scores = torch.nn.functional.one_hot(PREDS, 3).float() * 5 - 1  # argmax = PREDS
    metrics = classification_metrics(3)
    metrics.update(scores, LABELS)
    assert metrics.compute()["confusion"].tolist() == CONFUSION


def test_absent_class_left_out_of_macro_f1():
    # Class 2 has no example and no prediction: F1 of classes 0 (P=1, R=2/3 -> 0.8) and 1 (P=1/2, R=1 -> 2/3).
    report = classification_report(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 3)
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert report["per_class_acc"][2] == 0.0


def test_bleu_identical_and_disjoint():
    outputs = ["the cat sat on the mat", "a quick brown fox jumps over the dog"]
    assert generation_metrics(outputs, [[o] for o in outputs])["bleu"] == pytest.approx(100.0)
    assert generation_metrics(outputs, [["xx yy zz ww vv"], ["qq rr ss tt uu"]])["bleu"] == pytest.approx(0.0)


def test_bleu_multi_reference():
    outputs = ["the cat sat on the mat", "there is a dog in the park today"]
    refs = [["the cat sat on the mat"],
            ["a completely different sentence here", "there is a dog in the park today", "another one"]]
    assert generation_metrics(outputs, refs)["bleu"] == pytest.approx(100.0)


def test_bleu_fewer_references_are_skipped_not_empty():
    """An input with fewer references must not gain an empty one: with '' as filler, the 3-token output
    below would take 0 as its closest reference length and BLEU would read 100."""
    outputs = ["a b c", "q r s t u v"]
    refs = [["a b c d e f g h"], ["q r s t u v", "x"]]
    # All n-grams match; brevity penalty exp(1 - ref_len / hyp_len) with ref_len 8 + 6, hyp_len 3 + 6.
    assert generation_metrics(outputs, refs)["bleu"] == pytest.approx(100 * math.exp(1 - 14 / 9), abs=1e-6)


def test_rouge_l_hand_computed():
    outputs = ["the cat on mat", "a b c"]
    refs = [["the cat sat on the mat"], ["x y z", "a b d"]]
    # 1: LCS "the cat on mat" = 4; P = 4/4, R = 4/6, F1 = 0.8.
    # 2: best reference "a b d": LCS 2, P = R = 2/3, F1 = 2/3 ("x y z" scores 0).
    assert generation_metrics(outputs, refs)["rouge_l"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)


def test_generation_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="reference lists"):
        generation_metrics(["a"], [])
    with pytest.raises(ValueError, match="no reference"):
        generation_metrics(["a", "b"], [["a"], []])
