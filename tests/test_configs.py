"""Every config group composes; each schema rejects bad values with a message naming the field."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from feta.adapters import LoraSpec, PrefixSpec, build_adapter, trainable_parameters
from feta.data.spec import SST2_INSTRUCTION
from feta.models import ModelSpec, load_base_model
from feta.schema import to_spec
from tests.conftest import ROOT, compose_cfg

GROUPS = ["adapter", "model", "data", "trainer", "logger", "experiment", "debug", "table_point"]


# Options whose required values (???) the user supplies.
REQUIRED = {("data", "csv"): ["data.train_file=t.csv", "data.validation_file=v.csv", "data.prompt='{text}:'",
                              "data.classes=[a,b]", "data.verbalizers=[' x',' y']"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_cfg("train", [f"+{group}={option}" if group == "table_point" else f"{group}={option}",
                                *REQUIRED.get((group, option), [])])
    # Building the dataclasses runs every __post_init__ check.
    for key in ("model", "data", "adapter"):
        assert type(to_spec(cfg, key)).__name__.endswith("Spec")
    if group in ("adapter", "model", "data", "logger", "trainer"):
        assert cfg[group] is not None


def test_presets_set_what_they_promise():
    quick = compose_cfg("train", ["experiment=quickstart"], hydra=True)
    assert quick.model.name == "smollm2" and quick.data.train_limit == 1920
    assert quick.hydra.sweeper.params.adapter == "prefix,lora"
    table = compose_cfg("train", ["experiment=feta_table"], hydra=True)
    assert table.model.path == "gpt2" and table.trainer.max_epochs == 3 and table.data.batch_size == 16
    assert len(table.hydra.sweeper.params["+table_point"].split(",")) == 6


@pytest.mark.parametrize("option", options("adapter"))
def test_adapter_spec_to_peft_to_forward(option, tiny_model):
    cfg = compose_cfg("train", [f"adapter={option}", "model=gpt2_tiny"])
    spec = to_spec(cfg, "adapter")
    model, tok = tiny_model
    peft_model = build_adapter(model, tok, spec, "gpt2", "gpt2_tiny")
    n_peft, _ = peft_model.get_nb_trainable_parameters()
    assert trainable_parameters(peft_model) == n_peft > 0
    out = peft_model(input_ids=torch.tensor([[15496, 995, 11]])).logits
    n_virtual = spec.m if spec.kind == "prompt" else 0  # a soft prompt is prepended to the sequence
    assert out.shape == (1, n_virtual + 3, len(tok)) and torch.isfinite(out).all()


@pytest.fixture
def tiny_model():
    cfg = compose_cfg("train", ["model=gpt2_tiny"])
    return load_base_model(to_spec(cfg, "model"))


@pytest.mark.parametrize(
    "override,exc,match",
    [
        ("adapter.m=0", ValueError, r"adapter\.m: must be a positive int.*got 0"),
        ("adapter.init=bogus", ValueError, r"adapter\.init: unknown choice 'bogus'; use one of text, random, zero"),
        ("adapter.projection=true", ValueError, r"adapter\.projection=true: cannot start from text"),
        ("data.max_length=0", ValueError, r"data\.max_length: must be a positive int, got 0"),
        ("data.prompt=no_slot", ValueError, r"data\.prompt: 'no_slot' names no column"),
        ("model.source=ftp", ValueError, r"model\.source: unknown choice 'ftp'; use one of hub, local, random, gguf"),
    ],
)
def test_bad_values_name_the_field(override, exc, match):
    cfg = compose_cfg("train", [override])
    section = override.split(".")[0]
    with pytest.raises(exc, match=match):
        to_spec(cfg, section)


def test_lora_rank_checked():
    cfg = compose_cfg("train", ["adapter=lora", "adapter.r=-1"])
    with pytest.raises(ValueError, match=r"adapter\.r: must be a positive int \(LoRA rank\), got -1"):
        to_spec(cfg, "adapter")


def test_unknown_adapter_lists_the_options():
    with pytest.raises(MissingConfigException, match=r"Could not find 'adapter/bogus'[\s\S]*Available options in 'adapter':[\s\S]*lora[\s\S]*prefix"):
        compose_cfg("train", ["adapter=bogus"])


def test_typo_in_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'adapter\.mm'"):
        compose_cfg("train", ["adapter.mm=8"])
    # An explicit append composes, but building the spec refuses the unknown key.
    cfg = compose_cfg("train", ["+adapter.mm=8"])
    with pytest.raises(ValueError, match=r"adapter\.mm: is not a setting of PrefixSpec; known: .*\bm\b"):
        to_spec(cfg, "adapter")


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train", ["adapter.m=eight"])
    assert isinstance(err.value.__cause__, ValidationError)


def test_lora_targets_checked_against_the_model(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match=r"adapter\.targets=\['q_proj'\]: not in gpt2_tiny; available: .*c_attn"):
        build_adapter(model, tok, LoraSpec(targets=["q_proj"]), "gpt2", "gpt2_tiny")


@pytest.mark.parametrize("data", ["sst2", "agnews", "e2e", "snli"])
@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_text_init_starts_from_the_tasks_instruction(data, adapter):
    cfg = compose_cfg("train", [f"data={data}", f"adapter={adapter}"])
    instruction = to_spec(cfg, "data").instruction
    assert to_spec(cfg, "adapter").init_text == instruction and len(instruction.split()) >= 16
    assert (data == "sst2") == (instruction == SST2_INSTRUCTION)  # each task has its own words


def test_text_init_without_an_instruction_names_it():
    with pytest.raises(ValueError, match=r"adapter\.init=text: .*data\.instruction"):
        to_spec(compose_cfg("train", ["data.instruction=null"]), "adapter")
    assert to_spec(compose_cfg("train", ["data.instruction=null", "adapter=lora"]), "adapter").r == 4


def test_prefix_init_text_must_cover_m(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match=r"adapter\.init_text: has 2 tokens but adapter\.m=16"):
        build_adapter(model, tok, PrefixSpec(m=16, init_text="hello world"), "gpt2", "gpt2_tiny")


def test_prefix_plus_length_within_positions(tiny_model):
    model, tok = tiny_model  # gpt2_tiny has 512 positions
    with pytest.raises(ValueError, match=r"adapter\.m \+ data\.max_length: 400 \+ 128 > 512"):
        build_adapter(model, tok, PrefixSpec(m=400, init="random"), "gpt2", "gpt2_tiny", max_length=128)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"model\.path={missing}: no such directory"):
        load_base_model(ModelSpec(name="x", source="local", path=str(missing)))
    with pytest.raises(ValueError, match=r"model\.path=.*: SmolLM2.*not found there"):
        load_base_model(ModelSpec(name="x", source="gguf", path=str(tmp_path), gguf_file="SmolLM2.gguf"))
