"""The FETA equivalence analysis (feta.equivalence.analyze) on a model, printing its verdict table.

    python benchmarks/equivalence.py                          # tiny random GPT-2 and Llama, < 5 min on 2 CPUs
    python benchmarks/equivalence.py --prefix-run <run dir> [--lora-run <run dir>] [--layers 0 15 29] [--heads 0]

Without a run: each tiny random model gets a PEFT text-init prefix (m = 8) moved off its init by noise
and a PEFT LoRA (r = 4, default targets) with nonzero B. They stand in for trained adapters: the numbers
say what the measurements give on random layers, not what trained adapters do.
With --prefix-run (a train.py run directory: config.yaml + adapter/), the base model, data and prompt
come from the run's config, the text init from its adapter.init_text; --lora-run must use the same model.
Writes <out>/<name>/equivalence.json, linearity.png, span_grid.png and prefix_spectrum.png.
Real models are large: pass a few --layers and --heads (each layer/head costs per-head SVDs of
(N·d_head) × (2·m·d_head) Jacobians), and fewer --prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from feta.adapters import LoraSpec, PrefixSpec, build_adapter
from feta.analysis import equivalence_models
from feta.data import DataSpec, TaskDataModule
from feta.equivalence import analyze
from feta.data.spec import SST2_INSTRUCTION
from feta.models import ModelSpec, load_base_model, named_model

ROOT = Path(__file__).resolve().parents[1]

# conf/model/<name>.yaml, each with 512 positions: room for m + max_length
TINY = {name: named_model(name) for name in ("gpt2_tiny", "llama_tiny")}


def prompt_batch(tokenizer, data: DataSpec, n: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n validation prompts, right-padded: the fixed data of the analysis."""
    texts = TaskDataModule(data, tokenizer).prompts("validation", n)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def random_models(spec: ModelSpec, m: int = 8, seed: int = 0):
    """Base, prefix and LoRA models on separate copies (PEFT's LoRA edits its base in place)."""
    base, tok = load_base_model(spec)
    prefix = build_adapter(load_base_model(spec)[0], tok, PrefixSpec(m=m, init="text", init_text=SST2_INSTRUCTION), spec.arch)
    lora = build_adapter(load_base_model(spec)[0], tok, LoraSpec(r=4), spec.arch)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the init, so that neither sits at a special point
        emb = prefix.prompt_encoder["default"].embedding.weight
        emb.add_(0.3 * emb.std() * torch.randn(emb.shape, generator=gen))
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return base, prefix, lora, tok, torch.tensor(tok(SST2_INSTRUCTION, add_special_tokens=False)["input_ids"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-run", type=Path, help="train.py run directory of a prefix (default: tiny random models)")
    p.add_argument("--lora-run", type=Path, help="train.py run directory of a LoRA on the same model")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "equivalence", help="results go to <out>/<model name>/")
    p.add_argument("--prompts", type=int, default=12, help="validation prompts (first half fitted, rest held out)")
    p.add_argument("--max-length", type=int, default=24, help="truncate prompts to this many tokens")
    p.add_argument("--layers", type=int, nargs="+", help="layer indices (default: all)")
    p.add_argument("--heads", type=int, nargs="+", help="key/value head indices (default: all)")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="prefix lengths of the grid")
    p.add_argument("--rs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="LoRA ranks of the grid")
    p.add_argument("--draws", type=int, default=2, help="random LoRA directions per grid cell")
    p.add_argument("--rtol", type=float, default=1e-8, help="rank cut-off: σ > rtol·σ_max")
    p.add_argument("--threads", type=int, default=1, help="torch threads (thousands of tiny jvps: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.prefix_run is None:
        jobs = [(name, lambda spec=spec: (*random_models(spec), DataSpec(), spec.name)) for name, spec in TINY.items()]
    else:
        def from_runs():  # feta.analysis's loader: what analyze.py analysis=equivalence measures
            base, prefix, lora, tok, init_ids, data, spec = equivalence_models(args.prefix_run, args.lora_run)
            return base, prefix, lora, tok, init_ids, data, spec.name
        jobs = [("run", from_runs)]
    for name, build in jobs:
        start = time.perf_counter()
        base, prefix, lora, tok, init_ids, data, model_name = build()
        ids, mask = prompt_batch(tok, data, args.prompts, args.max_length)
        print(f"\n## {model_name}: {int(mask.sum())} real tokens in {len(ids)} prompts")
        res = analyze(base, prefix, lora, ids, mask, args.out / model_name, layers=args.layers, heads=args.heads,
                      ms=tuple(args.ms), rs=tuple(args.rs), init_ids=init_ids, rtol=args.rtol, draws=args.draws)
        span = res["span"]
        print(f"r = m boundary in the grid: {span['boundary_at_r_eq_m']}; random-vector baseline at m = {args.ms[-1]}: "
              f"{span['points']['text']['baseline'][-1]:.3f}; gating λ in [{res['gating']['lam_min']:.3f}, "
              f"{res['gating']['lam_max']:.3f}]")
        print(f"wrote {args.out / model_name} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
