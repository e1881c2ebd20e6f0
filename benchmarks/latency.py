"""Latency of prefix tuning and LoRA relative to the base model: GPT-2 small's shape, random weights, CPU.

    python benchmarks/latency.py [--quick] [--out benchmarks/results/latency.csv] [--threads N]
                                 [--prompt-len L] [--decode-tokens N]

Builds every candidate once, then measures each setting with `feta.latency.compare` (base and candidates
interleaved in this one process) and prints µs/token and ratios to the base model as markdown.
Random weights are enough: latency depends on shapes, not values (LoRA B is made nonzero anyway, so
that merging really changes the weights).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize
from peft import get_peft_model

from feta.adapters import LoraSpec, PrefixSpec, build_adapter, compiled_lora_config, merged_copy
from feta.compile.fit import target_modules
from feta.latency import Setting, compare
from feta.models import ModelSpec, load_base_model
from feta.schema import to_spec

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.02  # merged LoRA and compiled prefix must cost the base model, within this ratio
NOISE = 0.05  # two CPU runs of the same model differ by up to 5% (docs/results/latency.md)

# (setting, repeats): batch-32 prefill runs take seconds on 2 cores, so it gets fewer rounds.
FULL = dict(prompt_len=64, decode_tokens=32, min_run_time=0.3,
            plan=[(Setting("prefill", 1), 3), (Setting("prefill", 32), 1), (Setting("decode", 1), 2)])
QUICK = dict(prompt_len=8, decode_tokens=4, min_run_time=0.05,
             plan=[(Setting("prefill", 1), 1), (Setting("prefill", 32), 1), (Setting("decode", 1), 1)])


def model_spec() -> ModelSpec:
    """conf/model/gpt2_small_random.yaml: GPT-2 small's exact shape."""
    with initialize(config_path="../conf", version_base="1.3"):
        return to_spec(compose("train", ["model=gpt2_small_random"]), "model")


