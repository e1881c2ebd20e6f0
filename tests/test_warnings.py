"""The library warnings feta hides are hidden by exact message and module, and only those."""

from __future__ import annotations

import tomllib
import warnings

import pytest

import feta
from tests.conftest import ROOT


def test_pytest_hides_the_same_warnings_as_feta():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for message, category, module in feta.LIBRARY_WARNINGS:
        assert f"ignore:{message}:{category.__name__}:{module}" in listed


@pytest.mark.parametrize(("message", "module", "shown"), [
    ("`lora_bias=True` was passed but the targeted layer of type Linear has no bias. This means that merging "
     "LoRA weights won't be possible.", "peft.tuners.lora.layer", False),
    ("`lora_bias=True` was passed but the targeted layer of type Linear has no bias.", "feta.compile", True),
    ("`past_key_values` is deprecated and will be removed", "transformers.models.llama", False),
    ("something else is deprecated", "transformers.models.llama", True),
])
def test_only_the_listed_message_from_its_module_is_hidden(message, module, shown):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feta.quiet_library_warnings()
        category = FutureWarning if "past_key" in message or "else" in message else UserWarning
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert (len(caught) == 1) == shown
