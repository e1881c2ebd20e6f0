"""Bad input through the four entry points, each run as a command: one line `error: <field or file>: ...`
naming the culprit, exit status 2, no traceback, and nothing written.

Every case runs `python <script>.py ...` in the repository with Hydra's run dir under the case's own
temporary directory; nothing may appear in the repository, and nothing in the case's directory may be
created, changed or removed apart from that Hydra dir. Cases that need a trained run share one tiny
prefix run, one LoRA run and one compiled prefix, built once; a case that damages a file damages its own copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from compile import compile_prefix
from tests.conftest import ROOT, compose_cfg, tiny_train_cfg
from tests.helpers.runs import tree
from train import train

WORKERS = 2  # the machine's cores; each case is one ~5 s process
NOT_OURS = {".git", ".venv", "__pycache__", ".pytest_cache"}  # what tools other than the entry points write
TRAIN = ("debug=fast", "output_dir=<T>/run")  # a refused run must not create <T>/run
CSV = ("data=csv", "data.train_file=<T>/train.csv", "data.validation_file=<T>/val.csv",
       "data.prompt='Review: {text} Sentiment:'", "data.classes=[neg,pos]",
       "data.verbalizers=[' negative',' positive']")
GOOD_ROWS = "text,label\na fine film,pos\na dull film,neg\n"


# ------------------------------------------------------------------ what a case prepares in its directory


def files(**contents: str | bytes) -> Callable[[Path, dict], None]:
    """Write each name=content into the case directory (names use __ for a dot: train__csv)."""

    def prepare(tmp: Path, _: dict) -> None:
        for name, content in contents.items():
            path = tmp / name.replace("__", ".")
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return prepare


def csv_data(train_text: str | bytes) -> Callable[[Path, dict], None]:
    return files(train__csv=train_text, val__csv=GOOD_ROWS)


def damaged(source: str, relpath: str, content: bytes) -> Callable[[Path, dict], None]:
    """A copy of a shared run (prefix, lora or compiled) at <T>/copy with `relpath` overwritten."""

    def prepare(tmp: Path, shared: dict) -> None:
        shutil.copytree(shared[source], tmp / "copy")
        (tmp / "copy" / relpath).write_bytes(content)

    return prepare


def a_file(tmp: Path, _: dict) -> None:
    (tmp / "afile").write_text("not a directory\n")


def a_dir(tmp: Path, _: dict) -> None:
    (tmp / "adir").mkdir()


def read_only_dir(tmp: Path, _: dict) -> None:
    """<T>/ro, a directory nobody may write into (root ignores modes, not the immutable flag)."""
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(tmp / "ro")], capture_output=True, check=False)


def read_only_copy(tmp: Path, run: Path) -> None:
    """A copy of `run` at <T>/ro that nobody may write into."""
    shutil.copytree(run, tmp / "ro")
    (tmp / "ro").chmod(0o555)
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(tmp / "ro")], capture_output=True, check=False)


def unlock(tmp: Path) -> None:
    if (tmp / "ro").is_dir() and os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(tmp / "ro")], capture_output=True, check=False)


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple[str, ...]
    error: str  # regex the error line must match after "error: "
    prepare: Callable[[Path, dict], None] | None = None


SAFETENSORS = "adapter/adapter_model.safetensors"
ADAPTER_CONFIG = "adapter/adapter_config.json"
CASES = [
    # --- wrong numbers and types
    Case("train-m-0", "train", (*TRAIN, "adapter.m=0"), r"adapter\.m: must be a positive int \(prefix length\), got 0"),
    Case("train-m-abc", "train", (*TRAIN, "adapter.m=abc"),
         r"adapter\.m: value 'abc' .* Integer; adapter\.m takes .* int"),
    Case("train-seed-abc", "train", (*TRAIN, "seed=abc"),
         r"seed: value 'abc' .* Integer; seed takes a value of type int"),
    Case("train-lora-r-neg", "train", (*TRAIN, "adapter=lora", "adapter.r=-1"), r"adapter\.r: must be a positive int"),
    Case("train-batch-0", "train", (*TRAIN, "data.batch_size=0"), r"data\.batch_size: must be a positive int, got 0"),
    Case("train-val-limit-0", "train", (*TRAIN, "data.val_limit=0"),
         r"data\.val_limit: must be a positive int or null"),
    Case("train-ckpt-every-0", "train", (*TRAIN, "checkpoint_every_n_steps=0"),
         r"checkpoint_every_n_steps: must be a positive"),
    Case("train-sweep-hydra-setting", "train", ("-m", *TRAIN, "hydra.sweeper.params.adapter=lora,prefix"),
         r"hydra\.sweeper\.params\.adapter=lora,prefix: sweeps a Hydra setting, which -m cannot do; "
         r"quote the comma list as one value: \"hydra\.sweeper\.params\.adapter='a,b'\""),
    # --- numbers that are not finite or make no run
    Case("train-lr-nan", "train", (*TRAIN, "adapter.lr=nan"), r"adapter\.lr=nan: is not a finite number"),
    Case("train-lr-inf", "train", (*TRAIN, "adapter=lora", "adapter.lr=inf"), r"adapter\.lr=inf: is not a finite number"),
    Case("train-lr-neg-inf", "train", (*TRAIN, "adapter.lr=-inf"), r"adapter\.lr=-inf: is not a finite number"),
    Case("train-max-epochs-0", "train", (*TRAIN, "trainer.max_epochs=0"), r"trainer\.max_epochs=0: trains no step"),
    Case("train-max-steps-0", "train", (*TRAIN, "trainer.max_steps=0"), r"trainer\.max_steps=0: trains no step"),
    Case("train-max-steps-neg", "train", (*TRAIN, "++trainer.max_steps=-5"),
         r"trainer\.max_steps=-5: must be >= 1; set trainer\.max_steps to 1 or more \(-1: no limit\)"),
    Case("train-limit-train-batches-0", "train", (*TRAIN, "++trainer.limit_train_batches=0"),
         r"trainer\.limit_train_batches=0: trains no step"),
    Case("train-val-check-interval", "train", (*TRAIN, "++trainer.val_check_interval=1.5"),
         r"trainer\.val_check_interval=1\.5: must be a share in \(0, 1\] or a count >= 1"),
    Case("train-grad-clip-nan", "train", (*TRAIN, "trainer.gradient_clip_val=nan"),
         r"trainer\.gradient_clip_val=nan: is not a finite number"),
    Case("train-lightning-refuses", "train", (*TRAIN, "trainer.precision=17"), r"trainer: .*17"),
    Case("compile-ridge-nan", "compile", ("ckpt=<PREFIX>", "ridge=nan"), r"ridge=nan: is not a finite number"),
    Case("compile-distill-lr-inf", "compile", ("ckpt=<PREFIX>", "distill_lr=inf"), r"distill_lr=inf: is not a finite number"),
    Case("evaluate-min-run-time-inf", "evaluate", ("ckpt=<LORA>", "latency.min_run_time=inf"),
         r"latency\.min_run_time=inf: is not a finite number"),
    Case("train-lr-schedule", "train", (*TRAIN, "lr_schedule=step"),
         r"lr_schedule: unknown choice 'step'; use one of constant, linear, cosine"),
    Case("train-warmup-neg", "train", (*TRAIN, "warmup_steps=-1"), r"warmup_steps: must be >= 0, got -1"),
    Case("train-dropout", "train", (*TRAIN, "adapter=lora", "adapter.dropout=1.5"),
         r"adapter\.dropout: must be in \[0, 1\)"),
    Case("train-m-too-long", "train", (*TRAIN, "adapter.init=random", "adapter.m=400"),
         r"adapter\.m \+ data\.max_length: 400 \+ 128 > 512 positions of gpt2_tiny"),
    Case("train-lora-targets", "train", (*TRAIN, "adapter=lora", "adapter.targets=[q_proj]"),
         r"adapter\.targets=\['q_proj'\]: not in gpt2_tiny; available: .*c_attn"),
    Case("train-gated-layers", "train", (*TRAIN, "adapter=gated_prefix", "adapter.layers=5"),
         r"adapter\.layers: is 5 but gpt2_tiny has 2 layers"),
    Case("train-key-typo", "train", (*TRAIN, "sed=1"), r"sed: is not a setting of TrainConfig; did you mean seed\?"),
    Case("train-adapter-key-typo", "train", (*TRAIN, "adapter.mm=3"),
         r"adapter\.mm: is not a setting of PrefixSpec; did you mean adapter\.m\?"),
    Case("train-appended-key", "train", (*TRAIN, "+adapter.foo=1"),
         r"adapter\.foo: is not a setting of PrefixSpec; known: "),
    Case("train-override-syntax", "train", (*TRAIN, "seed=["), r"seed=\[: cannot be parsed"),
    Case("train-model-path", "train", (*TRAIN, "model.source=local", "model.path=<T>/nomodel"),
         r"model\.path=.*/nomodel: no such directory"),
    Case("compile-rank-abc", "compile", ("ckpt=<PREFIX>", "rank=abc"),
         r"rank: value 'abc' .* Integer; rank takes a value of type int"),
    Case("compile-rank-neg", "compile", ("ckpt=<PREFIX>", "rank=-2"), r"rank: must be an int >= 0"),
    Case("compile-merge-bool", "compile", ("ckpt=<PREFIX>", "merge=maybe"),
         r"merge: value 'maybe' is not a valid bool"),
    Case("evaluate-val-limit-0", "evaluate", ("ckpt=<LORA>", "val_limit=0"),
         r"val_limit: must be a positive int or null, got 0"),
    Case("evaluate-latency-batches-0", "evaluate", ("ckpt=<LORA>", "latency.batches=[0]"),
         r"latency\.batches: must be a positive int, got 0"),
    Case("serve-val-0", "serve", ("adapters.a=<LORA>", "val=0"), r"val: must be a positive int, got 0"),
    Case("serve-val-limit-0", "serve", ("adapters.a=<LORA>", "val_limit=0"), r"val_limit: must be a positive int or null, got 0"),
    # --- data files
    Case("data-csv-without-files", "train", (*TRAIN, "data=csv"), r"data\.(name=csv|train_file)"),
    Case("data-wrong-header", "train", (*TRAIN, *CSV),
         r".*/train\.csv:1: has no column 'text'", csv_data("sentence,label\na fine film,pos\n")),
    Case("data-unknown-label", "train", (*TRAIN, *CSV),
         r".*/train\.csv:3: label 'maybe' is not among the configured classes",
         csv_data("text,label\na fine film,pos\nan odd film,maybe\n")),
    Case("data-binary-garbage", "train", (*TRAIN, *CSV),
         r".*/train\.csv:\d+: is not UTF-8 text", csv_data(bytes(range(256)) * 8)),
    Case("data-latin1", "train", (*TRAIN, *CSV),
         r".*/train\.csv:3: is not UTF-8 text",
         csv_data("text,label\na fine film,pos\nun caf\xe9 froid,neg\n".encode("latin-1"))),
    Case("data-empty-file", "train", (*TRAIN, *CSV),
         r".*/train\.csv(:1)?: (has no column|holds no examples)", csv_data("")),
    Case("data-empty-text", "train", (*TRAIN, *CSV),
         r".*/train\.csv:3: 'text' is empty", csv_data("text,label\na fine film,pos\n,neg\n")),
    Case("data-missing-file", "train", (*TRAIN, *CSV), r".*/train\.csv: no such file", files(val__csv=GOOD_ROWS)),
    # --- paths
    Case("compile-mistyped-ckpt", "compile", ("ckpt=multirun/no-such-sweep/0",),
         r"ckpt=multirun/no-such-sweep/0: no such directory"),
    Case("compile-file-ckpt", "compile", ("ckpt=<T>/afile",), r"ckpt=.*/afile: ", a_file),
    Case("evaluate-mistyped-ckpt", "evaluate", ("ckpt=multirun/no-such-sweep",),
         r"ckpt=multirun/no-such-sweep: no such directory"),
    Case("evaluate-file-ckpt", "evaluate", ("ckpt=<T>/afile",), r"ckpt=.*/afile: is a file, not a directory", a_file),
    Case("compile-no-ckpt", "compile", (), r"ckpt: is required and has no value; pass ckpt=<value>"),
    Case("evaluate-no-ckpt", "evaluate", (), r"ckpt: is required and has no value"),
    Case("train-output-dir-file", "train", ("debug=fast", "output_dir=<T>/afile"),
         r"output_dir=.*/afile: is a file, not a directory", a_file),
    Case("train-output-dir-unwritable", "train", ("debug=fast", "output_dir=<T>/ro/run"),
         r"output_dir=.*/ro/run: cannot be written", read_only_dir),
    Case("train-output-dir-under-file", "train", ("debug=fast", "output_dir=<T>/afile/run"),
         r"output_dir=.*/afile/run: cannot be made: .*/afile is a file", a_file),
    Case("compile-out-dir-under-file", "compile", ("ckpt=<PREFIX>", "out_dir=<T>/afile/c"),
         r"out_dir=.*/afile/c: cannot be made: .*/afile is a file", a_file),
    Case("compile-out-dir-unwritable", "compile", ("ckpt=<PREFIX>", "out_dir=<T>/ro/c"),
         r"out_dir=.*/ro/c: cannot be written", read_only_dir),
    Case("evaluate-unwritable-run", "evaluate", ("ckpt=<T>/ro",), r"ckpt=.*/ro: cannot be written",
         lambda tmp, shared: read_only_copy(tmp, shared["lora"])),
    Case("data-train-file-is-dir", "train", (*TRAIN, *CSV), r"data\.train_file=.*/train\.csv: is a directory, not a file",
         lambda tmp, _: ((tmp / "train.csv").mkdir(), (tmp / "val.csv").write_text(GOOD_ROWS))),
    Case("compile-calib-file-is-dir", "compile", ("ckpt=<PREFIX>/adapter", "model=gpt2_tiny", "calib_file=<T>/adir"),
         r"calib_file=.*/adir: is a directory, not a file", a_dir),
    Case("serve-input-is-dir", "serve", ("adapters.a=<LORA>", "input=<T>/adir"),
         r"input=.*/adir: is a directory, not a file", a_dir),
    Case("serve-adapter-is-file", "serve", ("adapters.a=<T>/afile", "val=2"),
         r"adapters\.a=.*/afile: is a file, not a directory", a_file),
    # --- model files
    Case("train-gguf-not-gguf", "train", (*TRAIN, "model=smollm2", "model.path=<T>", "model.gguf_file=fake.gguf"),
         r"model\.path=.*: .*/fake\.gguf is not a GGUF file \(it starts with b'not ', not b'GGUF'\)",
         files(fake__gguf="not a model\n")),
    Case("train-hub-unreachable", "train", (*TRAIN, "model=gpt2", "model.path=feta-no-such-org/no-such-model"),
         r"model\.path=feta-no-such-org/no-such-model: cannot be loaded from the hub or its cache .*HF_HUB_OFFLINE"),
    Case("train-local-model-empty", "train", (*TRAIN, "model=gpt2", "model.source=local", "model.path=<T>/adir"),
         r"model\.path=.*/adir: holds no model transformers can load", a_dir),
    Case("train-local-model-file", "train", (*TRAIN, "model=gpt2", "model.source=local", "model.path=<T>/afile"),
         r"model\.path=.*/afile: is a file, not a directory", a_file),
    # --- override grammar: the quoted form to type
    Case("train-prompt-braces", "train", (*TRAIN, "data.prompt={text} ="),
         r"data\.prompt=\{text\} =: cannot be parsed .*; quote the value, in the shell: \"data\.prompt='\{text\} ='\"$"),
    Case("train-output-dir-accents", "train", ("debug=fast", "output_dir=<T>/résumé"),
         r"output_dir=.*/résumé: cannot be parsed .*; quote the value, in the shell: \"output_dir='.*/résumé'\"$"),
    Case("train-prompt-apostrophe", "train", (*TRAIN, "data.prompt=it's {sentence}:"),
         r"data\.prompt=it's \{sentence\}:: cannot be parsed .*; quote the value, in the shell: 'data\.prompt=\"it's \{sentence\}:\"'$"),
    # --- lengths that cannot hold the template
    Case("train-max-length-below-template", "train", (*TRAIN, "data.max_length=3"),
         r"data\.max_length=3: cannot hold the template and an input: the template alone is \d+ tokens"),
    Case("train-e2e-max-length-below-template", "train", (*TRAIN, "data=e2e", "data.max_length=4"),
         r"data\.max_length=4: cannot hold the template and an input: the template alone is \d+ tokens"),
    Case("compile-calib-max-length-below-template", "compile", ("ckpt=<PREFIX>", "calib_max_length=2"),
         r"calib_max_length=2: cannot hold the template and an input: the template alone is \d+ tokens"),
    # --- damaged artifacts
    Case("compile-corrupt-safetensors", "compile", ("ckpt=<T>/copy",),
         r".*/copy/adapter/adapter_model\.safetensors: is corrupt", damaged("prefix", SAFETENSORS, b"\x00\x01garbage")),
    Case("compile-adapter-config-not-json", "compile", ("ckpt=<T>/copy",),
         r".*/copy/adapter/adapter_config\.json: is not valid JSON", damaged("prefix", ADAPTER_CONFIG, b"{not json")),
    Case("compile-truncated-metrics", "compile", ("ckpt=<T>/copy",),
         r".*/copy/metrics\.json: is not valid JSON.*rerun train\.py",
         damaged("prefix", "metrics.json", b'{"global_step": 8, "trainable')),
    Case("evaluate-truncated-metrics", "evaluate", ("ckpt=<T>/copy",),
         r".*/copy/metrics\.json: is not valid JSON.*rerun train\.py",
         damaged("lora", "metrics.json", b'{"global_step": 8, "trainable')),
    Case("evaluate-corrupt-safetensors", "evaluate", ("ckpt=<T>/copy",),
         r".*/copy/adapter/adapter_model\.safetensors: is corrupt", damaged("lora", SAFETENSORS, b"\x00" * 64)),
    Case("evaluate-truncated-compile-json", "evaluate", ("ckpt=<T>/copy",),
         r".*/copy/compile\.json: is not valid JSON.*rerun compile\.py",
         damaged("compiled", "compile.json", b'{"rank": 4, "source_run": "')),
    Case("evaluate-truncated-eval-json", "evaluate", ("ckpt=<T>/copy",),
         r".*/copy/eval\.json: is not valid JSON.*evaluate\.py overwrite=true",
         damaged("lora", "eval.json", b'{"val_acc": 0.5')),
    Case("evaluate-config-yaml-damaged", "evaluate", ("ckpt=<T>/copy",),
         r".*/copy/config\.yaml: ", damaged("lora", "config.yaml", b"model: [unclosed\n")),
    Case("train-resume-truncated-metrics", "train",
         ("debug=fast", "adapter.init=random", "adapter.m=8", "output_dir=<T>/copy"),
         r".*/copy/metrics\.json: is not valid JSON.*rerun train\.py", damaged("prefix", "metrics.json", b"{")),
    Case("serve-truncated-compile-json", "serve", ("adapters.a=<T>/copy", "val=2"),
         r".*/copy/compile\.json: is not valid JSON",
         damaged("compiled", "compile.json", b'{"rank": 4, "source_run": "')),
    Case("serve-corrupt-safetensors", "serve", ("adapters.a=<T>/copy", "val=2"),
         r".*/copy/adapter/adapter_model\.safetensors: is corrupt", damaged("lora", SAFETENSORS, b"\x00\x01garbage")),
    # --- unknown choices
    Case("compile-method-foo", "compile", ("ckpt=<PREFIX>", "method=foo"),
         r"method: unknown choice 'foo'; use one of sink, lstsq"),
    Case("compile-target-zz", "compile", ("ckpt=<PREFIX>", "target=zz"),
         r"target: unknown or repeated module kind 'zz'"),
    Case("compile-fit-positions", "compile", ("ckpt=<PREFIX>", "fit_positions=middle"),
         r"fit_positions: invalid value 'middle', expected one of \[content, all, last\]"),
    Case("compile-device-tpu", "compile", ("ckpt=<PREFIX>", "device=tpu"),
         r"device: unknown device 'tpu'; use auto, cpu, cuda or cuda:<index>"),
    Case("compile-dtype-int8", "compile", ("ckpt=<PREFIX>", "dtype=int8"),
         r"dtype: unknown dtype 'int8'; use one of float32, float16, bfloat16, or null"),
    Case("compile-memory-zero", "compile", ("ckpt=<PREFIX>", "memory_gb=0"), r"memory_gb: must be a positive number"),
    # --- more than the machine has: said before the fit, naming the settings that shrink it
    Case("compile-memory-short", "compile", ("ckpt=<PREFIX>", "memory_gb=0.001"),
         r"calib_size: the compile needs [\d.]+ GB beside the model: calibration caches [\d.]+ GB \([\d,]+ tokens, "
         r"on cpu\).*and 0\.00 GB is free on cpu; lower calib_size or calib_max_length"),
    Case("analyze-analysis-foo", "analyze", ("ckpt=<LORA>", "analysis=foo"),
         r"analysis=foo: no such analysis option; use one of equivalence, interpolate, task_vector$"),
    Case("analyze-precision-fp8", "analyze", ("ckpt=<LORA>", "analysis=task_vector", "analysis.precision=fp8"),
         r"analysis\.precision: unknown choice 'fp8'; use one of fp32, fp16, bf16"),
    Case("analyze-task-vector-of-prefix", "analyze", ("ckpt=<PREFIX>", "analysis=task_vector"),
         r"ckpt=.*: is a prefix run; analysis=task_vector takes a LoRA run"),
    Case("train-logger-nosuch", "train", (*TRAIN, "logger=nosuch"),
         r"logger=nosuch: no such logger option; use one of csv, wandb$"),
    Case("train-adapter-nope", "train", (*TRAIN, "adapter=nope"),
         r"adapter=nope: no such adapter option; use one of .*lora.*prefix"),
    Case("train-data-nope", "train", (*TRAIN, "data=nope"),
         r"data=nope: no such data option; use one of agnews, csv, e2e, mix, snli, sst2$"),
    # --- serve
    Case("serve-no-adapters", "serve", ("val=2",), r"adapters: none given; pass adapters\.<name>="),
    Case("serve-prefix-adapter", "serve", ("adapters.a=<PREFIX>", "val=2"),
         r"adapters\.a=.*: is a prefix \(token adaptation\)"),
    Case("serve-missing-adapter-dir", "serve", ("adapters.a=<T>/nope", "val=2"),
         r"adapters\.a=.*/nope: no such directory"),
    Case("serve-missing-input", "serve", ("adapters.a=<LORA>", "input=<T>/rows.tsv"),
         r"input=.*/rows\.tsv: no such file"),
    Case("serve-bad-input-line", "serve", ("adapters.a=<LORA>", "input=<T>/rows.tsv"),
         r"input=.*/rows\.tsv:2: is not adapter<TAB>text", files(rows__tsv="a\ta fine film\njust text, no adapter\n")),
    Case("serve-jsonl-unknown-adapter", "serve", ("adapters.a=<LORA>", "input=<T>/rows.jsonl"),
         r"input=.*/rows\.jsonl:2: names unknown adapter 'b'; use one of __base__, a$",
         files(rows__jsonl='{"adapter": "a", "sentence": "fine"}\n{"adapter": "b", "sentence": "dull"}\n')),
    Case("serve-jsonl-missing-column", "serve", ("adapters.a=<LORA>", "input=<T>/rows.jsonl"),
         r"input=.*/rows\.jsonl:1: lacks column 'sentence' \(a string\) that the sst2 template needs",
         files(rows__jsonl='{"adapter": "a", "text": "fine"}\n')),
    Case("serve-jsonl-not-json", "serve", ("adapters.a=<LORA>", "input=<T>/rows.jsonl"),
         r"input=.*/rows\.jsonl:2: is not JSON",
         files(rows__jsonl='{"adapter": "a", "sentence": "fine"}\n{"adapter": "a", "sentence": \n')),
    Case("train-mix-one-task", "train", (*TRAIN, "data=mix", "data.tasks=[sst2]"),
         r"data\.tasks: names 1 task\(s\); list two or more"),
    Case("train-mix-unknown-task", "train", (*TRAIN, "data=mix", "data.tasks=[sst2,nope]"),
         r"data\.tasks=nope: no config .*nope\.yaml; use one of agnews, csv, e2e, mix, snli, sst2"),
    Case("serve-neither-input-nor-val", "serve", ("adapters.a=<LORA>",),
         r"input: give exactly one of input=<file> and val_limit=<N>"),
]


# ------------------------------------------------------------------ running them


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    changed: list[str]  # paths under the case directory created, changed or removed (Hydra's dir aside)
    skip: str | None = None


def run_case(case: Case, tmp: Path, shared: dict[str, Path]) -> Outcome:
    tmp.mkdir(parents=True)
    if case.prepare:
        case.prepare(tmp, shared)
    marks = {"<T>": str(tmp), "<PREFIX>": str(shared["prefix"]), "<LORA>": str(shared["lora"])}
    args = [re.sub("|".join(marks), lambda m: marks[m.group(0)], a) for a in case.args]
    if (tmp / "ro").is_dir() and os.access(tmp / "ro", os.W_OK):
        return Outcome(0, "", "", [], skip="no unwritable directory here (root without chattr +i)")
    before = tree(tmp, {"h"})
    proc = subprocess.run([sys.executable, f"{case.script}.py", *args, f"hydra.run.dir={tmp / 'h'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    after = tree(tmp, {"h"})
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return Outcome(proc.returncode, proc.stdout, proc.stderr, changed)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One tiny prefix run, one LoRA run and the prefix compiled (read by many cases, written by none)."""
    root = tmp_path_factory.mktemp("shared")
    paths = {}
    for name, overrides in (("prefix", ("adapter.init=random", "adapter.m=8")), ("lora", ("adapter=lora",))):
        cfg = tiny_train_cfg(root / name, *overrides)
        train(cfg)
        paths[name] = Path(cfg.output_dir)
    compile_prefix(compose_cfg("compile", [f"ckpt={paths['prefix']}", "rank=2", "~logger", "calib_size=32",
                                           "eval_size=16"]))
    paths["compiled"] = paths["prefix"] / "compiled-r2"
    return paths