def randomize_lora_b(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Nonzero LoRA B (PEFT starts it at zero), so that a merge writes a real change into the weights."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def compiled(spec: ModelSpec, r: int = 4) -> torch.nn.Module:
    """What compile.py produces, merged: a rank-r LoRA on each layer's attention output projection
    (attn.c_proj; a bare "c_proj" target would also hit mlp.c_proj), built with the compiler's own config."""
    base, _ = load_base_model(spec)
    names = list(target_modules(base, spec.arch, "o"))
    config = compiled_lora_config(r, names, bias=False, arch=spec.arch)
    return merged_copy(randomize_lora_b(get_peft_model(base, config)))


def candidates(spec: ModelSpec, tokenizer, quick: bool) -> dict[str, torch.nn.Module]:
    ms, rs = ((32,), (4,)) if quick else ((8, 16, 32), (1, 2, 4))
    out: dict[str, torch.nn.Module] = {}
    for m in ms:
        out[f"prefix m={m}"] = build_adapter(load_base_model(spec)[0], tokenizer, PrefixSpec(m=m, init="random"), spec.arch)
    for r in rs:
        lora = randomize_lora_b(build_adapter(load_base_model(spec)[0], tokenizer, LoraSpec(r=r), spec.arch))
        out[f"LoRA r={r} unmerged"] = lora
        out[f"LoRA r={r} merged"] = merged_copy(lora)  # a copy: the unmerged one is measured too
    out["compiled r=4 merged"] = compiled(spec)
    return out


def is_merged(name: str) -> bool:
    return name.endswith(" merged")  # not "unmerged"


def target(name: str) -> str:
    return f"≤ {TARGET}" if is_merged(name) else ""


def table(rows: list[dict]) -> pd.DataFrame:
    """One line per model; per setting, µs/token and the ratio to base with its spread."""
    df = pd.DataFrame(rows)
    base = df["name"].iloc[0]  # compare() puts the base model first
    df["setting"] = df["phase"] + " b=" + df["batch"].astype(str)
    df["cell"] = [f"{r:.3f}" + ("" if i != i or n == base else f" ± {i:.3f}")  # i != i: NaN, one round
                  for n, r, i in zip(df["name"], df["ratio_to_base"], df["ratio_iqr"])]
    settings = list(dict.fromkeys(df["setting"]))  # measured order, not alphabetical
    ratios = df.pivot(index="name", columns="setting", values="cell")[settings]
    us = df.pivot(index="name", columns="setting", values="us_per_token")[settings].round(1).add_suffix(" µs/tok")
    out = ratios.join(us).reindex(list(dict.fromkeys(df["name"])))
    out.insert(0, "target", [target(n) for n in out.index])
    return out.reset_index()


def verdicts(rows: list[dict]) -> list[str]:
    """Merged and compiled entries against the target, with the noise stated beside each."""
    out = []
    for r in rows:
        if is_merged(r["name"]):
            ok = "meets" if r["ratio_to_base"] <= TARGET else "misses"
            spread = "one round" if r["ratio_iqr"] != r["ratio_iqr"] else f"ratio IQR {r['ratio_iqr']:.3f}"
            out.append(f"{r['name']}, {r['phase']} b={r['batch']}: {r['ratio_to_base']:.3f} {ok} ≤ {TARGET} "
                       f"({spread}; CPU noise ~{NOISE})")
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short prompts, largest m and r only (< 1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency.csv")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64; 8 with --quick)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decoded tokens (default 32; 4 with --quick)")
    # One thread by default: on a shared CPU an OpenMP region of 2 threads stalls whenever another job
    # holds a core (prefill at batch 1 measured 15x slower at load 6 on 2 cores), one thread only loses slices.
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default (all cores)")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    plan["prompt_len"] = args.prompt_len or plan["prompt_len"]
    plan["decode_tokens"] = args.decode_tokens or plan["decode_tokens"]
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    spec = model_spec()
    base, tokenizer = load_base_model(spec)
    cands = candidates(spec, tokenizer, args.quick)
    torch.manual_seed(0)
    input_ids = torch.randint(0, len(tokenizer), (1, plan["prompt_len"]))
    print(f"built {len(cands)} candidates in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for setting, repeats in plan["plan"]:
        t = time.perf_counter()
        rows += compare(base, cands, input_ids, settings=(setting,), decode_tokens=plan["decode_tokens"],
                        repeats=repeats, min_run_time=plan["min_run_time"])
        print(f"  {setting.phase} b={setting.batch}: {time.perf_counter() - t:.0f} s", flush=True)

    ctx = rows[0]["context"]
    df = table(rows)
    print(f"\n## Latency ratio to the base model ({spec.name}, {ctx['device']}, {ctx['dtype']}, "
          f"{ctx['threads']} threads; prompt {plan['prompt_len']} tokens, decode {plan['decode_tokens']} "
          f"tokens{'; QUICK: largest m and r only' if args.quick else ''})\n")
    print(df.to_markdown(index=False))
    busy = [r["context"]["load_avg"] for r in rows if r["context"]["load_avg"] > r["context"]["cpus"]]
    if busy:
        print(f"\nWARNING: load average up to {max(busy)} on {ctx['cpus']} CPUs while measuring: other jobs "
              "competed for the cores, so these ratios carry more than the usual noise.")
    print("\nratio = candidate median / median of the base blocks measured right before and after it; "
          "± = IQR of the per-round ratios (none with one round).")
    print(f"CPU ratios are near the noise: two runs of the same model differ by up to {NOISE:.0%}, so read "
          f"any ratio within 1 ± {NOISE} as 'no measurable difference'. GPU is where unmerged adapters cost more.")
    print("\n" + "\n".join(verdicts(rows)))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    flat = pd.json_normalize(rows, sep="_")  # context → context_device, context_dtype, context_threads
    flat["target"] = [target(n) for n in flat["name"]]
    flat.to_csv(args.out, index=False)
    print(f"\nwrote {args.out} ({len(flat)} rows); total {time.perf_counter() - t0:.0f} s")
    return df


if __name__ == "__main__":
    main()
