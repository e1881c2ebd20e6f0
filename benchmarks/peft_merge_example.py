"""A PEFT prefix made with plain `peft`, merged by compile.py: the path of an adapter trained outside feta.

    python benchmarks/peft_merge_example.py --out /tmp/smollm2-prefix
    python benchmarks/peft_merge_example.py --out /tmp/smollm2-prefix --compile rank=8 merge=true

Builds a text-initialized PREFIX_TUNING adapter (16 virtual tokens, no projection) on SmolLM2-135M-Instruct,
the local dequantized copy of conf/model/smollm2.yaml's GGUF file, saves it to --out with PEFT's
save_pretrained, then runs `compile.py ckpt=<out> data=sst2 ~logger` (plus any --compile keys) and prints
compile.json's next_token numbers. The base model resolves from adapter_config.json's
base_model_name_or_path, that local directory; the first run fetches and dequantizes the GGUF file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from peft import PrefixTuningConfig, get_peft_model, initialize_kv_prefix_from_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from feta.data.spec import SST2_INSTRUCTION
from feta.models import ModelSpec, dequantize_gguf
from feta.schema import to_spec

ROOT = Path(__file__).resolve().parents[1]
TEXT = SST2_INSTRUCTION  # feta's SST-2 instruction, so the prefix starts as a quickstart prefix does


def smollm2_dir() -> Path:
    """The dequantized SmolLM2 directory feta.models loads for model=smollm2 (built once, then cached)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["model=smollm2"])
    return dequantize_gguf(to_spec(cfg, "model", ModelSpec))


def build_prefix(base_dir: Path, out: Path) -> None:
    """Plain peft: a prefix started from the key/value cache of TEXT, saved as any PEFT user would."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, prefix_projection=False)
    peft_model = get_peft_model(model, config)
    initialize_kv_prefix_from_text(peft_model, tokenizer, text=TEXT, use_chat_template=False)
    peft_model.save_pretrained(str(out))


def compile_sst2(adapter: Path, extra: list[str]) -> dict:
    """`compile.py ckpt=<adapter> data=sst2 ~logger` plus `extra` keys on a PEFT adapter directory; the
    compile.json it wrote (the newest under the adapter)."""
    cmd = [sys.executable, "compile.py", f"ckpt={adapter.resolve()}", "data=sst2", "~logger", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    newest = max(adapter.glob("compiled-r*/compile.json"), key=lambda path: path.stat().st_mtime_ns)
    return json.loads(newest.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Directory the PEFT adapter is saved to.")
    ap.add_argument("--compile", nargs="*", default=[], help="Extra compile.py keys, e.g. rank=8 merge=true.")
    args = ap.parse_args()
    build_prefix(smollm2_dir(), args.out)
    print(f"saved a PREFIX_TUNING adapter to {args.out}")
    nt = compile_sst2(args.out, args.compile)["next_token"]
    print(f"next token on {nt['positions']} held-out SST-2 positions: agreement {nt['next_token_agreement']:.3f} "
          f"(base model {nt['base_next_token_agreement']:.3f}), KL {nt['next_token_kl']:.4f} nats (base model "
          f"{nt['base_next_token_kl']:.4f})")


if __name__ == "__main__":
    main()
