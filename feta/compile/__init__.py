"""Compile a trained prefix (or any token adaptation) into LoRA weights that merge into the base model.

    spec.py      CompileSpec: method, rank, modules, calibration
    tokens.py    micro-batches, attention sinks, which tokens the fit weighs
    fit.py       the closed form: reduced-rank ridge per module, fitted layer by layer through hooks
    distill.py   gradient steps from the prefix model (methods distill, lstsq+distill)
    pipeline.py  compile_run: source -> calibration -> fit -> residuals -> compiled directory; merge
"""

from feta.compile.pipeline import calibration_batches, check_source, compile_run, layer_residuals, merge_compiled
from feta.compile.spec import CLOSED_FORM, MODULE_PATTERNS, CompileSpec, Method

__all__ = ["CLOSED_FORM", "MODULE_PATTERNS", "CompileSpec", "Method", "calibration_batches", "check_source",
           "compile_run", "layer_residuals", "merge_compiled"]
