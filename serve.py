"""Classify sentences with several adapters on one base model, a mixed batch per forward pass (feta/serving.py).

    python serve.py lora=multirun/<date>/<time>/1 compiled=multirun/<date>/<time>/0/compiled-r4 --val 64
    python serve.py lora=<run> compiled=<run>/compiled-r4 --input rows.tsv    # lines: adapter<TAB>sentence

Each NAME=DIR loads a LoRA run or a compiled prefix under NAME; `__base__` names the base model.
--val N classifies the first N SST-2 validation sentences, the adapters taking turns row by row, and
prints each adapter's accuracy. Output: one JSON line per row (adapter, sentence, label, logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feta.serving import BASE, AdapterServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="NAME=DIR", help="adapter name and its run or compiled dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="TSV file of adapter<TAB>sentence lines ('-' for stdin)")
    src.add_argument("--val", type=int, metavar="N", help="first N SST-2 validation sentences, adapters in turn")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--no-base", action="store_true", help="with --val: leave the base model out of the rotation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    adapters = {}
    for item in args.adapters:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"expected NAME=DIR, got {item!r}")
        adapters[name] = Path(path)
    server = AdapterServer.from_runs(adapters)
    labels = None
    if args.val is not None:
        from feta.data import DataSpec, load_sst2

        val = load_sst2(DataSpec())["validation"][: args.val]
        rotation = server.adapters + ([] if args.no_base else [BASE])
        sentences = [s for s, _ in val]
        names = [rotation[i % len(rotation)] for i in range(len(val))]
        labels = [y for _, y in val]
    else:
        f = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with f:
            rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise SystemExit(f"--input lines must be adapter<TAB>sentence, got {bad[0]!r}")
        names, sentences = [r[0] for r in rows], [r[1] for r in rows]
    out = []
    for i in range(0, len(sentences), args.batch_size):
        logits = server.classify(sentences[i: i + args.batch_size], names[i: i + args.batch_size])
        for j, row in enumerate(logits.tolist()):
            rec = {"adapter": names[i + j], "sentence": sentences[i + j], "label": int(max(range(len(row)), key=row.__getitem__)),
                   "logits": row}
            out.append(rec)
            print(json.dumps(rec))
    if labels is not None:
        for name in dict.fromkeys(names):
            hits = [r["label"] == y for r, y in zip(out, labels) if r["adapter"] == name]
            print(f"# {name}: accuracy {sum(hits) / len(hits):.3f} on {len(hits)} sentences", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
