"""What a compile does: `CompileSpec`, the schema of `conf/compile.yaml`'s compile settings, and which
modules a compiled LoRA can sit on in each architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


from feta.errors import UserError, check_positive

# Per architecture: module kind (a `target=` word) -> regex of layer i's module of that kind.
MODULE_PATTERNS = {
    "llama": {"q": r"layers\.(\d+)\.self_attn\.q_proj", "k": r"layers\.(\d+)\.self_attn\.k_proj",
              "v": r"layers\.(\d+)\.self_attn\.v_proj", "o": r"layers\.(\d+)\.self_attn\.o_proj",
              "mlp": r"layers\.(\d+)\.mlp\.down_proj"},
    "gpt2": {"qkv": r"h\.(\d+)\.attn\.c_attn", "o": r"h\.(\d+)\.attn\.c_proj", "mlp": r"h\.(\d+)\.mlp\.c_proj"},
}
MODULE_KINDS = ("q", "k", "v", "qkv", "o", "mlp", "none")
# The closed form fits a per-token linear map of the module's input, which o and the MLP's output
# projection are; a LoRA on q/k/v acts through the attention softmax and mixing, so only distill fits it.
CLOSED_FORM = ("o", "mlp")
# The attention module and MLP of layer i, whose outputs the fit matches (with PEFT's gated prefix the
# adapter's term is added outside o_proj, by a wrapper that takes the attention module's place).
LAYER = {"llama": r"layers\.(\d+)", "gpt2": r"h\.(\d+)"}  # decoder layer i
ATTENTION = {"llama": r"layers\.(\d+)\.self_attn", "gpt2": r"h\.(\d+)\.attn"}
MLP = {"llama": r"layers\.(\d+)\.mlp", "gpt2": r"h\.(\d+)\.mlp"}


DTYPES = ("float32", "float16", "bfloat16")


class Method(str, Enum):
    sink = "sink"  # the prefix merged into the attention sink's slot (k/v), then the closed form on `target`
    lstsq = "lstsq"  # the closed form on `target` alone, no gradient steps
    distill = "distill"  # gradient steps from PEFT's zero init
    lstsq_distill = "lstsq+distill"  # the closed form, then gradient steps
    # No sink+distill: after the sink fold every token's o_proj input carries the folded value; one optimizer
    # step took SmolLM2's E2E KL from 0.02 to >6 nats at any lr from 3e-4 to 3e-6 (docs/results/compile_methods.md).


class DistillData(str, Enum):
    train = "train"  # the task's training examples, teacher-forced on their references, against the source's forwards
    calibration = "calibration"  # the calibration set (with calib_decode's continuations), against the source's
    # top-k log-probabilities at every scored token, computed once


class CalibDecode(str, Enum):
    auto = "auto"  # sample for a single generation task, reference otherwise (see calibration.resolve_decode)
    reference = "reference"  # the data's own targets (a prompt file: the prompts alone)
    greedy = "greedy"  # the source's greedy continuations of the calibration prompts
    sample = "sample"  # its continuations sampled at calib_temperature
    mix = "mix"  # a seeded half of the prompts with their references, the other half sampled


class FitPositions(str, Enum):
    content = "content"  # every real token but the attention sinks
    all = "all"
    last = "last"  # the scored positions only


class Match(str, Enum):
    module = "module"  # the attention output
    stream = "stream"  # the residual stream after attention (also undoes earlier layers' error)


class DistillHidden(str, Enum):
    final = "final"  # the last layer's hidden states
    layers = "layers"  # every layer's, as the per-layer residual


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"  # decay to zero over distill_steps


def as_choice(key: str, value: object, choices: type[Enum]) -> Enum:
    """`value` as a member of `choices` (Hydra hands Enums over; plain Python callers may pass strings)."""
    try:
        return choices(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise UserError(key, f"unknown choice {value!r}", f"use one of {', '.join(c.value for c in choices)}") from None


@dataclass
class CompileSpec:
    """How a prefix is compiled. `__post_init__` checks values and fills `bias=None` per method."""

    rank: int = field(default=64, metadata={"help": "LoRA rank r of the compiled adapter (0 = bias only)."})
    # A str, not the Enum: OmegaConf converts Enums by member name, and "lstsq+distill" is no identifier.
    method: str = field(default=Method.sink.value, metadata={"help": "sink | lstsq | distill | lstsq+distill."})
    target: str = field(default="o", metadata={"help": "Module kinds the LoRA goes on, joined by +: o (attention "
                                                       "output projection), mlp (MLP output projection), q/k/v, qkv (GPT-2)."})
    bias: bool | None = field(default=None, metadata={"help": "Fit a per-module bias with the low-rank map "
                                                              "(lora_bias); null: yes for the closed form."})
    fit_positions: FitPositions = field(default=FitPositions.content, metadata={"help": "content (no sinks) | all | last."})
    match: Match = field(default=Match.module, metadata={"help": "module: the attention output | stream: the "
                                                                 "post-attention residual stream."})
    last_weight: float = field(default=1.0, metadata={"help": "Weight of the scored positions in the fit "
                                                              "(and in distill_hidden=layers)."})
    sink_ratio: float = field(default=6.0, metadata={"help": "A token is a sink if its norm > ratio x median."})
    ridge: float = field(default=1e-4, metadata={"help": "Ridge, relative to the mean eigenvalue of X^T X."})
    calib_size: int = field(default=512, metadata={"help": "Calibration examples (training split)."})
    calib_seed: int = field(default=0, metadata={"help": "Which seeded sample of calibration examples."})
    # null: calibration sequences are cut as evaluation cuts them, so their first token is the one evaluation
    # sees there (method=sink edits the first token's slot).
    calib_max_length: int | None = field(default=None, metadata={
        "help": "Truncate calibration sequences (tokens); null = the task's data.max_length (prompt files: 128)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present) | cpu | cuda | cuda:N."})
    dtype: str | None = field(default=None, metadata={
        "help": "The forwards' dtype: float32 | bfloat16 | float16; null = the model's (model.dtype). The fit's "
                "statistics and solves are float64 whatever it is."})
    memory_gb: float | None = field(default=None, metadata={
        "help": "Memory the compile may use on its device beside the model (GB); null = what is free. The "
                "calibration caches go to the CPU when they do not fit on an accelerator."})
    calib_decode: CalibDecode = field(default=CalibDecode.auto, metadata={
        "help": "What follows each calibration prompt (generation tasks, prompt files): auto | reference | greedy | "
                "sample | mix; greedy and sample are the source adapter's own continuations; auto = sample for a "
                "generation task, reference otherwise."})
    calib_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of calib_decode=sample|mix."})
    calib_new_tokens: int | None = field(default=None, metadata={
        "help": "Tokens a decoded continuation may take; null = the task's data.max_new_tokens (prompt files: 32)."})
    eval_size: int = field(default=128, metadata={"help": "Held-out validation examples for the residuals."})
    distill_steps: int = field(default=100, metadata={"help": "Gradient steps for the distill methods."})
    distill_lr: float = field(default=3e-4, metadata={"help": "Learning rate for distillation."})
    distill_batch_size: int = field(default=16, metadata={"help": "Batch size for distillation."})
    distill_schedule: Schedule = field(default=Schedule.constant, metadata={"help": "constant | cosine."})
    distill_hidden: DistillHidden = field(default=DistillHidden.final, metadata={"help": "final | layers."})
    distill_data: DistillData = field(default=DistillData.train, metadata={
        "help": "train: the task's training examples against the source's forwards | calibration: the calibration "
                "set against the source's top-k log-probabilities, cached once (on-policy with calib_decode=sample)."})
    distill_top_k: int = field(default=20, metadata={"help": "Tokens of the source's distribution cached per "
                                                              "position (distill_data=calibration)."})

    def __post_init__(self) -> None:
        for key, choices in (("method", Method), ("fit_positions", FitPositions), ("match", Match),
                             ("calib_decode", CalibDecode), ("distill_data", DistillData),
                             ("distill_schedule", Schedule), ("distill_hidden", DistillHidden)):
            setattr(self, key, as_choice(key, getattr(self, key), choices))
        kinds = self.target.split("+")
        unknown = [k for k in kinds if k not in MODULE_KINDS]
        if unknown or len(set(kinds)) != len(kinds):
            raise UserError("target", f"unknown or repeated module kind {(unknown or kinds)[0]!r} in {self.target!r}",
                            f"join module kinds from {', '.join(MODULE_KINDS)} with '+', each once (e.g. o or o+mlp)")
        if "none" in kinds and (not self.folds_sink or len(kinds) > 1):
            raise UserError("target", "none (no closed-form modules) goes only with method=sink, alone",
                            "use target=none with method=sink, or a module kind")
        if self.method in (Method.sink, Method.lstsq) and not set(kinds) <= {*CLOSED_FORM, "none"}:
            raise UserError("target", f"{self.target} needs method=distill or lstsq+distill: the closed form fits "
                            f"only per-token maps ({', '.join(CLOSED_FORM)})", "use target=o or a distill method")
        if self.method is Method.lstsq_distill and not set(kinds) & set(CLOSED_FORM):
            raise UserError("target", f"{self.target}: lstsq+distill needs one of {', '.join(CLOSED_FORM)} in the "
                            "target for the closed form to start from", "add o, or use method=distill")
        if self.bias is None:  # a bias costs nothing once merged and was worth +0.7 points at r=4 (docs/results)
            self.bias = self.method is not Method.distill
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise UserError("rank", f"must be an int >= 0 (LoRA rank; 0 = bias only), got {self.rank!r}", "e.g. rank=4")
        if self.rank == 0 and not self.bias:
            raise UserError("rank", "rank=0 with bias=false leaves nothing to fit", "set rank >= 1 or bias=true")
        if self.rank == 0 and self.method not in (Method.lstsq, Method.sink):
            raise UserError("rank", f"rank=0 (bias only) needs method=sink or lstsq, got method={self.method.value}",
                            "set rank >= 1")
        if self.bias and self.method is Method.distill:
            raise UserError("bias", "bias=true is a closed-form option", "use method=lstsq or lstsq+distill")
        for key in ("calib_size", "eval_size", "distill_batch_size", "distill_steps", "distill_top_k"):
            check_positive(key, getattr(self, key))
        check_positive("calib_max_length", self.calib_max_length, allow_none=True)
        check_positive("calib_new_tokens", self.calib_new_tokens, allow_none=True)
        for key in ("last_weight", "distill_lr", "calib_temperature"):
            check_positive(key, getattr(self, key), what="number")
        check_positive("memory_gb", self.memory_gb, allow_none=True, what="number")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise UserError("device", f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:<index>")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError("dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}, or null")
        if self.ridge < 0:
            raise UserError("ridge", f"must be >= 0, got {self.ridge}", "e.g. ridge=1e-4")
        if self.sink_ratio <= 1:
            raise UserError("sink_ratio", f"must be > 1 (a multiple of the median norm), got {self.sink_ratio}",
                            "e.g. sink_ratio=6")

    @property
    def folds_sink(self) -> bool:
        """The prefix is folded into the attention sink's slot first (method=sink)."""
        return self.method is Method.sink

    @property
    def closed_form(self) -> bool:
        """The closed form runs (every method but distill from PEFT's zero init)."""
        return self.method is not Method.distill

    @property
    def distills(self) -> bool:
        return self.method in (Method.distill, Method.lstsq_distill)

    @property
    def module_kinds(self) -> tuple[str, ...]:
        return tuple(self.target.split("+"))

    @property
    def dir_name(self) -> str:
        """The compiled directory's name under the source run: compiled-r64, compiled-r4-distill-v_o, ..."""
        return (f"compiled-r{self.rank}" + ("" if self.method is Method.sink else f"-{self.method.value}")
                + ("" if self.target == "o" else f"-{self.target.replace('+', '_')}")
                + ("-nobias" if not self.bias and self.method is not Method.distill else ""))
