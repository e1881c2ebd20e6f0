"""Serving several adapters from one base model: one mixed batch vs one forward pass per adapter, CPU.

    python benchmarks/serving.py [--model gpt2_tiny|gpt2_small_random] [--adapters 4] [--batch 32]
                                 [--repeats 5] [--runs NAME=DIR ...]

Builds one base model with `--adapters` LoRA adapters shaped like feta's (alternately a trained LoRA on
c_attn, r=4, and a compiled prefix on attn.c_proj, r=4), or loads real runs with --runs. A batch of
`--batch` SST-2 prompts is split evenly over the adapters and the base model; it is classified (a) in one
forward pass with PEFT's per-row `adapter_names` and (b) one adapter after another, each on its own rows.
Both are timed interleaved in this process; prints rows/s (median of --repeats) and the ratio (a)/(b),
and checks that both give the same logits. Random weights are enough: speed depends on shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing feta

from feta.data import DataSpec, label_token_ids, load_sst2  # noqa: E402
from feta.models import ModelSpec, load_base_model  # noqa: E402
from feta.serving import BASE, AdapterServer  # noqa: E402


def model_spec(name: str) -> ModelSpec:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    cfg.pop("defaults", None)
    return ModelSpec(**cfg)


def synthetic_server(spec: ModelSpec, n_adapters: int) -> AdapterServer:
    base, tokenizer = load_base_model(spec)
    model = None
    torch.manual_seed(0)
    for k in range(n_adapters):
        # even k: like a trained LoRA (c_attn); odd k: like a compiled prefix (attention output projection)
        targets = ["c_attn"] if k % 2 == 0 else ["attn.c_proj"]
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
        name = f"{'lora' if k % 2 == 0 else 'compiled'}{k}"
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # PEFT starts B at zero; nonzero so every adapter really changes the output
            torch.nn.init.normal_(p, std=0.02)
    data = DataSpec()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AdapterServer(model, tokenizer, label_token_ids(tokenizer, list(data.label_words)), data.prompt, data.max_length)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_tiny", help="conf/model/<name>.yaml with source=random")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", nargs="*", metavar="NAME=DIR", help="real LoRA runs / compiled dirs instead")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.runs:
        server = AdapterServer.from_runs(dict(item.split("=", 1) for item in args.runs))
        model_name = "from --runs"
    else:
        server = synthetic_server(model_spec(args.model), args.adapters)
        model_name = args.model
    rotation = server.adapters + [BASE]
    sentences = [s for s, _ in load_sst2(DataSpec())["validation"][: args.batch]]
    names = [rotation[i % len(rotation)] for i in range(len(sentences))]

    mixed, sequential = server.classify(sentences, names), server.classify_sequential(sentences, names)  # warm-up
    max_diff = float((mixed - sequential).abs().max())
    t_mixed, t_seq = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t_mixed.append(timed(server.classify, sentences, names))
        t_seq.append(timed(server.classify_sequential, sentences, names))
    rows = len(sentences)
    mixed_rps, seq_rps = rows / statistics.median(t_mixed), rows / statistics.median(t_seq)
    result = {"model": model_name, "adapters": len(server.adapters), "batch": rows, "threads": torch.get_num_threads(),
              "mixed_rows_per_s": mixed_rps, "sequential_rows_per_s": seq_rps, "ratio": mixed_rps / seq_rps,
              "max_abs_logit_diff": max_diff}
    print(f"model={model_name} adapters={len(server.adapters)} (+ base) batch={rows} threads={result['threads']} "
          f"repeats={args.repeats}")
    print("| mode | forward passes | rows/s (median) |\n|---|---|---|")
    print(f"| mixed batch (adapter_names) | 1 | {mixed_rps:.1f} |")
    print(f"| one adapter after another | {len(set(names))} | {seq_rps:.1f} |")
    print(f"throughput ratio mixed / sequential: {result['ratio']:.2f}x; max |logit diff| {max_diff:.1e}")
    return result


if __name__ == "__main__":
    main()
