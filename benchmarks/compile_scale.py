"""Memory and time of a compile at real model shapes, random weights, no download (docs/results/compile_scale.md).

    python benchmarks/compile_scale.py --shapes tiny --calib-sizes 32 --out /tmp/x.csv --plot /tmp/x.png
    python benchmarks/compile_scale.py --shapes one-copy,smollm2-360m,smollm2-1.7b --calib-sizes 64,128,256 \\
        --out scale.csv --plot scale.png

Per shape: a random Llama with the GPT-2 vocabulary (50,257; tied embeddings, as SmolLM2), a random plain-PEFT
prefix (16 virtual tokens) and synthetic ~70-token prompts, then `compile.py model=llama_tiny
'++model.config={...}' method=lstsq rank=4 calib_size=N` under /usr/bin/time -v. A baseline process imports
compile.py, loads the same model as feta does and runs one 32 x 72 forward. Prints peak RSS, the excess over
the baseline against the weights (target: excess <= 0.5 x weights + 0.4 GB), the peak against 1.3 x weights +
caches + 1 GB (caches: the compile's own estimate, read from its log line), fit time per layer, and an
extrapolation to Llama-3-8B in bf16 on one 24 GB GPU. Shapes are SmolLM2's; one-copy (hidden 512, 16 layers,
intermediate 2304) has 99.1M parameters, 25.7M of them the tied embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"max_position_embeddings": 2048, "tie_word_embeddings": True}
SHAPES = {  # hidden, layers, intermediate, heads, kv heads
    "tiny": (64, 2, 128, 4, 2),
    "one-copy": (512, 16, 2304, 8, 8),
    "smollm2-360m": (960, 32, 2560, 15, 5),
    "smollm2-1.7b": (2048, 24, 8192, 32, 32),
}
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
MICRO_BATCH, BASELINE_TOKENS, VIRTUAL_TOKENS = 32, 72, 16
WORDS = ("the a of and to in that it was for on with as his they at be this from have or by one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she many "
         "some so these would other into has more her two like him see time could no make than first been its who "
         "now people my made over did down only way find use may water long little very after words called just "
         "where most know get through back much before go good new write our used me man too any day same right "
         "look think also around another came come work three must because does part even place well such").split()


def llama_config(shape: str) -> dict:
    hidden, layers, ffn, heads, kv = SHAPES[shape]
    return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": ffn,
            "num_attention_heads": heads, "num_key_value_heads": kv, **COMMON}


def overrides(shape: str) -> list[str]:
    """Hydra keys for the random model: a plain `model.config={...}` merges into llama_tiny's dict but
    refuses keys it lacks (tie_word_embeddings); `++` merges and adds them."""
    body = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in llama_config(shape).items())
    return ["model=llama_tiny", f"model.name={shape}", f"++model.config={{{body}}}"]


def write_prompts(path: Path, n: int, seed: int) -> None:
    """n English-like prompts of ~70 GPT-2 tokens (64 words, a full stop every 6-14); prompt i is the same
    in every file of the same seed."""
    lines = []
    for i in range(n):
        rng, words, cut = random.Random(seed * 1_000_003 + i), [], 0
        for j in range(64):
            word = rng.choice(WORDS)
            words.append(word.capitalize() if j == cut else word)
            if j - cut >= rng.randint(6, 14):
                words[-1] += "."
                cut = j + 1
        lines.append(" ".join(words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_adapter(shape: str, out: Path, seed: int) -> None:
    """A random PEFT prefix saved as any PEFT user would. The base model is built on the meta device: only its
    config shapes the prefix, and a 1.7B model in fp32 would cost 7 GB here beside the one being measured."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from feta.models import TOKENIZERS

    vocab = len(AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2")))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**llama_config(shape), vocab_size=vocab))
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    encoder = model.prompt_encoder["default"]
    encoder.to_empty(device="cpu")  # PEFT put it on the base model's (meta) device
    torch.manual_seed(seed)
    encoder.embedding.reset_parameters()
    model.save_pretrained(str(out))


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Peak RSS (GB) and wall time (s) of `cmd` per /usr/bin/time -v, and its output (also written to `log`)."""
    stats = log.with_suffix(".time")
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(stats), *cmd], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    text = stats.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    clock = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", text).group(1).split(":")
    wall = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock)))
    return rss_kb * 1024 / 1e9, wall, proc.stdout


def measure_compile(shape: str, n: int, work: Path, eval_size: int, env: dict[str, str]) -> dict:
    """One compile of `shape` on n calibration prompts; the file holds n + eval_size so that, after
    feta's 20% (at most eval_size) hold-out, at least n are left to calibrate on."""
    prompts = work / f"prompts-{n}.txt"
    write_prompts(prompts, n + eval_size, seed=0)
    out = work / f"compiled-n{n}"
    cmd = [sys.executable, "compile.py", f"ckpt={work / 'adapter'}", f"calib_file={prompts}", *overrides(shape),
           "method=lstsq", "rank=4", f"calib_size={n}", f"eval_size={eval_size}", "~logger", f"out_dir={out}",
           "overwrite=true", f"hydra.run.dir={work / 'hydra' / f'n{n}'}"]
    rss, wall, text = timed(cmd, env, work / f"compile-n{n}.log")
    record = json.loads((out / "compile.json").read_text())
    caches = float(re.search(r"calibration caches ([\d.]+) GB", text).group(1))
    cal, layers = record["calibration"], SHAPES[shape][1]
    return {"shape": shape, "layers": layers, "calib_prompts": cal["examples"],
            "tokens": cal["examples"] * cal["longest"], "tokens_per_prompt": cal["longest"], "peak_rss_gb": rss,
            "wall_s": wall, "fit_time_s": record["fit_time_s"], "per_layer_s": record["fit_time_s"] / layers,
            "estimate_gb": record["memory"]["estimate_gb"], "caches_gb": caches,
            "caches_on": record["memory"]["caches_on"]}


def baseline(shape: str) -> None:
    """Child process: compile.py's imports, the model loaded as feta loads it, one micro-batch forward.
    logits_to_keep=1 as in every full-model forward of the compile: full logits would add 32 x 72 x 50,257
    floats (0.46 GB) that the compile never holds."""
    sys.path.insert(0, str(ROOT))
    import compile  # noqa: F401  - the same libraries in memory as the compile process
    from hydra import compose, initialize_config_dir

    from feta.models import load_base_model
    from feta.schema import to_spec

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("compile", ["ckpt=unused", "~logger", *overrides(shape)])
    model, tokenizer = load_base_model(to_spec(cfg, "model"), keep=False)
    ids = torch.randint(0, len(tokenizer), (MICRO_BATCH, BASELINE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    print("BASELINE " + json.dumps({"params": sum(p.numel() for p in model.parameters()), "layer_params": layer}))


def extrapolate(row: pd.Series, prompts: int, gpu_tflops: float) -> None:
    """Llama-3-8B in bf16 on one 24 GB GPU from the compile's own memory plan (feta.compile.memory) and the
    per-layer time of `row`; an extrapolation, printed as one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from feta.compile import memory
    from feta.compile.spec import CompileSpec
    from feta.errors import UserError

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B), dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    weights, T = params * 2 / 1e9, int(row["tokens_per_prompt"])
    batches = [{"input_ids": torch.empty(min(MICRO_BATCH, prompts - i), T, device="meta")}
               for i in range(0, prompts, MICRO_BATCH)]
    held = [{"input_ids": torch.empty(MICRO_BATCH, T, device="meta")}]
    spec = CompileSpec(method="lstsq", rank=4, memory_gb=24 - weights)
    try:
        need, verdict = memory.plan(model, batches, held, spec, VIRTUAL_TOKENS, torch.device("cuda")), "fits"
    except UserError as e:
        need, verdict = None, f"does NOT fit: {e}"
    print(f"\nEXTRAPOLATION (not measured) to Llama-3-8B, bf16, one 24 GB GPU, {prompts} prompts x {T} tokens:")
    print(f"  weights = {params / 1e9:.2f}B params x 2 B = {weights:.2f} GB")
    if need is not None:
        print(f"  caches = tokens x 4096 x 2 B x 3 + masks = {need.caches / 1e9:.2f} GB; statistics = float64 "
              f"(d^2 + d^2) x 8 B per o_proj, d = 4096 = {need.statistics / 1e9:.2f} GB; working "
              f"{need.working / 1e9:.2f} GB + slack {memory.SLACK / 1e9:.1f} GB (feta.compile.memory.plan)")
        print(f"  total {weights + need.total / 1e9:.2f} GB of 24 GB: {verdict} (caches on {need.store})")
    else:
        print(f"  {verdict}")
    flops = 2 * prompts * T * layer  # per layer: one forward's matmuls, 2 x tokens x per-layer params
    measured = 2 * row["tokens"] * row["layer_params"]
    cpu = row["per_layer_s"] * flops / measured
    print(f"  time per layer = measured {row['per_layer_s']:.2f} s ({row['shape']}, {row['tokens']:,} tokens) x "
          f"FLOPs ratio {flops / measured:.1f} = {cpu:.0f} s on THIS CPU ({cpu * 32 / 60:.0f} min for 32 layers); "
          f"measured effective rate {measured / row['per_layer_s'] / 1e9:.1f} GFLOP/s")
    gpu = flops / (gpu_tflops * 1e12)
    print(f"  on a GPU: CPU->GPU speed is not extrapolated; at an ASSUMED effective {gpu_tflops:g} TFLOP/s "
          f"(--gpu-tflops): {gpu:.3f} s per layer, {gpu * 32:.1f} s for 32 layers (float64 statistics not modelled)")


def plot(df: pd.DataFrame, path: Path) -> None:
    import seaborn as sns  # late: the baseline child runs this file and must hold what the compile holds, no more

    from feta.report.plots import plt, save  # late, as seaborn

    df = df.assign(calib_prompts=df["calib_prompts"].astype(str))  # categories, not a colour scale
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (x, hue, label) in enumerate((("tokens", "shape", "calibration tokens (padded)"),
                                           ("params", "calib_prompts", "model parameters"))):
        for r, (y, ylabel) in enumerate((("peak_rss_gb", "peak RSS, GB"), ("fit_time_s", "fit time, s"))):
            ax = axes[r][col]
            sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", ax=ax, palette="deep")
            if y == "peak_rss_gb":
                sns.lineplot(data=df, x=x, y="baseline_rss_gb", hue=hue, ls="--", marker="x", ax=ax, legend=False,
                             palette="deep")
            ax.set_ylim(bottom=0)
            ax.set(xlabel=label, ylabel=ylabel, xscale="log" if x == "params" else "linear")
            ax.grid(alpha=0.3)
    axes[0][0].set_title("vs calibration tokens (dashed: one model + one forward)")
    axes[0][1].set_title("vs model size (dashed: one model + one forward)")
    fig.suptitle("compile.py method=lstsq rank=4, random Llama shapes, CPU fp32", fontsize=12)
    fig.tight_layout()
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--calib-sizes", default="64", help="calibration prompts per compile, comma-separated")
    ap.add_argument("--eval-size", type=int, default=16, help="held-out prompts (residuals, next token)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the measured processes; 0 = default")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--extrapolate-prompts", type=int, default=512, help="calibration prompts for Llama-3-8B")
    ap.add_argument("--gpu-tflops", type=float, default=100.0, help="ASSUMED effective GPU throughput")
    ap.add_argument("--out", type=Path, help="CSV, one row per compile")
    ap.add_argument("--append", action="store_true", help="add the rows to --out's and plot them all")
    ap.add_argument("--plot", type=Path, help="PNG: peak memory and fit time vs tokens and vs parameters")
    ap.add_argument("--baseline", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.baseline:
        baseline(args.baseline)
        return
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                            if args.threads else {})}
    root = args.work or Path(tempfile.mkdtemp(prefix="compile-scale-"))
    rows = []
    for shape in args.shapes.split(","):
        work = root / shape
        work.mkdir(parents=True, exist_ok=True)
        make_adapter(shape, work / "adapter", seed=0)
        rss, _, text = timed([sys.executable, __file__, "--baseline", shape], env, work / "baseline.log")
        sizes = json.loads(text.split("BASELINE ", 1)[1].splitlines()[0])
        for n in map(int, args.calib_sizes.split(",")):
            row = {**measure_compile(shape, n, work, args.eval_size, env), **sizes,
                   "weights_gb": sizes["params"] * 4 / 1e9, "baseline_rss_gb": rss}
            rows.append(row)
            w, excess = row["weights_gb"], row["peak_rss_gb"] - rss
            print(f"{shape}: {sizes['params'] / 1e6:.1f}M params, weights {w:.3f} GB; {row['calib_prompts']} prompts,"
                  f" {row['tokens']:,} tokens; peak RSS {row['peak_rss_gb']:.3f} GB (estimate {row['estimate_gb']:.3f}"
                  f"), baseline {rss:.3f} GB; wall {row['wall_s']:.1f} s, fit {row['fit_time_s']:.1f} s, "
                  f"{row['per_layer_s']:.2f} s/layer", flush=True)
            print(f"  excess {excess:.3f} GB = {excess / w:.2f} x weights; target <= 0.5 x weights + 0.4 GB = "
                  f"{0.5 * w + 0.4:.3f}: {'meets' if excess <= 0.5 * w + 0.4 else 'MISSES'}")
            bound = 1.3 * w + row["caches_gb"] + 1
            print(f"  peak {row['peak_rss_gb']:.3f} vs 1.3 x weights + caches {row['caches_gb']:.2f} (the compile's "
                  f"log line) + 1 GB = {bound:.3f}: {'meets' if row['peak_rss_gb'] <= bound else 'MISSES'}")
    columns = ["shape", "params", "weights_gb", "calib_prompts", "tokens", "peak_rss_gb", "baseline_rss_gb",
               "fit_time_s", "per_layer_s", "estimate_gb", "caches_gb", "wall_s"]
    df = pd.DataFrame(rows)[columns]
    print(f"work dir: {root}")
    if args.out and args.append and args.out.is_file():
        df = pd.concat([pd.read_csv(args.out), df], ignore_index=True)
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    if args.plot:
        plot(df, args.plot)
        print(f"wrote {args.plot}")
    # From this run's rows: the CSV keeps the table's columns, not the prompt length and layer size it needs.
    extrapolate(pd.DataFrame(rows).sort_values(["params", "tokens"]).iloc[-1], args.extrapolate_prompts, args.gpu_tflops)


if __name__ == "__main__":
    main()
