"""numba_attn: fused transformer attention on the CPU with Numba, numpy in and numpy out.

Public API (see each docstring):

- :func:`scaled_dot_product_attention` — PyTorch-compatible attention on numpy arrays.
- :func:`attention_weights` — the softmax weights themselves, for small inputs.
- :class:`MultiHeadAttention` — a layer with Q/K/V/O projections, GQA/MQA, masks, a KV cache.
- :class:`KVCache` — preallocated key/value storage (optionally a sliding-window ring buffer),
  float32, float16 or int8.
- :func:`quantize` / :func:`dequantize` / :class:`QuantizedTensor` — int8 keys and values.
- :mod:`numba_attn.reference` — the same contract in plain float64 numpy (the oracle).
"""
__version__ = "0.1.0"

from . import reference
from .api import attention_weights, scaled_dot_product_attention
from .cache import KVCache
from .layers import MultiHeadAttention
from .quant import QuantizedTensor, dequantize, quantize

__all__ = ["__version__", "scaled_dot_product_attention", "attention_weights", "MultiHeadAttention", "KVCache",
           "quantize", "dequantize", "QuantizedTensor", "reference"]
