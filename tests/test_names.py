"""One name per concept: the value a sweep optimizes means "higher is better" for every task, and a report
never puts runs scored on different validation subsets side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compile import compile_prefix
from evaluate import evaluate
from feta.errors import UserError
from feta.metrics import DIRECTION
from feta.report import build_report
from tests.conftest import compile_cfg, compose_cfg, tiny_train_cfg
from train import sweep_value, train

E2E = ("data=e2e", "data.train_limit=64", "data.val_limit=6", "data.max_new_tokens=5", "data.batch_size=8")


@pytest.mark.parametrize("data", [("data=sst2",), E2E], ids=["sst2", "e2e"])
def test_the_sweep_value_is_higher_is_better(tmp_path, data):
    metrics, _ = train(tiny_train_cfg(tmp_path, "~logger", *data))
    main = metrics["main_metric"]
    assert main == ("val_acc" if data == ("data=sst2",) else "val_token_acc") and DIRECTION[main] == 1
    assert sweep_value(metrics) == metrics[main]
    assert sweep_value(metrics, "val_loss") == -metrics["val_loss"] < 0  # a loss comes back negated


def _evaluate(ckpt: Path, *overrides: str) -> dict:
    return evaluate(compose_cfg("evaluate", [f"ckpt={ckpt}", "~logger", "latency.enabled=false", *overrides]))


def test_a_sweep_scored_at_another_val_limit_is_one_subset_or_refused(tmp_path):
    sweep = tmp_path / "sweep"
    for job, overrides in (("0", ("adapter.init=random", "adapter.m=8")), ("1", ("adapter=lora",))):
        train(tiny_train_cfg(sweep / job, "~logger", *overrides))
        (sweep / job / "run").rename(sweep / f"{job}.tmp")
        (sweep / job).rmdir()
        (sweep / f"{job}.tmp").rename(sweep / job)
    compile_prefix(compile_cfg(sweep / "0", "~logger", "rank=2", "calib_size=32", "eval_size=16"))
    compiled = sweep / "0" / "compiled-r2"
    _evaluate(compiled, "val_limit=32")  # the compiled directory alone, on 32 inputs
    assert json.loads((compiled / "eval.json").read_text())["val_size"] == 32

    _evaluate(sweep, "val_limit=16")  # the sweep on 16: the compiled directory is scored again, not kept
    table = build_report(sweep)["table"]
    assert sorted(table["run"]) == ["0", "0/compiled-r2", "1"]
    assert set(table["val_size"]) == {16} and set(table["val_limit"]) == {16}

    ev = json.loads((compiled / "eval.json").read_text())
    (compiled / "eval.json").write_text(json.dumps({**ev, "val_size": 32, "val_limit": 32}))  # as if kept
    with pytest.raises(UserError, match=r"holds runs scored on different validation subsets: 0, 1 on 16 inputs "
                                        r"\(val_limit=16, val_seed=None\); 0/compiled-r2 on 32 inputs .*overwrite=true"):
        build_report(sweep)
