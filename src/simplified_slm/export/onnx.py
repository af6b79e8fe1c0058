"""ONNX export: one `.onnx` graph from `input_ids` (int64 [batch, seq]) to `logits`, checked in onnxruntime.

What is exported, and why (`export_program` is shared with the Core ML export):

- torch's own exporter, `torch.onnx.export(..., dynamo=True)` (torch.export based; the
  default since torch 2.9), with batch and sequence length dynamic, so one file serves
  every prompt length (up to the context of learned-position models). torch.export runs
  first, by hand: given a module, torch.onnx.export falls back to other capture
  strategies and can silently fix a "dynamic" length to the traced one.
- `inference_copy` of the model: eval mode, BitLinear frozen to its int8 ternary codes and
  scale (the float frozen path equals fake quantisation bit for bit, and the graph then
  holds neither the STE autograd function nor a per-call weight quantisation), attention in
  its eager form (matmuls + float32 softmax). SDPA is refused by every tracer here: the
  models pass `is_causal = q_len > 1`, which is a symbolic bool, not a bool, while tracing.
- hgrn_bit's recurrence as torch's `scan` op, which the exporter turns into an ONNX Scan
  loop. `chunk_hgrn`'s Python loops depend on the sequence length, so tracing them would
  freeze the graph to the traced length, and the C kernel of the fused form cannot be
  traced at all.
- `optimize=False`: onnxscript's optimizer (0.7) rewrites `x + c` to `x` when |c| <= 1e-8
  (its `x + 0` rule compares with abs_tol=1e-8), which deletes BitLinear's RMSNorm
  eps=1e-8 and moves hgrn_bit's logits by ~1e-5. onnxruntime optimises the graph itself
  when it loads it.

Parity is measured, not assumed: against the form the graph computes, float families match
to ~1e-7; in ternary families a value on an int8 rounding boundary can round the other way
in onnxruntime, moving that token's logits by ~1e-3 (docs/EXPORT.md).

hnet_bit is refused: its dynamic chunking picks a data-dependent number of chunks per
sequence (`int(counts.max())`), which torch.export cannot trace.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.attention import CausalSelfAttention
from simplified_slm.layers.rope import rope_type
from simplified_slm.models.base import CausalLM

ONNX_FILE = "model.onnx"
ONNX_FAMILIES = ("gpt", "llama", "bitnet", "hgrn_bit")
EDGE_INSTALL = 'pip install "simplified-slm[edge]"'
# Tokens per row of the example input the exporter traces with. Dynamic dims must be >= 2
# in the example (torch.export specialises sizes 0 and 1).
_EXAMPLE_BATCH, _EXAMPLE_LENGTH = 2, 8
_UNSUPPORTED = {
    "hnet_bit": "its dynamic chunking picks a data-dependent number of chunks per sequence, which "
                "torch.export cannot trace into a static graph",
}


def require_modules(fmt: str, *names: str) -> list[Any]:
    """Import the optional edge packages or say, in one line, how to install them."""
    missing, modules = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise SLMError(f"exporting to {fmt} needs {', '.join(missing)}: {EDGE_INSTALL}")
    return modules


def check_family(model: CausalLM, fmt: str, supported: Sequence[str], reasons: dict[str, str]) -> None:
    """Refuse what is known not to export, naming why and what to use instead."""
    family = model.config.family
    if family not in supported:
        why = reasons.get(family, f"only {', '.join(supported)} are exported (and parity-tested)")
    elif rope_type(getattr(model.config, "rope_scaling", None)) == "dynamic":
        why = ("dynamic (NTK) RoPE scaling computes its frequencies from the positions at run time, which "
               "torch.export cannot capture (linear and llama3 scaling export)")
    else:
        return
    raise SLMError(f"cannot export a {family} model to {fmt}: {why}; save it with `--format safetensors` "
                   "and run it with PyTorch")


class LogitsOnly(nn.Module):
    """`input_ids -> logits`: the whole interface of an exported graph (no cache, mask or loss)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


@torch.no_grad()
def inference_copy(model: CausalLM) -> CausalLM:
    """A traceable copy: eval mode, eager attention, every BitLinear frozen on its ternary
    codes and run on the float path (also for models loaded frozen with int8=True:
    `torch._int_mm` has no ONNX or Core ML counterpart).

    A copy, because freezing drops the float weights and the caller's model must stay
    usable (it is the reference the export is checked against).
    """
    twin = copy.deepcopy(model).eval().freeze_ternary(int8=False)
    for module in twin.modules():
        if isinstance(module, CausalSelfAttention):
            module.implementation = "eager"
    return twin


@contextlib.contextmanager
def quiet_export(*loggers: str) -> Iterator[None]:
    """Silence library chatter during an export (torch.onnx: missing torchvision ops;
    coremltools: no Core ML runtime on Linux, untested torch version, its own deprecated
    internals; torch.export: a deprecation inside torch), so the CLI prints its JSON line
    and real errors only."""
    handles = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in handles]
    for logger in handles:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="coremltools")
            yield
    finally:
        for logger, level in zip(handles, levels):
            logger.setLevel(level)


