"""Reading a task's examples: shipped files, a user's CSV / TSV / JSON Lines, or a hub data set.

Every example is a dict of column name -> text. Problems are refused with the file and line named:
not UTF-8, a missing column, an empty text. Empty texts are refused rather than skipped, so that what
trains is exactly what the file says.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from feta.data.spec import DataSource, DataSpec
from feta.errors import UserError, check_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPLITS = ("train", "validation")
SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
Example = dict[str, str]


def _text(path: Path) -> str:
    """The file's text, refused with the line of the first byte that is not UTF-8."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(str(path), f"cannot be read ({e})", "check the file or give another path") from e
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) is not part of the header
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}", "is not UTF-8 text", "save the file as UTF-8 (CSV, TSV or JSON Lines)") from e


def _format(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise UserError(str(path), "has an unknown format", f"name it *{', *'.join(SUFFIXES)} (optionally .gz)")


def read_file(path: str | Path, columns: list[str], allowed: dict[str, list[str]] | None = None,
              key: str | None = None) -> list[Example]:
    """Rows of a CSV, TSV or JSON Lines file, each holding `columns` as non-empty text; a column in
    `allowed` must hold one of its values (a class label). `key` names the setting that gave the path."""
    path = check_path(f"{key}={path}" if key else str(path), path, "file", "fix the path")
    fmt, text = _format(path), _text(path)
    rows: list[tuple[int, dict]] = []
    if fmt in ("jsonl", "json"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}", f"is not a JSON object ({e.msg})", "write one JSON object per line") from e
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}", "is not a JSON object", "write one JSON object per line")
            rows.append((lineno, row))
    else:
        # TSV files carry quotes literally (SST-2 and AG News texts hold them); CSV follows RFC 4180 quoting.
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",",
                                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{path}:1", f"has no column {missing[0]!r} (header: {header})",
                            "add the column or fix the column names in the data config")
        for row in reader:
            rows.append((reader.line_num, row))
    if not rows:
        raise UserError(str(path), "holds no examples", "give a file with a header and at least one row")
    out = []
    for lineno, row in rows:
        example = {}
        for column in columns:
            value = row.get(column)
            if value is None:
                raise UserError(f"{path}:{lineno}", f"has no {column!r}", "give every row every column")
            value = str(value).strip()
            if not value:
                raise UserError(f"{path}:{lineno}", f"{column!r} is empty", "fill it in or delete the row")
            if allowed and column in allowed and value not in allowed[column]:
                raise UserError(f"{path}:{lineno}", f"{column} {value!r} is not among the configured classes "
                                f"{allowed[column]}", "add it to data.classes (with a verbalizer) or fix the file")
            example[column] = value
        out.append(example)
    return out


def _split_file(folder: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        for name in (f"{split}{suffix}", f"{split}{suffix}.gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"data.path={folder}", f"no {split}.tsv/.csv/.jsonl[.gz] found",
                    "point data.path at a folder with train and validation files, or set data.train_file and "
                    "data.validation_file")


def split_files(spec: DataSpec) -> dict[str, Path]:
    """{split: file} for a local source: explicit files, a folder, or the copy shipped in feta/assets."""
    if spec.train_file:
        return {"train": Path(spec.train_file), "validation": Path(spec.validation_file)}
    folder = Path(spec.path) if spec.path else ASSETS / spec.name
    if not folder.is_dir():
        where = f"data.path={folder}" if spec.path else f"data.name={spec.name}"
        raise UserError(where, "no such data folder", "set data.path, or data.train_file and data.validation_file")
    return {split: _split_file(folder, split) for split in SPLITS}


def _hub(spec: DataSpec, columns: list[str]) -> dict[str, list[Example]]:
    try:
        import datasets  # only data.source=hub needs it: the optional `hub` extra
    except ImportError:
        raise UserError("data.source=hub", "needs the datasets package", "pip install 'feta[hub]'") from None

    ds = datasets.load_dataset(spec.hub_id, spec.hub_config)
    out = {}
    for split, name in (("train", "train"), ("validation", spec.hub_validation_split)):
        table = ds[name]
        # Hub classification labels are class indices; map them to the configured class names.
        names = spec.classes if spec.label_column in columns else None
        out[split] = [{c: (names[row[c]] if names and c == spec.label_column and isinstance(row[c], int) else str(row[c]))
                       for c in columns} for row in table]
    return out


def read_splits(spec: DataSpec, columns: list[str], allowed: dict[str, list[str]] | None = None
                ) -> dict[str, list[Example]]:
    """{"train": [...], "validation": [...]} with `columns` in every example (see `read_file`)."""
    if spec.source is DataSource.hub:
        return _hub(spec, columns)
    keys = {"train": "data.train_file", "validation": "data.validation_file"} if spec.train_file else {}
    return {split: read_file(path, columns, allowed, keys.get(split)) for split, path in split_files(spec).items()}
