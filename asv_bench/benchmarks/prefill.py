"""Prefill: many query rows at once (a prompt, an encoder), L = S self-attention.

numba_attn against the baselines of ``numba_attn.bench`` (numpy's materialised softmax, torch's
``scaled_dot_product_attention``, onnxruntime's MultiHeadAttention contrib op), speed, GFLOP/s,
peak memory and accuracy.
"""

import dataclasses

from .common import DTYPES, IMPLS, THREADS, by_shape, max_abs_error, measure, prepare, warm_kernel_cache

#: the shapes, from numba_attn.bench.CASES (parameter value: ``Case.shape``)
PREFILL = by_shape("asv prefill")
THROUGHPUT = by_shape("asv throughput")
MEMORY = by_shape("asv memory")
ACCURACY = by_shape("asv accuracy")
(ENCODER,) = by_shape("asv encoder").values()
MASKED = by_shape("asv masked")


class Prefill:
    """B1 H8, L = S ∈ {512, 2048}, D ∈ {64, 128}, causal or not: one call of each implementation."""

    params = [IMPLS, list(PREFILL), DTYPES, THREADS]
    param_names = ["impl", "shape", "dtype", "threads"]

    def setup(self, impl, shape, dtype, threads):
        self.fn = prepare(impl, dataclasses.replace(PREFILL[shape], dtype=dtype), threads)

    def time_prefill(self, *params):
        self.fn()


class Encoder:
    """A MiniLM-sized encoder batch, B8 H12 L = S = 128 D32: many small heads, short sequences."""

    params = [IMPLS, DTYPES, THREADS]
    param_names = ["impl", "dtype", "threads"]

    def setup(self, impl, dtype, threads):
        self.fn = prepare(impl, dataclasses.replace(ENCODER, dtype=dtype), threads)

    def time_encoder(self, *params):
        self.fn()


class MaskedPrefill:
    """B1 H8 L = S = 1024 D64 without a mask and with an (L, S) boolean or float mask shared by the heads
    (10 % of the keys hidden): issue 12 asks the masked prefill to stay within 10 % of the unmasked one;
    the baselines take the same mask (torch ``attn_mask``, onnxruntime ``attention_bias``)."""

    params = [IMPLS, list(MASKED), THREADS]
    param_names = ["impl", "shape", "threads"]

    def setup(self, impl, shape, threads):
        self.fn = prepare(impl, MASKED[shape], threads)

    def time_masked_prefill(self, *params):
        self.fn()


class PrefillThroughput:
    """GFLOP/s (4·B·H·L·S·D, halved when causal) of numba_attn and torch, B1 H8 D64."""

    params = [["numba_attn", "torch"], list(THROUGHPUT), DTYPES, THREADS]
    param_names = ["impl", "shape", "dtype", "threads"]
    unit = "GFLOP/s"

    def setup(self, impl, shape, dtype, threads):
        self.case = dataclasses.replace(THROUGHPUT[shape], dtype=dtype)
        self.fn = prepare(impl, self.case, threads)

    def track_gflops(self, *params):
        return self.case.flops / measure(self.fn) / 1e9


class PrefillMemory:
    """Peak resident memory of the process after one call, B1 L = S D64, H heads, 1 thread.

    numba_attn streams over key blocks and never holds the L×S score matrix; numpy materialises
    it (4·H·L·S bytes, plus temporaries): at L = S = 4096, H1 that is 64 MiB per copy. numpy is
    skipped where the matrix would exceed ``bench.Numpy.max_scores`` (H8 at 4096).

    asv counts the whole process. So that the two differ only by what the call allocates, every
    process first loads numba_attn's kernel (a small call, whatever ``impl`` is): its code and
    numba's type machinery are the same for both. ``setup_cache`` fills numba's on-disk cache so
    that no process pays LLVM's compile-time memory.
    """

    params = [["numba_attn", "numpy"], list(MEMORY)]
    param_names = ["impl", "shape"]
    _threads = 1
    _warm_up = list(by_shape("asv memory warm-up").values())

    def setup_cache(self):
        # the value is not used, but must not be None (asv then passes no cache argument)
        return warm_kernel_cache(self._warm_up)

    def setup(self, warmed, impl, shape):
        warm_kernel_cache(self._warm_up)
        self.fn = prepare(impl, MEMORY[shape], self._threads, warm=False)

    def peakmem_prefill(self, *params):
        self.fn()


class PrefillAccuracy:
    """Largest |numba_attn − float64 reference| of the output (inputs ~ N(0, 1)), B1 H8."""

    params = [list(ACCURACY), ["float32", "float64"]]
    param_names = ["shape", "dtype"]
    unit = "max abs error"

    def setup(self, shape, dtype):
        self.case = dataclasses.replace(ACCURACY[shape], dtype=dtype)

    def track_max_abs_error(self, *params):
        return max_abs_error(self.case)
