"""The documentation and the code speak only of the project: no traces of how it was made, a short README,
links that resolve and benchmark names that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_000
SCANNED = ("README.md", "LICENSE", "Makefile", "pyproject.toml", ".ci", "docs", "feta", "conf", "benchmarks", "tests",
           "train.py", "compile.py", "evaluate.py", "serve.py")
SKIPPED_DIRS = {ROOT / "feta" / "assets"}
SKIPPED_FILES = {Path(__file__).resolve()}  # it spells out the patterns it looks for
# Words that point outside the repository or at its history rather than at the project itself.
FORBIDDEN = re.compile(
    r"(?<!scope=\")(?<!request\.)\bsessions?\b|\.\./shared|DESIGN\.md|notes/(findings|claims|style)|\bissue [0-9]+|commit [0-9a-f]{7}",
    re.IGNORECASE,
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in candidates:
            if "__pycache__" in path.parts or path in SKIPPED_FILES or any(d in path.parents for d in SKIPPED_DIRS):
                continue
            files.append(path)
    return files


def forbidden_matches(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: text` for every line of a text file that matches FORBIDDEN; binary files are skipped."""
    hits = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()[:120]}")
    return hits


def test_the_pattern_catches_each_kind_of_trace(tmp_path: Path) -> None:
    traces = ["as measured in session 3", "see ../shared/x", "per DESIGN.md", "notes/findings.md says",
              "fixes Issue 12", "since commit 20c34a8", "over two Sessions"]
    clean = ["a sessional note", "issue a warning", "commit the adapter", "the design",
             '@pytest.fixture(scope="session")', "request.session.items"]
    sample = tmp_path / "sample.md"
    sample.write_text("\n".join(traces + clean) + "\n", encoding="utf-8")
    binary = tmp_path / "blob.png"
    binary.write_bytes(b"\x89PNG\0session 1")
    hits = forbidden_matches([sample, binary], tmp_path)
    assert [h.split(":")[:2] for h in hits] == [["sample.md", str(n)] for n in range(1, len(traces) + 1)]


def test_no_traces_of_how_the_project_was_made() -> None:
    files = _scanned_files()
    assert README in files and len(files) > 20, "the scan must cover the README and the source tree"
    hits = forbidden_matches(files)
    assert not hits, f"{len(hits)} lines point outside the project or at its history:\n" + "\n".join(hits)


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES} (move detail to docs/)"


def test_relative_links_resolve() -> None:
    broken = []
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_compile_method_names_exist_in_the_benchmark() -> None:
    table = (ROOT / "docs" / "results" / "compile_methods.md").read_text(encoding="utf-8")
    names = re.findall(r"^\| \**([a-z0-9_+.\-]+)\** \| `", table, flags=re.MULTILINE)
    script = (ROOT / "benchmarks" / "compile_quality.py").read_text(encoding="utf-8")
    assert len(names) >= 25, names
    missing = [n for n in names if f'"{n}":' not in script]
    assert not missing, f"docs/results/compile_methods.md names methods the benchmark lacks: {missing}"


def test_shipped_files_carry_their_terms() -> None:
    folders = sorted({p.parent for p in (ROOT / "feta" / "assets").rglob("*") if p.is_file()})
    assert len(folders) >= 4, folders
    missing = [str(f.relative_to(ROOT)) for f in folders if not {"LICENSE", "README.md"} <= {p.name for p in f.iterdir()}]
    assert not missing, f"asset folders without a LICENSE and README.md: {missing}"
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
