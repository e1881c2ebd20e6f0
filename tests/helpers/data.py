"""Small data files a user would bring: a 3-class CSV."""

from __future__ import annotations

from pathlib import Path

WORDS = {"neg": "awful dull boring bad", "neu": "plain average fine ordinary", "pos": "great superb lovely good"}


def mood_csv(path: Path, n: int, offset: int = 0) -> Path:
    """A 3-class CSV with a header, quoted texts and named labels, as a user would bring."""
    rows = ["text,label"]
    for i in range(n):
        label = list(WORDS)[(i + offset) % 3]
        words = WORDS[label].split()
        rows.append(f'"a {words[i % 4]}, {words[(i + 1) % 4]} film",{label}')
    path.write_text("\n".join(rows) + "\n")
    return path
