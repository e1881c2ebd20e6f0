"""compile.py on plain PEFT adapter directories: adapters built and saved with `peft` alone (no feta in the
building code) on the tiny random models, compiled from a prompt file or a task, measured by compile.json's
`next_token` numbers; and the bad inputs of this path, each refused as one named line with nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from peft import (AdaptionPromptConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig)
from transformers import AutoModelForCausalLM, AutoTokenizer

from feta.compile.source import resolve_source
from feta.compile.calibration import calibrate
from feta.compile.spec import CompileSpec
from feta.errors import UserError
from tests.conftest import ROOT
from tests.helpers.peft import N_PROMPTS, build_adapter, word_prompts
from tests.helpers.runs import compile_peft, tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, tok, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


# ------------------------------------------------------------------ compiled and measured


@pytest.mark.parametrize("model_name", ["llama_tiny", "gpt2_tiny"])
def test_prefix_compiles_to_a_lora_that_keeps_its_next_tokens(work, tmp_path, model_name):
    prompts = word_prompts(128, seed=1)
    adapter = build_adapter(work[model_name], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                            tmp_path / "prefix", steps=40, prompts=prompts)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    # PEFT keeps a prefix on grouped-query attention at the key/value heads (llama_tiny: 2 of 4 heads).
    assert (saved["num_attention_heads"], saved["token_dim"]) == ((2, 32) if model_name == "llama_tiny" else (4, 64))
    rec = compile_peft(adapter, f"calib_file={work['prompts']}", "merge=true")
    out = adapter / "compiled-r64"
    assert rec["source"] == {
        "kind": "peft", "peft_type": "PREFIX_TUNING", "compiled_as": "prefix", "adapter": str(adapter.resolve()),
        "base_model_name_or_path": str(work[model_name]), "model": model_name, "model_path": str(work[model_name]),
        "model_from": "local directory", "data": None, "calib_file": str(work["prompts"].resolve())}
    assert rec["task"] == "prompts" and rec["calibration"]["prompts"] == N_PROMPTS
    assert rec["calibration"]["held_out"] == 48 and rec["calibration"]["examples"] == 192
    nt = rec["next_token"]
    # Measured: llama_tiny agreement 1.000 vs base 0.000, kl 1.3e-4 vs base 2.5e-2;
    #           gpt2_tiny  agreement 1.000 vs base 0.000, kl 7.2e-4 vs base 2.4e-2.
    assert nt["positions"] == 48
    assert nt["next_token_agreement"] >= 0.8 and nt["next_token_agreement"] >= nt["base_next_token_agreement"] + 0.5, nt
    assert 0 <= nt["next_token_kl"] < 0.1 * nt["base_next_token_kl"], nt
    assert rec["residual_last_mean"] < 0.6 and rec["merge"]["max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "compile.json").read_text())["next_token"] == nt

    # A standard LoRA: plain PEFT loads it onto the plain base model, and the merged model equals it.
    tok = AutoTokenizer.from_pretrained(work[model_name])
    base = AutoModelForCausalLM.from_pretrained(work[model_name]).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work[model_name]), str(out / "adapter"))
    lora.eval()
    assert lora.active_peft_config.peft_type.value == "LORA"
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    texts = prompts[:4]
    torch.testing.assert_close(_logits(merged, tok, texts), _logits(lora, tok, texts), atol=1e-4, rtol=1e-5)
    assert (_logits(lora, tok, texts) - _logits(base, tok, texts)).abs().max() > 1e-3


def test_prompt_tuning_compiles_on_llama(work, tmp_path):
    adapter = build_adapter(work["llama_tiny"], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                            tmp_path / "prompt", steps=40, prompts=word_prompts(128, seed=1))
    rec = compile_peft(adapter, f"calib_file={work['prompts']}")
    assert rec["source"]["compiled_as"] == "prompt" and rec["source"]["peft_type"] == "PROMPT_TUNING"
    nt = rec["next_token"]
    # Measured: agreement 0.438 vs base 0.021, kl 7.9e-4 vs base 1.2e-2 (a soft prompt on a 2-layer random
    # model moves the flat next-token distributions less than a prefix, so top-1 is the noisier number).
    assert nt["positions"] == 48
    assert nt["next_token_agreement"] >= 0.35 and nt["next_token_agreement"] >= nt["base_next_token_agreement"] + 0.3, nt
    assert nt["next_token_kl"] < 0.2 * nt["base_next_token_kl"], nt
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work["llama_tiny"]),
                                     str(adapter / "compiled-r64/adapter"))
    assert lora.active_peft_config.peft_type.value == "LORA"


@pytest.mark.parametrize("kind", ["p_tuning", "adaption_prompt", "prefix_projection"])
def test_every_token_adaptation_loads_and_compiles(work, tmp_path, kind):
    """The other PEFT token adaptations, untrained (LLaMA-Adapter with its gates opened): each loads, maps
    to its feta kind, compiles, and its compiled model is nearer the adapter than the base model is."""
    config, compiled_as, gate = {
        "p_tuning": (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32), "prompt",
                     None),
        "adaption_prompt": (AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=8, adapter_layers=2),
                            "gated_prefix", 1.0),
        # PEFT saves the projection's output, the prefix itself; it loads back without the MLP.
        "prefix_projection": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True,
                                                 encoder_hidden_size=32), "prefix", None),
    }[kind]
    adapter = build_adapter(work["llama_tiny"], config, tmp_path / kind, gate=gate)
    rec = compile_peft(adapter, f"calib_file={work['prompts']}", "calib_size=96")
    assert rec["source"]["peft_type"] == config.peft_type.value and rec["source"]["compiled_as"] == compiled_as
    nt = rec["next_token"]
    assert nt["positions"] == 48 and rec["calibration"]["examples"] == 96
    assert nt["base_next_token_kl"] > 1e-4 and nt["next_token_kl"] < 0.5 * nt["base_next_token_kl"], nt
    assert nt["next_token_agreement"] >= nt["base_next_token_agreement"], nt


def test_a_task_calibrates_a_peft_adapter(work, tmp_path):
    adapter = build_adapter(work["llama_tiny"], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                            tmp_path / "prefix")
    rec = compile_peft(adapter, "data=sst2", "calib_size=96", "eval_size=16", "model=llama_tiny")
    assert rec["task"] == "classification" and rec["source"]["data"] == "sst2" and rec["source"]["calib_file"] is None
    assert rec["source"]["model_from"] == "model=llama_tiny"
    assert rec["calibration"]["examples"] == 96 and rec["next_token"]["positions"] == 16 == rec["eval_examples"]
    assert rec["next_token"]["next_token_kl"] < rec["next_token"]["base_next_token_kl"]


# ------------------------------------------------------------------ resolution, without loading a model


def _peft_dir(work, tmp_path: Path, name: str = "prefix", **edits) -> Path:
    adapter = build_adapter(work["llama_tiny"], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                            tmp_path / name)
    if edits:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))
    return adapter


def test_a_prompt_file_holds_out_a_seeded_fifth_and_scores_last_tokens(work, tmp_path):
    adapter = _peft_dir(work, tmp_path)
    tok = AutoTokenizer.from_pretrained(work["llama_tiny"])
    source = resolve_source(adapter, calib_file=str(work["prompts"]))
    assert len(source.prompts) == N_PROMPTS  # blank lines skipped
    cal = calibrate(source, tok, CompileSpec())
    assert cal.record == {"prompts": N_PROMPTS, "held_out": 48, "calibration": 192, "decode": "reference",
                          "scored_tokens": 192}  # each prompt alone, scored at its last token
    assert cal.held_out["scored"].sum(1).tolist() == [1] * 48
    last = cal.held_out["attention_mask"].sum(1) - 1
    assert cal.held_out["scored"][torch.arange(48), last].all()
    def texts(batch):
        return {tok.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])}

    held, fit = texts(cal.held_out), texts(cal.fit)
    assert not held & fit and len(held | fit) == len(set(source.prompts))
    capped = calibrate(source, tok, CompileSpec(eval_size=10, calib_size=50))
    assert {k: capped.record[k] for k in ("prompts", "held_out", "calibration")} == {
        "prompts": N_PROMPTS, "held_out": 10, "calibration": 50}
    reseeded = calibrate(source, tok, CompileSpec(calib_seed=1))
    # calib_seed never moves the held-out set
    assert torch.equal(reseeded.held_out["input_ids"], cal.held_out["input_ids"])
    assert not torch.equal(reseeded.fit["input_ids"], cal.fit["input_ids"])


def test_a_hub_id_resolves_from_the_cache_only(work, tmp_path, monkeypatch):
    """base_model_name_or_path as a hub id: found in the hub cache (loaded from its snapshot directory, so no
    network), refused when absent."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--feta-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(work["llama_tiny"], snapshot)
    (cache / "models--feta-test--tiny-llama" / "refs").mkdir()
    (cache / "models--feta-test--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    adapter = _peft_dir(work, tmp_path, base_model_name_or_path="feta-test/tiny-llama")
    source = resolve_source(adapter, calib_file=str(work["prompts"]))
    assert (source.model.source, Path(source.model.path), source.model.arch) == ("local", snapshot, "llama")
    assert source.description["model_from"] == "hub cache" and source.model.name == "tiny-llama"
    rec = compile_peft(adapter, f"calib_file={work['prompts']}", "calib_size=64", "out_dir=" + str(tmp_path / "c"))
    assert rec["source"]["model_from"] == "hub cache" and rec["next_token"]["positions"] == 48
    missing = _peft_dir(work, tmp_path, "absent", base_model_name_or_path="feta-test/not-downloaded")
    with pytest.raises(UserError, match=r"its base model 'feta-test/not-downloaded' is neither a local directory nor "
                                         r"in the hub cache .*; pass model=<name>"):
        resolve_source(missing, calib_file=str(work["prompts"]))


def test_a_feta_run_takes_no_peft_keys(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\nadapter: {}\ndata: {}\n")
    with pytest.raises(UserError, match=r"calib_file=p\.txt: applies to a plain PEFT adapter, and ckpt=.* is a feta "
                                        r"run; drop it"):
        resolve_source(tmp_path, calib_file="p.txt")


def test_a_weight_shape_mismatch_is_named_when_the_config_gives_no_sizes(work, tmp_path):
    """An adapter_config.json without sizes (hand-written, older PEFT): the saved weights' shape decides."""
    adapter = _peft_dir(work, tmp_path, num_layers=None, num_attention_heads=None, token_dim=None)
    with pytest.raises(UserError, match=r"adapter_model\.safetensors holds prompt_embeddings of shape \[8, 128\] but "
                                        r"model llama_tiny needs \[8, 256\]"):
        compile_peft(adapter, f"calib_file={work['prompts']}", "model=llama_tiny", "model.config.num_hidden_layers=4")
    assert not (adapter / "compiled-r64").exists()


# ------------------------------------------------------------------ bad input through the command


@pytest.fixture(scope="module")
def bad(work, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    paths = {"root": root, "prompts": work["prompts"]}
    paths["prefix"] = build_adapter(work["llama_tiny"], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                                    root / "prefix")
    paths["lora"] = build_adapter(work["llama_tiny"], LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                 target_modules=["q_proj", "v_proj"]), root / "lora")
    shutil.copytree(paths["prefix"], root / "notjson")
    (root / "notjson" / "adapter_config.json").write_text("{not json")
    (root / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    return paths


BAD = [
    ("lora", ("ckpt=<lora>", "calib_file=<prompts>"),
     r"ckpt=.*/lora: holds a LORA adapter, already weight-space; .*; merge it with PEFT's merge_and_unload"),
    ("other-model", ("ckpt=<prefix>", "calib_file=<prompts>", "model=llama_tiny", "model.config.num_hidden_layers=4"),
     r"ckpt=.*/prefix: adapter_config\.json has num_layers=2 but model llama_tiny has num_layers=4; pass model="),
    ("no-calibration", ("ckpt=<prefix>",),
     r"data: none given, and a plain PEFT adapter brings no data: a compile fits at fixed data; pass data=<name>"),
    ("empty-calib-file", ("ckpt=<prefix>", "calib_file=<root>/empty.txt"),
     r"calib_file=.*/empty\.txt: holds no prompts \(only blank lines\)"),
    ("missing-calib-file", ("ckpt=<prefix>", "calib_file=<root>/nope.txt"), r"calib_file=.*/nope\.txt: no such file"),
    ("config-not-json", ("ckpt=<root>/notjson", "calib_file=<prompts>"),
     r".*/notjson/adapter_config\.json: is not valid JSON"),
]


@pytest.mark.parametrize("args,error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_peft_input_is_one_named_line_and_writes_nothing(bad, tmp_path, args, error):
    marks = {f"<{k}>": str(v) for k, v in bad.items()}
    args = [re.sub("|".join(map(re.escape, marks)), lambda m: marks[m.group(0)], a) for a in args]
    before = tree(bad["root"], set())
    proc = subprocess.run([sys.executable, "compile.py", *args, f"hydra.run.dir={tmp_path / 'h'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 2 and "Traceback" not in shown, shown
    assert sum(line.startswith("error: ") for line in lines) == 1 and lines[-1].startswith("error: "), shown
    assert re.match(r"error: " + error, lines[-1]), lines[-1]
    assert tree(bad["root"], set()) == before, "a refused compile wrote or changed files"


def test_p_tuning_takes_the_sink_path_as_key_value_slots(work, tmp_path, first_token_sink):
    """A P-tuning adapter is a soft prompt whose embeddings an encoder computes: once computed, key/value
    slots in every layer, so method=sink applies (here with each sequence's first token as its sink) and
    writes the rank-1 sink edits, as for a prefix."""
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32)
    adapter = build_adapter(work["llama_tiny"], config, tmp_path / "pt")
    rec = compile_peft(adapter, f"calib_file={work['prompts']}", "calib_size=96", f"out_dir={tmp_path / 'c'}")
    assert rec["source"]["peft_type"] == "P_TUNING" and rec["method"] == "sink"
    assert "fallback" not in rec["fit_stats"]["sink"] and rec["fit_stats"]["sink"]["m"] == 8
    edits = [k for k in rec["fit_stats"]["modules"] if k.endswith("self_attn")]
    assert len(edits) == 2 and all(rec["fit_stats"]["modules"][k]["leak_max"] >= 0 for k in edits)
    nt = rec["next_token"]
    assert nt["next_token_kl"] < 0.5 * nt["base_next_token_kl"], nt
