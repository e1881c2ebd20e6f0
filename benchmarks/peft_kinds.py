"""Plain-PEFT soft prompts of three kinds, trained briefly on SST-2, compiled by compile.py: does a P-tuning
adapter compile as faithfully as a text-initialized soft prompt?

    python benchmarks/peft_kinds.py --out /tmp/peft-kinds [--kinds ptuning,prompt_text] [--steps 30] [--compile rank=8]

Builds, with transformers + peft + torch only, on SmolLM2-135M-Instruct (the local dequantized copy of
conf/model/smollm2.yaml's GGUF file):
- `ptuning`: PromptEncoderConfig, an MLP prompt encoder, 16 virtual tokens;
- `prompt_text`: PromptTuningConfig initialized from the text of feta's SST-2 instruction, 16 virtual tokens;
- `prompt_random`: PromptTuningConfig with PEFT's random initialization, 16 virtual tokens: the control that
  tells a start off the token-embedding manifold (P-tuning's encoder output, N(0, 1) rows) from the encoder;
trains each --steps steps of 16 SST-2 training sentences (cross-entropy over the two class words at the
prompt's last token, Adam), saves it with save_pretrained, runs `compile.py ckpt=<dir> data=sst2 ~logger`
(the default method=sink, plus any --compile keys) and prints compile.json's next-token agreement with the
source on held-out sentences, the base model's, and each kind's difference from `prompt_text`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from feta.data import TaskDataModule
from feta.data.spec import DataSpec, SST2_INSTRUCTION
from feta.schema import to_spec
from peft_merge_example import ROOT, compile_sst2, smollm2_dir  # the sibling script: this directory is on sys.path

BATCH = 16


def kinds(base_dir: Path) -> dict[str, tuple[object, float]]:
    """name -> (PEFT config, learning rate). The rates are each method's usual order of magnitude."""
    return {
        "ptuning": (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16,
                                        encoder_reparameterization_type="MLP"), 1e-3),
        "prompt_text": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text=SST2_INSTRUCTION,
                                           tokenizer_name_or_path=str(base_dir)), 3e-3),
        "prompt_random": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16,
                                             prompt_tuning_init="RANDOM"), 3e-3),
    }


def sst2_batches(tokenizer, steps: int) -> tuple[list[tuple[list[str], torch.Tensor]], list[int]]:
    """`steps` batches of (prompts, class indices) from a seeded subset of SST-2's training split, and each
    class word's first token (what the prompt's last token is trained to predict)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["data=sst2", f"data.train_limit={steps * BATCH}"])
    dm = TaskDataModule(to_spec(cfg, "data", DataSpec), tokenizer, seed=0)
    dm.setup()
    train = dm.splits["train"]
    batches = [([dm.task.prompt(ex) for ex in train[i: i + BATCH]],
                torch.tensor([dm.task.label(ex) for ex in train[i: i + BATCH]])) for i in range(0, len(train), BATCH)]
    return batches, [ids[0] for ids in dm.task.verbalizer_ids]


def train_and_save(base_dir: Path, config, lr: float, steps: int, out: Path) -> None:
    """Plain torch steps on the soft prompt: the class words' logits at the prompt's last token."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    batches, class_ids = sst2_batches(tokenizer, steps)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for prompts, labels in batches:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out_ = peft_model(**enc, output_hidden_states=True, logits_to_keep=1)
        h = out_.hidden_states[-1][:, -enc["input_ids"].shape[1]:]  # the virtual tokens come first
        last = enc["attention_mask"].sum(1) - 1
        logits = peft_model.get_output_embeddings()(h[torch.arange(len(last)), last])[:, class_ids]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained {len(batches)} steps, last loss {loss.item():.3f}")
    peft_model.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Directory the adapters are saved under.")
    ap.add_argument("--steps", type=int, default=30, help="Training steps of 16 sentences per adapter.")
    ap.add_argument("--compile", nargs="*", default=[], help="Extra compile.py keys, e.g. rank=8.")
    ap.add_argument("--kinds", default="ptuning,prompt_text,prompt_random", help="Which adapters, comma-separated.")
    args = ap.parse_args()
    base_dir = smollm2_dir()
    available = kinds(base_dir)
    unknown = sorted(set(args.kinds.split(",")) - set(available))
    if unknown:
        ap.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(available)}")
    agreement = {}
    for name in args.kinds.split(","):
        config, lr = available[name]
        train_and_save(base_dir, config, lr, args.steps, args.out / name)
        record = compile_sst2(args.out / name, ["overwrite=true", *args.compile])
        nt = record["next_token"]
        agreement[name] = nt["next_token_agreement"]
        print(f"{name}: method {record['method']}, next-token agreement {nt['next_token_agreement']:.3f} (base model "
              f"{nt['base_next_token_agreement']:.3f}), KL {nt['next_token_kl']:.4f} nats (base model "
              f"{nt['base_next_token_kl']:.4f}), residual_last_mean {record['residual_last_mean']:.3f}")
    others = [name for name in agreement if name != "prompt_text"] if "prompt_text" in agreement else []
    for name in others:
        print(f"{name} - prompt_text next-token agreement: {agreement[name] - agreement['prompt_text']:+.3f}")


if __name__ == "__main__":
    main()
