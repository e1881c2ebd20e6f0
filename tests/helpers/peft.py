"""Plain PEFT adapters for the compile tests: prompts over a small vocabulary, and adapters built and saved
with transformers + peft + torch only (no feta in the building code), as a PEFT user would make them."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

WORDS = ("the a film movie plot actor scene music story was is very quite rather good bad dull bright slow long "
         "short warm cold odd and but with without").split()
POSITIVE = {"good", "bright", "warm"}
N_PROMPTS = 240  # 48 held out (20%), 192 calibrate: ~1,500 tokens, several times the models' width of 64


def word_prompts(n: int, seed: int = 0) -> list[str]:
    """n seeded prompts of 4 to 12 words from WORDS."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _train(peft_model, tok, prompts: list[str], steps: int, lr: float = 0.1) -> None:
    """Plain torch steps: the prompt's last token should predict " yes" when it holds a positive word, else
    " no". The random tiny models barely learn the rule, but the adapter moves every prediction."""
    yes, no = tok(" yes")["input_ids"][0], tok(" no")["input_ids"][0]
    labels = torch.tensor([yes if POSITIVE & set(p.split()) else no for p in prompts])
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        rows = slice((16 * step) % len(prompts), (16 * step) % len(prompts) + 16)
        batch = tok(prompts[rows], return_tensors="pt", padding=True)
        # The head runs on the last tokens only (it is most of the cost over a 50k vocabulary); a soft
        # prompt's virtual positions come first and are cut off.
        out = peft_model(**batch, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1][:, -batch["input_ids"].shape[1]:]
        last = batch["attention_mask"].sum(1) - 1
        logits = peft_model.get_output_embeddings()(h[torch.arange(len(last)), last])
        loss = F.cross_entropy(logits, labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_adapter(base_dir: Path, config, out: Path, steps: int = 0, prompts: list[str] = (), gate: float | None = None
                  ) -> Path:
    """An adapter made and saved the way a PEFT user would: transformers + peft + torch only."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    if gate is not None:  # LLaMA-Adapter's gates start at 0, where the adapter does nothing
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "adaption_gate" in name:
                    param.fill_(gate)
    if steps:
        _train(peft_model, tok, list(prompts), steps)
    peft_model.save_pretrained(str(out))
    return out
