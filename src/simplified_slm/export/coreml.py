"""Core ML export: an `.mlpackage` (ML program, float32 compute) converted by coremltools.

coremltools converts the same torch.export program the ONNX export writes (the inference
copy: eval mode, BitLinear frozen on its ternary codes, eager attention), decomposed to
core ATen ops. Not `torch.jit.trace`: in a trace, the GQA head-repeat count is a traced
value and coremltools 9.0 rejects the resulting `tile` ("expects ... int32 but got
tensor[4,fp32]"), and a trace silently freezes every shape-dependent Python branch.
Float32 compute precision keeps the logits comparable with PyTorch's; coremltools'
default float16 would not.

Conversion runs on Linux, prediction does not: Core ML's runtime ships with macOS only.
Here the package is checked by structure and spec, and the program it was converted
from is run in PyTorch at shapes other than the traced one.

hgrn_bit is refused: its dynamic-length form is torch's `scan` op (see `export/onnx.py`),
for which coremltools has no converter, and any other trace of the loop over time would
fix the length. hnet_bit is refused for its data-dependent chunk count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simplified_slm.errors import SLMError
from simplified_slm.export.onnx import check_family, export_program, quiet_export, require_modules
from simplified_slm.models.base import CausalLM

COREML_FILE = "model.mlpackage"
COREML_FAMILIES = ("gpt", "llama", "bitnet")
_UNSUPPORTED = {
    "hgrn_bit": "its recurrence needs torch's scan op for a dynamic length and coremltools has no converter "
                "for it; `--format onnx` exports it",
    "hnet_bit": "its dynamic chunking picks a data-dependent number of chunks per sequence, which "
                "torch.export cannot trace into a static graph",
}
_CHECK_SHAPES = ((1, 1), (3, 17))


def export_coreml(model: CausalLM, directory: str | Path, tokenizer: Any = None, max_batch: int = 16,
                  max_length: int | None = None) -> dict[str, Any]:
    """Write `directory/model.mlpackage` (+ the tokenizer).

    Input `input_ids`: int32 [batch, seq] (Core ML has no int64 inputs), batch in
    1..max_batch, seq in 1..max_length; output `logits`: float32 [batch, seq, vocab]. ML
    programs need finite bounds: `max_length` defaults to the model's context, or to
    `max_position_embeddings` for RoPE models (no hard limit there, but the trained length).
    `program_max_abs_diff` is the converted program's largest logit error in PyTorch at
    two shapes other than the traced one.
    """
    check_family(model, "Core ML", COREML_FAMILIES, _UNSUPPORTED)
    max_length = max_length or model.max_context or getattr(model.config, "max_position_embeddings", None)
    if not max_length:
        raise SLMError(f"the {model.config.family} model has no context limit; pass max_length to export_coreml")
    with quiet_export("coremltools"):
        (ct,) = require_modules("Core ML", "coremltools")
        import numpy as np

        exported, reference = export_program(model, max_batch, max_length)
        exported = exported.run_decompositions({})  # coremltools converts core ATen
        diff = _program_diff(exported, reference, max_batch, max_length)
        shape = ct.Shape(tuple(ct.RangeDim(1, n, 1) if n > 1 else 1 for n in (max_batch, max_length)))
        try:
            mlmodel = ct.convert(exported, inputs=[ct.TensorType(name="input_ids", dtype=np.int32, shape=shape)],
                                 outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                                 compute_precision=ct.precision.FLOAT32)
        except Exception as err:  # coremltools raises bare ValueError/NotImplementedError per op
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SLMError(f"coremltools {ct.__version__} cannot convert the {model.config.family} model: "
                           f"{first}") from err
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / COREML_FILE
    mlmodel.save(str(path))
    if tokenizer is not None:
        tokenizer.save(directory)
    return {"file": str(path), "coremltools": ct.__version__, "max_batch": max_batch, "max_length": max_length,
            "program_max_abs_diff": diff, "runs_on": "macOS (Core ML); only the conversion was checked here"}


@torch.no_grad()
def _program_diff(exported: torch.export.ExportedProgram, reference: CausalLM, max_batch: int,
                  max_length: int) -> float:
    """Max |logit error| of the program coremltools converts, at shapes it was not traced at:
    the one parity check possible without a Core ML runtime."""
    generator = torch.Generator().manual_seed(0)
    run = exported.module()
    worst = 0.0
    for batch, length in _CHECK_SHAPES:
        shape = (min(batch, max_batch), min(length, max_length))
        ids = torch.randint(0, reference.config.vocab_size, shape, generator=generator)
        worst = max(worst, (run(ids) - reference(ids).logits).abs().max().item())
    return worst