@dataclass
class Sweep:
    results: dict[str, Outcome]
    new_in_repo: list[str]
    shared_changed: list[str]


def ours(path: Path, root: Path) -> bool:
    """False for a Hydra job directory of another process (other runs in outputs/ or multirun/): every
    case points Hydra's run dir below `root`, so a job dir in the repository is a foreign one unless its
    overrides name `root`."""
    for parent in [path, *path.parents]:
        if parent == ROOT:
            break
        overrides = parent / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            return str(root) in overrides.read_text(errors="replace")
    return True


@pytest.fixture(scope="module")
def sweep(request, shared, tmp_path_factory) -> Sweep:
    """Every selected case, run two at a time, and what appeared in the repository or changed in the shared runs."""
    selected = {item.callspec.id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.id in selected] or CASES
    root = tmp_path_factory.mktemp("cases")
    repo_before = tree(ROOT, NOT_OURS)
    shared_before = {k: tree(p, set()) for k, p in shared.items()}
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            results = dict(zip([c.id for c in cases], pool.map(lambda c: run_case(c, root / c.id, shared), cases)))
    finally:
        for case in cases:
            unlock(root / case.id)  # so that pytest can delete it
    new = set(tree(ROOT, NOT_OURS)) - set(repo_before)
    foreign = {p for p in new if not ours(ROOT / p, root)}
    foreign |= {str(parent) for p in foreign for parent in Path(p).parents}  # the dirs holding them
    new = sorted(new - foreign)
    changed = sorted(k for k, p in shared.items() if tree(p, set()) != shared_before[k])
    return Sweep(results, new, changed)


def test_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


def test_nothing_appears_in_the_repository_and_shared_runs_are_unchanged(sweep):
    assert sweep.results, "no case ran"
    assert not sweep.new_in_repo, f"the entry points wrote into the repository: {sweep.new_in_repo}"
    assert not sweep.shared_changed, f"a case changed the shared runs {sweep.shared_changed}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_named_line_and_writes_nothing(case, sweep):
    out = sweep.results[case.id]
    if out.skip:
        pytest.skip(out.skip)
    shown = out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, f"exit status {out.returncode}\n{shown[-3000:]}"
    assert "Traceback" not in shown, shown[-3000:]
    assert lines and lines[-1].startswith("error: "), shown[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, out.stderr
    assert re.match(r"error: " + case.error, lines[-1]), lines[-1]
    assert not out.changed, f"written or removed: {out.changed}"
