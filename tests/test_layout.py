"""The shape of the code base, checked from its source: import arrows that must not exist, adapter kinds
named only in their registry, one definition of each tiny test model."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from feta.kinds import KINDS
from tests.conftest import ROOT

SOURCES = [p for p in [*ROOT.glob("*.py"), *(ROOT / "feta").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]]
# (package directory, modules it must not import): the report never loads models, the measurements
# never resolve runs, and the product (compile) does not depend on the research code (equivalence).
FORBIDDEN = [
    ("feta/report", ("feta.runs", "feta.models", "feta.adapters")),
    ("feta/equivalence", ("feta.runs",)),
    ("feta/compile", ("feta.equivalence",)),
]


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (`from feta import runs` counts as feta.runs)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("package,banned", FORBIDDEN, ids=[p for p, _ in FORBIDDEN])
def test_no_import_arrow_points_the_wrong_way(package, banned):
    found = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).rglob("*.py"))
             for name in sorted(imported(path)) if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not found, found


def test_the_checker_sees_an_arrow(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from feta import runs\n")
    assert "feta.runs" in imported(path)


def test_the_report_loads_no_peft_and_no_model_code():
    code = "import sys, feta.report; print(sorted(m for m in ('peft', 'transformers', 'feta.runs') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def kind_tuples(path: Path) -> list[str]:
    """Literal tuples, lists and sets of two or more adapter kind names in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if sum(w in KINDS for w in words) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {words}")
    return found


def test_adapter_kinds_are_listed_only_in_the_registry():
    found = [hit for path in SOURCES if path != ROOT / "feta" / "kinds.py" for hit in kind_tuples(path)]
    assert not found, found
    assert kind_tuples(ROOT / "feta" / "kinds.py") == []  # the registry holds Kind records, not name tuples


def test_one_definition_of_each_tiny_model():
    texts = {p: p.read_text() for p in [*SOURCES, *(ROOT / "tests").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]}
    for pattern, home in ((r"n_embd\"?\s*[:=]\s*64\b", "conf/model/gpt2_tiny.yaml"),
                          (r"intermediate_size\"?\s*[:=]\s*128\b", "conf/model/llama_tiny.yaml")):
        where = sorted(str(p.relative_to(ROOT)) for p, text in texts.items() if re.search(pattern, text))
        assert where == [home], where
