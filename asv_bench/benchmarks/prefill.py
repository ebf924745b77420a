"""Prefill: many query rows at once (a prompt, an encoder), L = S self-attention.

numba_attn against the baselines of ``numba_attn.bench`` (numpy's materialised softmax, torch's
``scaled_dot_product_attention``, onnxruntime's MultiHeadAttention contrib op), speed, GFLOP/s,
peak memory and accuracy.
"""
from .common import DTYPES, IMPLS, THREADS, Case, max_abs_error, measure, prepare, warm_kernel_cache

HEADS = 8


class Prefill:
    """B1 H8, L = S, one call of each implementation."""
    params = [IMPLS, [512, 2048], [64, 128], [False, True], DTYPES, THREADS]
    param_names = ["impl", "seq_len", "head_dim", "causal", "dtype", "threads"]

    def setup(self, impl, seq_len, head_dim, causal, dtype, threads):
        case = Case("prefill", 1, HEADS, seq_len, seq_len, head_dim, causal=causal, dtype=dtype)
        self.fn = prepare(impl, case, threads)

    def time_prefill(self, *params):
        self.fn()


class Encoder:
    """A MiniLM-sized encoder batch, B8 H12 L = S = 128 D32: many small heads, short sequences."""
    params = [IMPLS, DTYPES, THREADS]
    param_names = ["impl", "dtype", "threads"]

    def setup(self, impl, dtype, threads):
        self.fn = prepare(impl, Case("encoder (MiniLM batch)", 8, 12, 128, 128, 32, dtype=dtype), threads)

    def time_encoder(self, *params):
        self.fn()


class PrefillThroughput:
    """GFLOP/s (4·B·H·L·S·D, halved when causal) of numba_attn and torch, B1 H8 D64."""
    params = [["numba_attn", "torch"], [512, 2048], [False, True], DTYPES, THREADS]
    param_names = ["impl", "seq_len", "causal", "dtype", "threads"]
    unit = "GFLOP/s"

    def setup(self, impl, seq_len, causal, dtype, threads):
        self.case = Case("prefill", 1, HEADS, seq_len, seq_len, 64, causal=causal, dtype=dtype)
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
    params = [["numba_attn", "numpy"], [1024, 4096], [1, 8]]
    param_names = ["impl", "seq_len", "heads"]
    _threads = 1
    _warm_up = [Case("warm-up", 1, 1, 256, 256, 64), Case("warm-up", 1, 8, 256, 256, 64)]

    def setup_cache(self):
        # the value is not used, but must not be None (asv then passes no cache argument)
        return warm_kernel_cache(self._warm_up)

    def setup(self, warmed, impl, seq_len, heads):
        warm_kernel_cache(self._warm_up)
        self.fn = prepare(impl, Case("prefill", 1, heads, seq_len, seq_len, 64), self._threads, warm=False)

    def peakmem_prefill(self, *params):
        self.fn()


class PrefillAccuracy:
    """Largest |numba_attn − float64 reference| of the output (inputs ~ N(0, 1)), B1 H8."""
    params = [[256, 1024], [64, 128], [False, True], ["float32", "float64"]]
    param_names = ["seq_len", "head_dim", "causal", "dtype"]
    unit = "max abs error"

    def setup(self, seq_len, head_dim, causal, dtype):
        self.case = Case("prefill", 1, HEADS, seq_len, seq_len, head_dim, causal=causal, dtype=dtype)

    def track_max_abs_error(self, *params):
        return max_abs_error(self.case)
