"""Serving several adapters from one base model: one mixed batch vs one adapter after another, CPU.

    python benchmarks/serving.py [--model gpt2_tiny|gpt2_small_random] [--adapters 4] [--batch 32]
                                 [--repeats 5] [--min-run-time 0.2] [--runs NAME=DIR ...]

Builds one base model with `--adapters` LoRA adapters shaped like feta's (alternately a trained LoRA on
c_attn, r=4, and a compiled prefix on attn.c_proj, r=4) on SST-2, or loads real runs, of any tasks, with
--runs. `--batch` rows take turns over the adapters (and, for the synthetic ones, the base model), each
row an input of its adapter's own task; they are served (a) as one mixed batch, PEFT's per-row
`adapter_names`, classification rows scored from the prefill and generation rows decoded together, and
(b) one adapter after another, each on its own rows. Each is timed with torch.utils.benchmark
(blocked_autorange of at least --min-run-time s), the two interleaved for --repeats rounds so that drift
in machine load hits both alike; prints rows/s (median over all blocks) and the ratio (a)/(b), and checks
that both give the same classes and outputs. Random weights are enough for the synthetic case: speed
depends on shapes.
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize
from peft import LoraConfig, get_peft_model
from torch.utils.benchmark import Measurement, Timer

from feta.data import DataSpec
from feta.models import ModelSpec, load_base_model
from feta.schema import to_spec
from feta.serving import AdapterServer, validation_requests


def synthetic_server(spec: ModelSpec, data: DataSpec, n_adapters: int) -> AdapterServer:
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
    return AdapterServer(model, {name: data for name in model.peft_config}, tokenizer)


def timed(fn, min_run_time: float) -> Measurement:
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                 ).blocked_autorange(min_run_time=min_run_time)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_tiny", help="conf/model/<name>.yaml with source=random")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of (mixed, sequential)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed blocks per round and mode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", nargs="*", metavar="NAME=DIR", help="real LoRA runs / compiled dirs instead")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.runs:
        server = AdapterServer.from_runs(dict(item.split("=", 1) for item in args.runs))
        model_name = "from --runs"
    else:
        with initialize(config_path="../conf", version_base="1.3"):
            cfg = compose("train", [f"model={args.model}", "data=sst2"])
        server = synthetic_server(to_spec(cfg, "model"), to_spec(cfg, "data"), args.adapters)
        model_name = args.model
    # Each task's first validation inputs, the adapters taking turns (the base model too when synthetic).
    requests = validation_requests(server, args.batch, None, base=not args.runs)[0][: args.batch]
    names = [r.adapter for r in requests]

    def read(results: list[dict]) -> list:
        return [r.get("class", r.get("output")) for r in results]

    def mixed_batch() -> list[dict]:
        return server.serve(requests, args.batch)

    def one_at_a_time() -> list[dict]:
        return server.serve_sequential(requests, args.batch)

    same = read(mixed_batch()) == read(one_at_a_time())
    mixed, sequential = [], []
    for _ in range(args.repeats):
        mixed.append(timed(mixed_batch, min_run_time=args.min_run_time))
        sequential.append(timed(one_at_a_time, min_run_time=args.min_run_time))
    rows = len(requests)
    mixed_rps = rows / Measurement.merge(mixed)[0].median
    seq_rps = rows / Measurement.merge(sequential)[0].median
    result = {"model": model_name, "adapters": len(server.adapters), "batch": rows, "threads": torch.get_num_threads(),
              "mixed_rows_per_s": mixed_rps, "sequential_rows_per_s": seq_rps, "ratio": mixed_rps / seq_rps,
              "tasks": sorted({r.task for r in requests}), "same_classes_and_outputs": same}
    print(f"model={model_name} adapters={len(server.adapters)} tasks={','.join(result['tasks'])} batch={rows} "
          f"threads={result['threads']} "
          f"repeats={args.repeats} min_run_time={args.min_run_time}")
    print("| mode | forward passes | rows/s (median) |\n|---|---|---|")
    print(f"| mixed batch (adapter_names) | 1 prefill | {mixed_rps:.1f} |")
    print(f"| one adapter after another | {len(set(names))} prefills | {seq_rps:.1f} |")
    print(f"throughput ratio mixed / sequential: {result['ratio']:.2f}x; same classes and outputs: {same}")
    return result


if __name__ == "__main__":
    main()
