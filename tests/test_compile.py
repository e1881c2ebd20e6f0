"""compile.py on trained gpt2_tiny / llama_tiny runs: ranks, reloading and merging, bad settings,
kept results, and the distill methods."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compile import compile_prefix
from feta import runs
from feta.adapters import compiled_lora_config
from feta.compile.pipeline import layer_residuals
from feta.compile.spec import CompileSpec
from feta.compile.distill import DistillModule
from feta.models import load_base_model
from tests.conftest import compile_cfg, tiny_train_cfg
from tests.helpers.sources import tiny_prefix_source
from train import train


def test_residual_falls_with_rank(prefix_run):
    res, fit = {}, {}
    for r in (1, 4, 64):  # gpt2_tiny: d = 64, so 64 is full rank
        rec = compile_prefix(compile_cfg(prefix_run, f"rank={r}"))
        res[r] = rec["residual_content_mean"]  # held-out validation sentences
        fit[r] = [v["fit_residual"] for v in rec["fit_stats"]["modules"].values()]  # calibration tokens, per layer
        assert len(rec["residuals"]["last"]) == 2 and all(0 <= v < 10 for v in rec["residuals"]["last"])
    assert res[1] > res[4] > res[64], res
    # On calibration data (~1,000 tokens > d = 64, so not vacuous) a larger rank must fit clearly better.
    assert all(f1 > f4 > f64 for f1, f4, f64 in zip(fit[1], fit[4], fit[64])), fit
    assert all(f64 < 0.9 * f1 for f1, f64 in zip(fit[1], fit[64])), fit


def test_adapter_reloads_with_plain_peft_and_merges_exactly(prefix_run, tmp_path):
    out = tmp_path / "c"
    rec = compile_prefix(compile_cfg(prefix_run, "rank=4", "merge=true", f"out_dir={out}"))
    assert (out / "adapter/adapter_model.safetensors").is_file() and (out / "compile.json").is_file()
    assert rec["merge"]["max_abs_logit_diff"] < 1e-4
    cfg = runs.load_run_config(prefix_run)
    model_spec, _, _ = runs.run_specs(cfg)
    base, tok = load_base_model(model_spec)
    ids = torch.tensor([tok("Review: what a film\nSentiment:")["input_ids"]])
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        with peft_model.disable_adapter():
            c = peft_model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the compiled adapter does something


@pytest.mark.parametrize("target", ["o", "o+mlp"])
def test_llama_bias_compile_reloads_and_merges(llama_prefix_run, tmp_path, target):
    """Llama has no biases: the merged model gains zero biases where a lora_bias lands (attention,
    and the MLP for target=o+mlp) and must load back with plain transformers, logits unchanged."""
    run = llama_prefix_run
    out = tmp_path / "cb"
    rec = compile_prefix(compile_cfg(run, "rank=2", f"target={target}", "merge=true", f"out_dir={out}"))
    assert rec["bias"] is True  # the closed form's default
    assert rec["merge"]["max_abs_logit_diff"] < 1e-4
    model_spec, _, _ = runs.run_specs(runs.load_run_config(run))
    base, tok = load_base_model(model_spec)
    ids = torch.tensor([tok("Review: what a film\nSentiment:")["input_ids"]])
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert peft_model.peft_config["default"].lora_bias
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert merged.config.attention_bias and merged.model.layers[0].self_attn.o_proj.bias.abs().max() > 0
    assert merged.config.mlp_bias == (target == "o+mlp")
    if target == "o+mlp":
        assert merged.model.layers[0].mlp.down_proj.bias.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (["rank=0", "bias=false"], ValueError, r"rank=0 with bias=false leaves nothing to fit"),
        (["rank=-2"], ValueError, r"rank: must be an int >= 0"),
        (["rank=65"], ValueError, r"rank=65 exceeds the width of o \(64\)"),
        (["method=distill", "bias=true"], ValueError, r"bias=true is a closed-form option"),
        (["base_model=gpt2"], ValueError, r"base_model=gpt2: but the prefix .* was trained on gpt2_tiny"),
        (["merge_dtype=int8"], ValueError, r"merge_dtype: unknown dtype 'int8'; use one of float32"),
        (["target=q", "method=distill"], ValueError, r"target: q: q is not a module kind of gpt2; use qkv, o, mlp"),
        (["target=zz"], ValueError, r"target: unknown or repeated module kind 'zz'"),
        (["target=o+qkv"], ValueError, r"target: o\+qkv needs method=distill or lstsq\+distill: the closed form fits only"),
        (["target=qkv", "method=lstsq+distill"], ValueError, r"lstsq\+distill needs one of o, mlp in the target"),
        (["distill_steps=0", "method=distill"], ValueError, r"distill_steps: must be a positive int"),
        (["method=foo"], ValueError, r"method: unknown choice 'foo'; use one of sink, lstsq, distill, lstsq\+distill"),
        (["target=o+o"], ValueError, r"target: unknown or repeated module kind 'o'"),
    ],
)
def test_bad_settings_write_nothing(prefix_run, tmp_path, overrides, exc, match):
    before = sorted(p.name for p in prefix_run.iterdir())
    with pytest.raises(exc, match=match):
        compile_prefix(compile_cfg(prefix_run, *overrides, f"out_dir={tmp_path / 'out'}"))
    assert sorted(p.name for p in prefix_run.iterdir()) == before and not (tmp_path / "out").exists()


def test_lora_run_missing_and_corrupt_checkpoints(tmp_path):
    lora = tiny_train_cfg(tmp_path / "l", "adapter=lora")
    train(lora)
    with pytest.raises(ValueError, match=r"is a lora run; compile turns a token adaptation \(prefix, prompt, gated_prefix\) into LoRA"):
        compile_prefix(compile_cfg(lora.output_dir))
    with pytest.raises(ValueError, match=r"no such directory"):
        compile_prefix(compile_cfg(tmp_path / "nope"))
    prefix = tiny_train_cfg(tmp_path / "p", "adapter.init=random")
    train(prefix)
    weights = Path(prefix.output_dir) / "adapter/adapter_model.safetensors"
    weights.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: is corrupt"):
        compile_prefix(compile_cfg(prefix.output_dir))


def test_existing_result_is_kept_unless_overwrite(prefix_run, tmp_path):
    out = tmp_path / "keep"
    compile_prefix(compile_cfg(prefix_run, "rank=2", f"out_dir={out}"))
    stamp = (out / "compile.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"exists; pass overwrite=true"):
        compile_prefix(compile_cfg(prefix_run, "rank=2", f"out_dir={out}"))
    assert (out / "compile.json").stat().st_mtime_ns == stamp
    rec = compile_prefix(compile_cfg(prefix_run, "rank=3", f"out_dir={out}", "overwrite=true"))
    assert json.loads((out / "compile.json").read_text())["rank"] == 3 == rec["rank"]


# ------------------------------------------------------------------ distillation


def test_distill_layers_loss_is_the_squared_residual_and_zero_at_the_teacher():
    """distill_hidden=layers: per layer ‖h_student − h_prefix‖² / ‖h_prefix − h_base‖², the mean of that
    at content tokens and (weighted last_weight) at the classified token, averaged over layers: the
    residuals compile.json reports (layer_residuals), squared. A student that is still the base model
    scores exactly 1, the teacher itself 0."""

    base, source, batch = tiny_prefix_source()
    names = [f"transformer.h.{i}.attn.c_proj" for i in range(2)]
    student = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, names, False, "gpt2")).eval()  # B = 0
    logged = {}
    for teacher, expected in ((source, 1.0), (student, 0.0)):
        module = DistillModule(student, teacher, [[0], [1]], lr=1e-3, hidden="layers")
        module.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
        with torch.no_grad():
            module.training_step(batch, 0)
        assert abs(logged["distill/mse"] - expected) < 1e-5, logged
    assert logged["distill/kl"] < 1e-6
    torch.manual_seed(1)
    for name in names:  # a student part-way: LoRA B off zero
        torch.nn.init.normal_(student.get_submodule(f"base_model.model.{name}").lora_B["default"].weight, std=0.05)
    res = layer_residuals(base, source, student, [batch], sink_ratio=6.0)
    seen = []
    for w in (1.0, 5.0):  # last_weight: the classified token's weight against all content tokens
        expected = sum((c**2 + w * t**2) / (1 + w) for c, t in zip(res["content"], res["last"])) / len(res["last"])
        module = DistillModule(student, source, [[0], [1]], lr=1e-3, hidden="layers", last_weight=w)
        module.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
        with torch.no_grad():
            module.training_step(batch, 0)
        # measured: within 1e-7 of expected (float32); the two weightings differ by 4.6e-4 relative on gpt2_tiny
        assert 0.05 < expected and abs(logged["distill/mse"] - expected) < 1e-5 * expected, (w, logged, res)
        seen.append(expected)
    assert abs(seen[0] - seen[1]) > 1e-4 * seen[0]  # the two weightings are told apart (10x the tolerance above)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_distill_schedule_ends_at_zero_only_when_cosine(schedule):
    base, _, _ = tiny_prefix_source()
    student = get_peft_model(copy.deepcopy(base), compiled_lora_config(2, ["transformer.h.0.attn.c_proj"], False, "gpt2"))
    conf = DistillModule(student, base, [[0], [1]], lr=3e-4, schedule=schedule, steps=10).configure_optimizers()
    opt, sched = (conf["optimizer"], conf["lr_scheduler"]["scheduler"]) if isinstance(conf, dict) else (conf, None)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    assert lrs[0] == 3e-4
    if schedule == "cosine":
        assert opt.param_groups[0]["lr"] < 1e-12 and all(a > b for a, b in zip(lrs, lrs[1:]))
    else:
        assert lrs == [3e-4] * 10


@pytest.mark.parametrize("target", ["v", "q+k+v+o"])
def test_distill_fits_attention_targets_the_closed_form_cannot(llama_prefix_run, target):
    rec = compile_prefix(compile_cfg(llama_prefix_run, "rank=2", "method=distill", f"target={target}", "distill_steps=6",
                                     "distill_lr=1e-3", "distill_hidden=layers"))
    assert (llama_prefix_run / f"compiled-r2-distill-{target.replace('+', '_')}" / "adapter").is_dir()
    kinds = {name.rsplit(".", 1)[-1] for name in rec["target_modules"]}
    assert kinds == {f"{k}_proj" for k in target.split("+")} and len(rec["target_modules"]) == 2 * len(kinds)
    assert rec["fit_stats"]["distill"]["steps"] == 6
    assert rec["residual_content_mean"] < 1.0, rec["residuals"]  # moved from the base model toward the prefix


def test_faithful_preset_sets_the_measured_recipe_and_runs_on_llama(llama_prefix_run, tmp_path):
    """preset=faithful is the README's most faithful r=4 row, setting for setting; it compiles end to end."""
    cfg = compile_cfg(llama_prefix_run, "preset=faithful")
    spec = CompileSpec(**{k: cfg[k] for k in CompileSpec.__dataclass_fields__})
    assert (spec.rank, spec.method, spec.target, spec.bias, spec.last_weight) == (4, "lstsq+distill", "q+k+v+o", True, 3.0)
    assert (spec.distill_steps, spec.distill_lr, spec.distill_schedule, spec.distill_hidden) == (300, 3e-4, "cosine", "layers")
    rec = compile_prefix(compile_cfg(llama_prefix_run, "preset=faithful", "rank=2", "distill_steps=3",
                                     f"out_dir={tmp_path / 'f'}"))
    assert rec["fit_stats"]["distill"]["steps"] == 3 and len(rec["target_modules"]) == 8  # 2 layers x q, k, v, o
    assert rec["residual_last_mean"] < 1.0


def test_lstsq_distill_starts_o_in_closed_form_and_trains_v_from_zero(llama_prefix_run, tmp_path):
    """lstsq+distill with target=v+o: the closed form fits only the o_proj LoRAs (v_proj has no
    per-token closed form); distillation then moves v_proj off PEFT's zero start."""

    out = tmp_path / "vo"
    common = ("rank=2", "target=v+o", "method=lstsq+distill", "distill_hidden=layers", "distill_lr=1e-3")
    rec = compile_prefix(compile_cfg(llama_prefix_run, *common, "distill_steps=4", "merge=true", f"out_dir={out}"))
    assert {n.rsplit(".", 1)[-1] for n in rec["fit_stats"]["modules"]} == {"o_proj"}
    assert {n.rsplit(".", 1)[-1] for n in rec["target_modules"]} == {"v_proj", "o_proj"}
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    v_B = [w for k, w in weights.items() if "v_proj.lora_B" in k and k.endswith("weight")]
    assert len(v_B) == 2 and all(w.abs().max() > 0 for w in v_B)  # distillation moved them off zero
    assert rec["bias"] is True and rec["merge"]["max_abs_logit_diff"] < 1e-4  # v_proj's lora_bias merges too
