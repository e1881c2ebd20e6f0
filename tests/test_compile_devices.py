"""The compile in bfloat16 and on a CUDA device: the same code as the float32 CPU compile, with `dtype` and
`device` set. The CUDA cases are marked gpu and skipped without a device (tests/conftest.py); the bfloat16
cases run on the CPU too, so the reduced-precision path is tested everywhere."""

from __future__ import annotations

import math

import pytest
from peft import AdaptionPromptConfig, PromptEncoderConfig
from safetensors.torch import load_file

from compile import compile_prefix
from tests.conftest import compile_cfg
from tests.helpers.peft import build_adapter
from tests.helpers.runs import compile_peft

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lstsq", "sink"])
def test_bf16_fits_what_fp32_fits(llama_prefix_run, first_token_sink, tmp_path, method, device):
    """The layer-by-layer fit with bfloat16 forwards (statistics and solves in float64) against float32 on the
    CPU: the same modules and a compiled model as close to its prefix, on every measure. (The LoRA weights
    themselves move by up to ~25% on this tiny random model: bfloat16 rounds the targets, the difference of
    two nearly equal outputs, and the rank-2 truncation of a ridge fit turns that into other directions
    that the held-out measures do not see.)"""
    ref = compile_prefix(compile_cfg(llama_prefix_run, f"method={method}", "device=cpu", f"out_dir={tmp_path / 'ref'}"))
    low = compile_prefix(compile_cfg(llama_prefix_run, f"method={method}", f"device={device}", "dtype=bfloat16",
                                     f"out_dir={tmp_path / 'low'}"))
    assert low["device"].startswith(device) and low["dtype"] == "bfloat16" and ref["dtype"] == "float32"
    assert ("cuda_peak_gb" in low["memory"]) == (device == "cuda")
    a, b = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("ref", "low"))
    assert a.keys() == b.keys() and not all(a[k].equal(b[k].cpu()) for k in a)  # bfloat16 did run
    assert low["target_modules"] == ref["target_modules"]
    assert abs(low["residual_last_mean"] - ref["residual_last_mean"]) < 0.02, (low["residuals"], ref["residuals"])
    lo, hi = low["next_token"], ref["next_token"]
    assert abs(lo["next_token_kl"] - hi["next_token_kl"]) < 0.05 * hi["next_token_kl"] and hi["next_token_kl"] < 0.2 * hi["base_next_token_kl"]  # and far below the base's
    assert abs(lo["next_token_agreement"] - hi["next_token_agreement"]) <= 2 / hi["positions"]


@pytest.mark.parametrize("device", DEVICES)
def test_distillation_runs_in_bf16_mixed_precision(llama_prefix_run, tmp_path, device):
    rec = compile_prefix(compile_cfg(llama_prefix_run, "method=lstsq+distill", "target=v+o", "rank=2", "distill_steps=4",
                                     "distill_lr=1e-3", f"device={device}", "dtype=bfloat16", "merge=true",
                                     f"out_dir={tmp_path / 'd'}"))
    assert rec["fit_stats"]["distill"]["steps"] == 4 and rec["residual_last_mean"] < 1.0
    weights = load_file(str(tmp_path / "d/adapter/adapter_model.safetensors"))
    assert all(w.abs().max() > 0 for k, w in weights.items() if "v_proj.lora_B" in k and k.endswith("weight"))
    assert math.isfinite(rec["merge"]["max_abs_logit_diff"])


@pytest.mark.parametrize("kind", ["p_tuning", "adaption_prompt"])
def test_every_source_kind_compiles_in_bf16(work, tmp_path, kind):
    """The source's own modules (a P-tuning encoder, LLaMA-Adapter's prompts and gates) run in the model's
    bfloat16 too, and the compile is as near its source as in float32."""
    config, gate = {"p_tuning": (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                     encoder_hidden_size=32), None),
                    "adaption_prompt": (AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=8, adapter_layers=2),
                                        1.0)}[kind]
    adapter = build_adapter(work["llama_tiny"], config, tmp_path / kind, gate=gate)
    common = (f"calib_file={work['prompts']}", "calib_size=96", "calib_new_tokens=4")
    ref = compile_peft(adapter, *common, f"out_dir={tmp_path / 'ref'}")
    low = compile_peft(adapter, *common, "dtype=bfloat16", f"out_dir={tmp_path / 'low'}")
    assert low["dtype"] == "bfloat16" and ref["dtype"] == "float32"
    assert abs(low["next_token"]["next_token_kl"] - ref["next_token"]["next_token_kl"]) < 0.1 * ref["next_token"]["base_next_token_kl"]
    assert low["next_token"]["next_token_kl"] < 0.5 * low["next_token"]["base_next_token_kl"]
    assert low["own_outputs"]["prompts"] == ref["own_outputs"]["prompts"] > 0
