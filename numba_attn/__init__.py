"""numba_attn: fused transformer attention on the CPU with Numba, numpy in and numpy out.

Public API (see each docstring):

- :func:`scaled_dot_product_attention` — PyTorch-compatible attention on numpy arrays.
- :func:`attention_weights` — the softmax weights themselves, for small inputs.
- :func:`scaled_dot_product_attention_varlen` — a packed batch of sequences of different lengths
  (flash-attention's ``cu_seqlens`` layout), no padding.
- :class:`MultiHeadAttention` — a layer with Q/K/V/O projections, GQA/MQA, masks, a KV cache.
- :class:`LinearWeight` — a projection weight stored as float32, float16 or int8, read at its width.
- :class:`KVCache` — preallocated key/value storage (optionally a sliding-window ring buffer),
  float32, float16, int8 or 4-bit, keys and values each their own, optionally Hadamard-rotated.
- :func:`quantize` / :func:`dequantize` / :class:`QuantizedTensor` — int8 and 4-bit keys and values.
- :class:`Rotary` — rotary position embedding (RoPE) for the layer's ``rotary=``, one numba call for q and k.
- :func:`hadamard_transform` — the normalised Walsh–Hadamard rotation a cache applies (``numba_attn.rotation``).
- :func:`set_num_threads` / :func:`num_threads` (a context manager) / :func:`get_num_threads`.
- :mod:`numba_attn.reference` — the same contract in plain float64 numpy (the oracle).
"""

__version__ = "0.1.0"

from . import reference
from ._threads import get_num_threads, num_threads, set_num_threads
from .api import attention_weights, scaled_dot_product_attention
from .cache import KVCache
from .layers import MultiHeadAttention
from .linear import LinearWeight
from .quant import QuantizedTensor, dequantize, quantize
from .rotary import Rotary
from .rotation import hadamard_transform
from .varlen import scaled_dot_product_attention_varlen

__all__ = [
    "__version__",
    "scaled_dot_product_attention",
    "attention_weights",
    "scaled_dot_product_attention_varlen",
    "MultiHeadAttention",
    "KVCache",
    "LinearWeight",
    "quantize",
    "dequantize",
    "QuantizedTensor",
    "hadamard_transform",
    "Rotary",
    "set_num_threads",
    "get_num_threads",
    "num_threads",
    "reference",
]
