"""feta.latency on a tiny random GPT-2: the numbers, the ratios, and the decode path's correctness."""

from __future__ import annotations

import math

import pytest
import torch

from feta.adapters import LoraSpec, PrefixSpec, build_adapter
from feta.latency import Decoder, Setting, batch_of, compare, frozen, measure
from feta.models import load_base_model, named_model

SPEC = named_model("gpt2_tiny")
# One thread: the test machine is shared, and a 2-thread OpenMP region stalls whenever another job holds
# a core (measured 3x slower and erratic); a single thread only loses time slices.
THREADS = 1
ROW_FIELDS = {"name", "phase", "batch", "us_per_token", "iqr_us", "ratio_to_base", "ratio_iqr", "context"}


def fresh():
    return load_base_model(SPEC)


def lora_model(r: int = 4):
    model, tok = fresh()
    peft_model = build_adapter(model, tok, LoraSpec(r=r), "gpt2")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero: a LoRA that changes nothing would prove nothing
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model.eval()


def prefix_model(m: int):
    model, tok = fresh()
    return build_adapter(model, tok, PrefixSpec(m=m, init="random"), "gpt2").eval()


def prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50000, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- (a) the rows and their numbers ------------------------------------------------------------


def test_compare_rows_and_self_ratio():
    base, _ = fresh()
    # Batch-32 prefill rather than a small batch: runs of a few ms swung the self-ratio to 0.66-1.33
    # at load 7 on 2 cores, while these settings stayed within 0.96-1.11.
    rows = compare(base, {"self": base}, prompt(1, 8), settings=(Setting("prefill", 32), Setting("decode", 1)),
                   decode_tokens=4, repeats=3, min_run_time=0.15, num_threads=THREADS)
    assert [(r["name"], r["phase"], r["batch"]) for r in rows] == [
        ("base", "prefill", 32), ("self", "prefill", 32), ("base", "decode", 1), ("self", "decode", 1)]
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        for key in ("us_per_token", "iqr_us", "ratio_to_base", "ratio_iqr"):
            assert math.isfinite(row[key]), (key, row)
        assert row["us_per_token"] > 0 and row["iqr_us"] >= 0 and row["n_blocks"] >= 3
        assert row["context"]["device"] == "cpu" and row["context"]["dtype"] == "float32"
        assert row["context"]["threads"] == THREADS
    assert [r["ratio_to_base"] for r in rows if r["name"] == "base"] == [1.0, 1.0]
    # The same model against itself: only noise separates it from 1.
    for row in rows[1::2]:
        assert 0.5 < row["ratio_to_base"] < 2.0, row  # wide: a test run may share the cores with other jobs
    # Decoding one token costs a whole forward; prefill shares it among the 32x8 prompt tokens.
    assert rows[2]["us_per_token"] > 2 * rows[0]["us_per_token"]


def test_measure_fields_and_base_in_eval_mode():
    base, _ = fresh()
    base.train()
    result = measure(base, prompt(2, 8), decode_tokens=3, min_run_time=0.05, num_threads=THREADS)
    assert not base.training  # dropout would make the timed forward a different computation
    for key in ("prefill_us_per_token", "prefill_iqr_us", "decode_us_per_token", "decode_iqr_us"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["prefill_us_per_token"] > 0 and result["decode_us_per_token"] > result["prefill_us_per_token"]
    assert (result["batch"], result["prompt_len"], result["decode_tokens"]) == (2, 8, 3)
    assert all(p.requires_grad for p in base.parameters())  # frozen only while timing


def test_frozen_restores_flags():
    """`frozen` (same kernels for every model while timing) must hand the models back unchanged."""
    base, _ = fresh()
    adapter = lora_model()
    flags = [p.requires_grad for p in adapter.parameters()]
    assert any(flags) and not all(flags)
    with frozen(base, adapter):
        assert not any(p.requires_grad for p in [*base.parameters(), *adapter.parameters()])
    assert [p.requires_grad for p in adapter.parameters()] == flags
    assert all(p.requires_grad for p in base.parameters())


# --- (b) the timed decode path computes the right thing -----------------------------------------


def full_forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of one non-cached forward (a prefix model's PEFT forward adds the prefix)."""
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["base", "lora", "prefix"])
def test_decode_equals_full_forward(kind):
    model = {"base": lambda: fresh()[0], "lora": lora_model, "prefix": lambda: prefix_model(16)}[kind]()
    ids, n = prompt(2, 8, seed=1), 6
    decoder = Decoder(model, ids, n)
    assert decoder.prefill_len == 8 + (16 if kind == "prefix" else 0)  # the prefix is in the cache
    tokens, logits = decoder(return_logits=True)
    assert tokens.shape == (2, n) and logits.shape[:2] == (2, n)

    # Teacher-force the greedy sequence through a cache-free forward: same logits at every step.
    seq = torch.cat([ids, decoder.first_token, tokens[:, :-1]], dim=1)
    ref = full_forward_logits(model, seq)
    torch.testing.assert_close(decoder.prefill_logits, ref[:, 7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref[:, 8:], atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref[:, 8:].argmax(-1))

    # Timed runs replay the same decode: the cache is rewound, not grown.
    again, again_logits = decoder(return_logits=True)
    assert torch.equal(again, tokens) and torch.equal(again_logits, logits)
    assert decoder.cache.get_seq_length() == decoder.prefill_len + n


def test_prefix_changes_decode():
    """Guards the test above: with a prefix the decoded logits must differ from the base model's."""
    model = prefix_model(16)
    ids = prompt(2, 8, seed=1)
    _, with_prefix = Decoder(model, ids, 4)(return_logits=True)
    _, without = Decoder(model.get_base_model(), ids, 4)(return_logits=True)
    assert (with_prefix - without).abs().max() > 0.1


GENERATE_DROPS_PREFIX = pytest.mark.xfail(strict=False, reason=(
    "PEFT 0.21.2 + transformers 5.24: generate() of a prefix-tuning model drops the prefix. PEFT puts it in "
    "`past_key_values` while generate passes its own empty `cache`, which wins; the tokens then come from "
    "the base model at positions shifted by m. Decoder (full-forward-checked above) is the reference."))


@pytest.mark.parametrize("kind", ["base", "lora", pytest.param("prefix", marks=GENERATE_DROPS_PREFIX)])
def test_decode_equals_generate(kind):
    model = {"base": lambda: fresh()[0], "lora": lora_model, "prefix": lambda: prefix_model(16)}[kind]()
    ids, n = prompt(2, 8, seed=2), 5
    tokens = Decoder(model, ids, n)()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1,
                             min_new_tokens=n + 1, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 9:], tokens)


def test_batch_of_cycles_rows():
    ids = prompt(3, 5)
    assert torch.equal(batch_of(ids, 2), ids[:2])
    assert torch.equal(batch_of(ids, 7), torch.cat([ids, ids, ids[:1]]))


def test_decoder_rejects_too_long():
    with pytest.raises(ValueError, match="model positions"):
        Decoder(prefix_model(500), prompt(1, 8), 8)
