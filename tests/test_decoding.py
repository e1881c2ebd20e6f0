"""feta.decoding on tiny random GPT-2 and Llama models: batched cached greedy decoding of padded prompts
equals step-by-step full forwards of each prompt alone, for a base model and every adapter kind."""

from __future__ import annotations

import pytest
import torch

from feta.adapters import GatedPrefixSpec, IA3Spec, LoraSpec, PrefixSpec, PromptSpec, build_adapter, merged_copy
from feta.decoding import decode_ids, decode_texts, greedy_decode, left_align, prefill_then_greedy
from feta.models import load_base_model, named_model

ARCHS = ("gpt2_tiny", "llama_tiny")
KINDS = ("base", "prefix", "prompt", "lora", "merged_lora", "ia3", "gated_prefix")
ADAPTED = KINDS[1:]
PAD = 0
NEW = 6
# Three prompts of different lengths (the longest first, so both padding sides are exercised).
LENGTHS = (9, 3, 6)


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Larger query/key weights and GPT-2 position embeddings. At the random init (std 0.02) attention is
    nearly uniform and positions barely move the logits: measured, decoding that ignored the padding in
    its position ids or its decode-step mask still chose the same tokens for most models here."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_attn.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith("wpe.weight"):
                p.mul_(10.0)
    return model


def build(arch: str, kind: str) -> torch.nn.Module:
    """A tiny random model, its adapter (if any) set to random non-zero values so that it matters."""
    model, tok = load_base_model(named_model(arch))
    sharpen(model)
    family = named_model(arch).arch
    adapter = {"prefix": PrefixSpec(m=4, init="random"), "prompt": PromptSpec(m=4, init="random"),
               "lora": LoraSpec(r=4), "merged_lora": LoraSpec(r=4), "ia3": IA3Spec(),
               "gated_prefix": GatedPrefixSpec(m=4)}.get(kind)
    if adapter is None:
        return model.eval()
    peft_model = build_adapter(model, tok, adapter, family)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            # PEFT starts LoRA's B and the gated prefix's gate at zero, and draws LoRA's A from the global RNG.
            if "lora_" in name or "prompt_encoder" in name or "adaption_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "ia3_l" in name:  # IA3 starts at 1, the identity
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return merged_copy(peft_model) if kind == "merged_lora" else peft_model.eval()


def prompts(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50000, (n,), generator=gen) for n in LENGTHS]


