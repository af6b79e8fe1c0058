"""Llama GGUF files read tensor by tensor with `gguf`'s own reader, quantized blocks kept.

`GGUFWeights` is a weight source for `models.quantization.build_model`: every tensor under
our `llama` state-dict name, either as the file's packed Q8_0 / Q4_0 / Q4_1 blocks
(`packed`, copied into our layout by `ops.quant.from_gguf_blocks`, no float round trip) or
as float32 rows (`rows`, gguf's own dequantizers; F32 / F16 / BF16 tensors and the block
types we keep no packed form of, such as Q6_K). The file is memory-mapped, so reading one
tensor never loads the others.

llama.cpp's converter permutes the rows of the q and k projections (it interleaves the two
rotary halves of each head); transformers undoes that on load and so do we, by permuting
whole rows. Blocks run along the input dimension, so a row permutation of packed blocks is
exact. The configuration comes from transformers' GGUF metadata reader (`AutoConfig`), the
same one the float import uses, so both paths build the same model.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.llama import LlamaConfig
from simplified_slm.ops.quant import QuantizedWeight, from_gguf_blocks

# GGUF block types whose blocks map onto our packed layout as they are
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")
_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_IGNORED = ("rope_freqs.weight",)  # llama3 rope factors: our rotary computes them from the config
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def our_name(gguf_name: str) -> str | None:
    """Our `llama` state-dict key for a GGUF tensor name (None: a tensor we do not need)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK:
        if gguf_name in _IGNORED:
            return None
        raise SLMError(f"the GGUF tensor {gguf_name!r} has no place in a Llama model; the file is not a plain "
                       "Llama (import it with transformers instead)")
    return f"layers.{match.group(1)}.{_BLOCK[match.group(2)]}.{match.group(3)}"


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(2, 1).reshape(rows)


def gguf_config(path: Path) -> LlamaConfig:
    """Our LlamaConfig from the GGUF metadata (read by transformers, as the float import does)."""
    from simplified_slm.export.hf import _llama_config, _transformers

    try:
        hf_config = _transformers().AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as err:
        raise SLMError(f"reading GGUF needs `pip install gguf` ({str(err).splitlines()[0]})") from None
    except (ValueError, OSError) as err:
        raise SLMError(f"cannot read the GGUF metadata of {path}: {(str(err).splitlines() or ['?'])[0]}; "
                       "the file is damaged or not a GGUF model") from None
    if hf_config.model_type != "llama":
        raise SLMError(f"{path} holds a '{hf_config.model_type}' model; only Llama GGUF files can be imported")
    return _llama_config(hf_config, LlamaConfig)


class GGUFWeights:
    """The tensors of a Llama GGUF file under our names (see the module docstring)."""

    def __init__(self, path: str | Path, config: LlamaConfig) -> None:
        try:
            from gguf import GGUFReader
        except ImportError:
            raise SLMError("reading GGUF needs `pip install gguf`") from None
        self.path = Path(path)
        try:
            reader = GGUFReader(str(self.path))
        except (ValueError, OSError) as err:
            raise SLMError(f"cannot read {self.path} as GGUF: {(str(err).splitlines() or ['?'])[0]}; "
                           "the file is damaged") from None
        self.tensors = {name: t for t in reader.tensors if (name := our_name(t.name)) is not None}
        self._heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.kv_heads}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def ggml_type(self, key: str) -> str:
        return self.tensors[key].tensor_type.name

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[key].shape))  # GGUF lists dims innermost first

    def _row_order(self, key: str) -> np.ndarray | None:
        module = key.rsplit(".", 1)[0].split(".", 2)[-1]  # layers.N.self_attn.q_proj.weight -> self_attn.q_proj
        heads = self._heads.get(module)
        return None if heads is None else _unpermute_rows(self.shape(key)[0], heads)

    def _rows_raw(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `start:stop` of the stored bytes / values, q and k rows put back in order,
        copied out of the read-only memory map."""
        data = self.tensors[key].data
        if len(self.shape(key)) != 2:
            return np.array(data)
        data = data.reshape(self.shape(key)[0], -1)
        order = self._row_order(key)
        return data[order[start:stop]] if order is not None else np.array(data[start:stop])

    def packed(self, key: str) -> QuantizedWeight | None:
        """The tensor as the file stores it when that is one of our packed schemes, else None."""
        kind = self.ggml_type(key)
        if kind not in PACKED_TYPES:
            return None
        return from_gguf_blocks(torch.from_numpy(self._rows_raw(key)), kind, self.shape(key))

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows `start:stop` of the tensor (all of a 1-D one), dequantized by gguf."""
        from gguf.quants import dequantize

        tensor = self.tensors[key]
        raw = self._rows_raw(key, start, stop)
        try:
            values = dequantize(raw, tensor.tensor_type)
        except NotImplementedError:
            raise SLMError(f"gguf cannot decode {tensor.name} ({tensor.tensor_type.name}); update the gguf "
                           "package or convert the file with llama.cpp") from None
        values = torch.from_numpy(np.asarray(values, dtype=np.float32))
        return values.reshape(raw.shape[0], -1) if raw.ndim == 2 else values

    @cached_property
    def quantized_keys(self) -> list[str]:
        """Keys stored in a packed type we keep."""
        return [k for k in self.tensors if self.ggml_type(k) in PACKED_TYPES]


_SCHEME_OF_TYPE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


def load_gguf(path: str | Path, quantize: str | None = None, group_size: int = 32):
    """Our `llama` model from a GGUF file, tensor by tensor (see the module docstring).

    `quantize=None` keeps the file's own quantization (each Q8_0 / Q4_0 / Q4_1 tensor packed
    as stored, the rest float32); "none" dequantizes everything to float32 (gguf's
    dequantizers: the values transformers' GGUF import gives); a scheme requantizes every
    linear and embedding from the dequantized values, except tensors the file already
    stores in exactly that scheme and group, which are kept as they are.
    """
    from simplified_slm.models.quantization import build_model, meta_model, resolve_scheme, uniform_plan

    path = Path(path)
    if not path.is_file():
        raise SLMError(f"GGUF file {path} does not exist")
    config = gguf_config(path)
    weights = GGUFWeights(path, config)
    if quantize is None:
        plan = {key.rsplit(".", 1)[0]: (_SCHEME_OF_TYPE[weights.ggml_type(key)], 32) for key in weights.quantized_keys
                if key.endswith(".weight")}
    else:
        scheme = resolve_scheme(quantize)
        plan = {} if scheme is None else uniform_plan(meta_model(config), scheme, group_size)
    return build_model(config, weights, plan, str(path))
