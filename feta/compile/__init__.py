"""Compile a trained prefix (or any token adaptation) into LoRA weights that merge into the base model.

    source.py        CompileSource: a feta run or a plain PEFT adapter directory, its base model and data
    calibration.py   the fit's calibration batch and the held-out batch, from a task or a prompt file
    spec.py          CompileSpec: method, rank, modules, calibration, device
    tokens.py        micro-batches, attention sinks, which tokens the fit weighs
    views.py         one base model seen as base, source adapter and compiled LoRA
    layers.py        running a model one decoder layer at a time over the calibration set
    fit.py           the closed form: reduced-rank ridge per module from float64 statistics
    sink.py          method=sink: the prefix folded into the attention sink's key and value
    sequential.py    the fit, layer by layer on the compiled model's own inputs
    memory.py        what a compile needs in memory, said before it starts
    distill.py       gradient steps from the source (methods distill, lstsq+distill)
    faithfulness.py  next-token agreement and KL of the compiled model against its source adapter
    pipeline.py      compile_run: source -> calibration -> fit -> residuals -> compiled directory; merge

Import from the modules themselves (`from feta.compile.pipeline import compile_run`): the package imports
nothing, so that feta.schema can read compile.spec without loading the compile.
"""