def padded(rows: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def reference(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens of one unpadded prompt by full forwards without a cache (PEFT adds its adapter)."""
    seq = prompt.tolist()
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def expected(ref: list[int], eos: int | None, n: int) -> list[int]:
    """`ref` cut after its first EOS, padded to n."""
    if eos is not None and eos in ref:
        ref = ref[: ref.index(eos) + 1]
    return ref + [PAD] * (n - len(ref))


@pytest.fixture(scope="module")
def models():
    return {(arch, kind): build(arch, kind) for arch in ARCHS for kind in KINDS}


@pytest.fixture(scope="module")
def references(models):
    rows = prompts()
    return {key: [reference(model, r, NEW) for r in rows] for key, model in models.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_single_full_forwards(models, references, arch, kind):
    model = models[arch, kind]
    for left in (True, False):
        ids, mask = padded(prompts(), left)
        out = greedy_decode(model, ids, mask, NEW, eos_token_id=None, pad_token_id=PAD)
        assert out.shape == (3, NEW)
        assert out.tolist() == references[arch, kind], f"left padding={left}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ADAPTED)
def test_adapter_changes_output(references, arch, kind):
    """Guards the test above: a dropped adapter would decode as the base model does."""
    assert references[arch, kind] != references[arch, "base"]
    if kind == "merged_lora":  # merging changes where LoRA is computed, not what it computes
        assert references[arch, kind] == references[arch, "lora"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["base", "prefix"])
def test_eos_padding_and_early_stop(models, references, arch, kind):
    model = models[arch, kind]
    refs = references[arch, kind]
    eos = refs[1][0]  # row 1 stops at once
    calls = []  # the batch of each forward
    counted = model.get_base_model() if hasattr(model, "get_base_model") else model  # one call per forward
    handle = counted.register_forward_pre_hook(lambda m, a, kw: calls.append(len(kw["input_ids"])), with_kwargs=True)
    try:
        ids, mask = padded(prompts(), left=False)
        out = greedy_decode(model, ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
        assert out.tolist() == [expected(r, eos, NEW) for r in refs]
        assert out[1, 0] == eos and (out[1, 1:] == PAD).all()
        # One prefill, then one step per token after the first, until the last row has stopped; a row that
        # has stopped leaves the batch, so each step runs only the rows still decoding.
        stops = [r.index(eos) + 1 if eos in r else NEW for r in refs]
        assert calls == [3] + [sum(s > t + 1 for s in stops) for t in range(max(stops) - 1)]
        assert calls[1] == 2

        calls.clear()
        single, single_mask = padded(prompts()[1:2], left=True)
        alone = greedy_decode(model, single, single_mask, NEW, eos_token_id=eos, pad_token_id=PAD)
        assert alone.tolist() == [[eos] + [PAD] * (NEW - 1)]
        assert len(calls) == 1  # the prefill alone: every row finished on its first token
    finally:
        handle.remove()


def test_left_align_keeps_order():
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 9], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    aligned, aligned_mask = left_align(ids, mask)
    assert aligned.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9], [1, 2, 3, 4]]
    assert aligned_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_too_long_raises(models):
    ids, mask = padded(prompts(), left=True)
    with pytest.raises(ValueError, match="model positions"):
        greedy_decode(models["gpt2_tiny", "prefix"], ids, mask, 512 - 4 - 9 + 1, None, PAD)  # 512 positions


def test_restores_training_mode(models):
    model = models["gpt2_tiny", "lora"]
    model.train()
    try:
        ids, mask = padded(prompts(), left=True)
        out = greedy_decode(model, ids, mask, NEW, None, PAD)
        assert model.training
        assert out.tolist() == greedy_decode(model, ids, mask, NEW, None, PAD).tolist()  # no dropout inside
    finally:
        model.eval()


def test_decode_texts_order_and_eos(models):
    model = models["gpt2_tiny", "prefix"]
    _, tok = load_base_model(named_model("gpt2_tiny"))
    texts = ["a b c d e f g h", "hello", "the cat sat on", "x y", "one two three four five six"]
    ids = [tok(t)["input_ids"] for t in texts]
    refs = [reference(model, torch.tensor(i), NEW) for i in ids]
    # Make EOS the first token one prompt generates: its text is empty, the others stop at that token too.
    tok.eos_token = tok.convert_ids_to_tokens(refs[3][0])
    eos = tok.eos_token_id
    want = [tok.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True).strip() for r in refs]
    got = decode_texts(model, tok, texts, max_new_tokens=NEW, batch_size=2, max_length=64)
    assert got == want and got[3] == ""
    assert sum(bool(w) for w in want) >= 3  # the texts are not all empty
    # max_length keeps a prompt's end: the last 2 tokens of a long prompt decode as that 2-token prompt.
    short = decode_texts(model, tok, [texts[4], tok.decode(ids[4][-2:])], NEW, batch_size=2, max_length=2)
    assert short[0] == short[1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prefix", "lora"])
def test_per_row_budgets_share_one_prefill(models, references, arch, kind):
    """Row budgets 0, 2 and NEW: the budget-0 row is read from the prefill alone (its next-token logits are
    the full forward's), the others decode their own number of tokens, each equal to decoding alone."""
    model = models[arch, kind]
    rows = prompts()
    ids, mask = padded(rows, left=False)
    first, out = prefill_then_greedy(model, ids, mask, [0, 2, NEW], eos_token_id=None, pad_token_id=PAD)
    assert out.shape == (3, NEW)
    assert out[0].tolist() == [PAD] * NEW
    assert out[1].tolist() == references[arch, kind][1][:2] + [PAD] * (NEW - 2)
    assert out[2].tolist() == references[arch, kind][2]
    with torch.inference_mode():
        alone = model(input_ids=rows[0][None], use_cache=False).logits[0, -1]
    torch.testing.assert_close(first[0], alone, rtol=1e-4, atol=1e-4)
    assert int(first[0].argmax()) == references[arch, kind][0][0]
    _, none = prefill_then_greedy(model, ids, mask, [0, 0, 0], eos_token_id=None, pad_token_id=PAD)
    assert none.shape == (3, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_sample_depends_on_its_seed_and_prompt_alone(models, references, arch):
    """Sampled decoding: the same tokens whatever the batch width (rows leave a batch as they end, and
    a batch's rows change with its width), other tokens under another seed, and greedy's tokens where the
    temperature leaves one token all the mass."""
    model = models[arch, "prefix"]
    rows = [r.tolist() for r in prompts()] * 3  # repeated prompts must still draw apart
    sample = {width: decode_ids(model, rows, NEW, None, PAD, width, temperature=3.0, seed=7) for width in (1, 4, 9)}
    assert sample[1] == sample[4] == sample[9]
    assert sample[1][:3] != sample[1][3:6]
    assert decode_ids(model, rows, NEW, None, PAD, 9, temperature=3.0, seed=8) != sample[9]
    assert decode_ids(model, rows[:3], NEW, None, PAD, 3, temperature=1e-4, seed=7) == references[arch, "prefix"]
