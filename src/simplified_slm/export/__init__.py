"""Export formats: transformers folders (`hf`), packed ternary weights (`ternary`), ONNX
(`onnx`) and Core ML (`coreml`). See docs/EXPORT.md for what consumes each one.

Submodules import their optional dependencies (transformers, onnx, onnxruntime,
coremltools) only when an export runs, so importing this package needs none of them.
"""

from simplified_slm.export.coreml import COREML_FILE, export_coreml
from simplified_slm.export.onnx import ONNX_FILE, export_onnx, onnx_logits_diff

__all__ = ["COREML_FILE", "ONNX_FILE", "export_coreml", "export_onnx", "onnx_logits_diff"]