def _scan_step(h: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    i, f = xs
    h = f * h + i  # multiply then add, as the reference recurrence does
    return h, h.clone()  # scan outputs must not alias the carry


def scan_hgrn(i: torch.Tensor, f: torch.Tensor, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h_t = f_t * h_{t-1} + i_t as one `torch.scan`, with the signature of `ops.hgrn`'s forms.

    The exporter writes it as an ONNX Scan over time, so the graph keeps a dynamic length.
    """
    from torch._higher_order_ops.scan import scan

    h0 = torch.zeros_like(i.select(-2, 0)) if initial_state is None else initial_state
    final, out = scan(_scan_step, h0, (i, f), dim=i.dim() - 2)
    return out, final if output_final_state else None


@contextlib.contextmanager
def _traceable_recurrence() -> Iterator[None]:
    """Run HGRN layers on `scan_hgrn` while exporting (their module picks `hgrn` by name)."""
    import simplified_slm.layers.hgrn_bit as hgrn_layers

    original = hgrn_layers.hgrn
    hgrn_layers.hgrn = scan_hgrn
    try:
        yield
    finally:
        hgrn_layers.hgrn = original


def _summary(err: BaseException) -> str:
    """One line of a multi-page torch.export error: which input size the model's code fixed, else its first line."""
    text = str(err)
    fixed = re.search(r"size\(\)\[(\d)\]\S* as dynamic but your code specialized it to be a constant \((\d+)\)", text)
    if fixed:
        return f"its code fixes the {('batch', 'length')[int(fixed[1])]} to the traced {fixed[2]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _strip_trace_metadata(onnx_model: Any) -> None:
    """Drop per-node source metadata (stack traces with this machine's absolute paths)."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(onnx_model.graph):
        node.metadata_props.clear()


def _dynamic_dim(example_size: int, bound: int | None) -> Any:
    """torch.export's marker for one input dimension: dynamic up to `bound`, static if 1 is all it can be.

    DYNAMIC rather than a named Dim: it still fails when the model's code fixes the size,
    but lets torch's shape reasoning assume sizes >= 2, where a named Dim refuses guards
    such as min(s, s*s) == s. The graph still runs 1-token and 1-row inputs (tested).
    """
    if example_size == 1:
        return None
    return torch.export.Dim.DYNAMIC(max=bound) if bound else torch.export.Dim.DYNAMIC


@torch.no_grad()
def export_program(model: CausalLM, max_batch: int | None = None,
                   max_length: int | None = None) -> tuple[torch.export.ExportedProgram, CausalLM]:
    """`input_ids -> logits` of `inference_copy(model)` captured by torch.export, batch and length dynamic.

    Returns the program and the copy it was captured from (the exact computation the
    program holds, hence the reference for parity checks). Lengths are capped by the
    model's context and `max_length`, batches by `max_batch` (None: unbounded).
    """
    twin = inference_copy(model)
    limit = min(filter(None, (model.max_context, max_length)), default=None)
    batch = min(_EXAMPLE_BATCH, max_batch or _EXAMPLE_BATCH)
    length = min(_EXAMPLE_LENGTH, limit or _EXAMPLE_LENGTH)
    example = torch.arange(batch * length).reshape(batch, length) % model.config.vocab_size
    dims = {0: _dynamic_dim(batch, max_batch), 1: _dynamic_dim(length, limit)}
    # by hand, not inside torch.onnx.export: see the module docstring
    with _traceable_recurrence():
        try:
            program = torch.export.export(LogitsOnly(twin).eval(), (example,), strict=False,
                                          dynamic_shapes={"input_ids": dims})
        except Exception as err:
            raise SLMError(f"torch.export cannot trace the {model.config.family} model with a dynamic batch and "
                           f"length: {_summary(err)}") from err
    return program, twin


@torch.no_grad()
def export_onnx(model: CausalLM, directory: str | Path, tokenizer: Any = None,
                check_lengths: Sequence[int] = (3, 17)) -> dict[str, Any]:
    """Write `directory/model.onnx` (+ the tokenizer) and check it in onnxruntime.

    The check runs 2 rows at each of `check_lengths` (clipped to the model's context)
    through onnxruntime and through PyTorch computing the exported form of the model
    (`export_program`'s reference); the largest absolute logit difference is returned as
    `max_abs_diff`, so callers see the parity instead of assuming it.
    """
    check_family(model, "ONNX", ONNX_FAMILIES, _UNSUPPORTED)
    require_modules("ONNX", "onnx", "onnxscript", "onnxruntime")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ONNX_FILE
    with quiet_export("torch.onnx"):
        exported, reference = export_program(model)
        program = torch.onnx.export(exported, input_names=["input_ids"], output_names=["logits"], dynamo=True,
                                    dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}}, optimize=False,
                                    verbose=False)
    _strip_trace_metadata(program.model)
    program.save(str(path))  # weights go to model.onnx.data only above protobuf's 2 GB limit
    if tokenizer is not None:
        tokenizer.save(directory)
    limit = model.max_context
    shapes = [(_EXAMPLE_BATCH, min(n, limit) if limit else n) for n in check_lengths]
    return {"file": str(path), "opset": program.model.opset_imports[""],
            "checked_shapes": [list(s) for s in shapes], "max_abs_diff": onnx_logits_diff(reference, path, shapes)}


@torch.no_grad()
def onnx_logits_diff(model: CausalLM, path: str | Path, shapes: Sequence[tuple[int, int]], seed: int = 0) -> float:
    """Largest |logit difference| between onnxruntime on `path` and `model` over random ids of each shape."""
    (ort,) = require_modules("ONNX", "onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not "can't constant fold CastLike" of the int8 codes
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout would make the reference random
    worst = 0.0
    try:
        for batch, length in shapes:
            ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
            (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
            worst = max(worst, (torch.from_numpy(logits) - model(ids).logits).abs().max().item())
    finally:
        model.train(was_training)
    return worst
