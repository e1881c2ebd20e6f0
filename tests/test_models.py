"""GGUF loading: the file is dequantized once into a cached safetensors copy that loads like any checkpoint."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer

from feta import models
from feta.models import ModelSpec, dequantize_gguf, dequantized_dir, load_base_model

TEXTS = ["the cat sat on the mat", "hello there"]


def write_tiny_gguf(path: Path, seed: int, layers: int = 2, d: int = 32, heads: int = 4, kv: int = 2,
                    ffn: int = 64) -> None:
    """A random Llama in GGUF, as llama.cpp lays it out, with a byte-level BPE vocabulary of 260 tokens."""
    rng = np.random.default_rng(seed)
    tokens = sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: a control token
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    hd = d // heads
    shapes = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,), "output.weight": (len(tokens), d)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv * hd, d),
                       f"blk.{i}.attn_v.weight": (kv * hd, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (ffn, d), f"blk.{i}.ffn_up.weight": (ffn, d),
                       f"blk.{i}.ffn_down.weight": (d, ffn)})
    for name, shape in shapes.items():
        w.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    monkeypatch.setenv("FETA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "gguf").mkdir()
    write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf", seed=0)
    return ModelSpec(name="tiny_gguf", source="gguf", path=str(tmp_path / "gguf"), gguf_file="tiny.gguf", arch="llama")


def gguf_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    """Logits of the model transformers dequantizes straight from the GGUF file."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, -1] for t in texts])


def cached_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, -1] for t in texts])


def test_cached_copy_is_a_plain_checkpoint_with_the_gguf_logits(tiny_gguf: ModelSpec) -> None:
    folder = dequantize_gguf(tiny_gguf)
    gguf_folder = Path(tiny_gguf.path)
    assert folder == dequantized_dir(tiny_gguf, gguf_folder / "tiny.gguf")
    assert folder.parent.parent == models.cache_dir() / "dequantized" and folder.name == "tiny-float32"
    assert {"model.safetensors", "config.json", "tokenizer.json", models.DEQUANTIZED_FROM} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dir left beside it
    assert "quantization_config" not in (folder / "config.json").read_text()
    direct = gguf_logits(gguf_folder, TEXTS)
    assert torch.equal(cached_logits(folder, TEXTS), direct)

    model, tokenizer = load_base_model(tiny_gguf)
    assert not getattr(model, "is_quantized", False)
    enc = tokenizer(TEXTS[:1], return_tensors="pt")
    assert enc["input_ids"].tolist() == AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file="tiny.gguf")(
        TEXTS[:1])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(**enc).logits[0, -1], direct[0])


def test_cached_copy_is_reused_until_the_gguf_file_changes(tiny_gguf: ModelSpec) -> None:
    folder = dequantize_gguf(tiny_gguf)
    weights = folder / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert dequantize_gguf(tiny_gguf) == folder and weights.stat().st_mtime_ns == built

    before = cached_logits(folder, TEXTS)
    write_tiny_gguf(Path(tiny_gguf.path) / "tiny.gguf", seed=1)  # the same name, other weights
    assert dequantize_gguf(tiny_gguf) == folder
    after = cached_logits(folder, TEXTS)
    assert not torch.allclose(after, before)
    assert torch.equal(after, gguf_logits(Path(tiny_gguf.path), TEXTS))


def test_each_dtype_and_source_folder_has_its_own_copy(tiny_gguf: ModelSpec, tmp_path: Path) -> None:
    gguf_file = Path(tiny_gguf.path) / "tiny.gguf"
    half = ModelSpec(**{**vars(tiny_gguf), "dtype": "bfloat16"})
    assert dequantized_dir(half, gguf_file).name == "tiny-bfloat16"
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert dequantized_dir(tiny_gguf, elsewhere / "tiny.gguf") != dequantized_dir(tiny_gguf, gguf_file)
    packaged = ModelSpec(name="p", source="gguf", gguf_file="tiny.gguf", pypi_package="llm-tiny==1.0", arch="llama")
    assert dequantized_dir(packaged, gguf_file) == models.cache_dir() / "dequantized" / "llm-tiny==1.0" / "tiny-float32"
    folder = dequantize_gguf(half)
    assert next(AutoModelForCausalLM.from_pretrained(str(folder)).parameters()).dtype == torch.bfloat16
