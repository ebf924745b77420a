"""Side-by-side speed of numba_attn and the baselines on the shapes we track.

Used by ``python -m numba_attn bench`` and by the asv suite (``asv_bench/benchmarks``), so both
time exactly the same calls. Baselines, each optional:

- ``numpy``: the textbook formula with a materialised softmax, float32 (numpy's BLAS).
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on 4-D (B, H, L, D) tensors
  (3-D inputs fall to its slow math path), ``torch.set_num_threads`` equal to ours.
- ``onnxruntime``: the CPU ``com.microsoft`` MultiHeadAttention contrib op, intra-op spinning off.

Each implementation's ``prepare(case, threads)`` returns a zero-argument callable, or raises
``Unavailable`` (not installed, or the case is outside what it supports) with the reason.
"""

import contextlib
import dataclasses
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


class Unavailable(Exception):
    """This implementation cannot run this case here (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    L: int
    S: int
    D: int
    causal: bool = False
    H_kv: int = 0  # 0: same as H
    #: storage of K and V: float32, float16, int8, int4, or "int8/int4" (int8 keys, 4-bit values); the query
    #: is float32 (float16 with float16)
    dtype: str = "float32"
    #: "" (none), "bool" or "float": an (L, S) ``attn_mask`` shared by every head (``attn_mask()``)
    mask: str = ""
    #: who times this shape (see ``CASES``); not part of the case's identity
    uses: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def kv_heads(self):
        return self.H_kv or self.H

    @property
    def flops(self):
        """4·B·H·L·S·D (Q·Kᵀ and P·V), halved under a causal mask when L = S."""
        f = 4 * self.B * self.H * self.L * self.S * self.D
        return f // 2 if self.causal and self.L == self.S else f

    @property
    def key_format(self):
        return self.dtype.split("/")[0]

    @property
    def value_format(self):
        return self.dtype.split("/")[-1]

    @property
    def kv_bytes(self):
        """Bytes of K and V as stored (int8: data plus one float32 scale per 32 entries; int4: half a
        byte per entry plus a float16 step and minimum per 32)."""
        per_value = {"int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
        per = [per_value.get(f) or np.dtype(f).itemsize for f in (self.key_format, self.value_format)]
        return int(self.B * self.kv_heads * self.S * self.D * sum(per))

    @property
    def kv_bytes_float32(self):
        """Bytes the same tokens take in float32 (what torch reads in a float32 comparison)."""
        return 2 * self.B * self.kv_heads * self.S * self.D * 4

    @property
    def memory_bound(self):
        return self.L <= 8

    @property
    def shape(self):
        heads = f"H{self.H}" if not self.H_kv else f"H{self.H}/{self.H_kv}"
        shape = f"B{self.B} {heads} L{self.L} S{self.S} D{self.D}" + (" causal" if self.causal else "")
        return shape + (f" {self.mask} mask" if self.mask else "")

    def attn_mask(self, seed=3):
        """The case's (L, S) mask, or None: 90 % of the keys visible to each query at random (its diagonal
        always, so no row is empty); boolean (True = visible), or float (a small bias on the visible keys,
        -inf elsewhere)."""
        if not self.mask:
            return None
        rng = np.random.default_rng(seed)
        keep = rng.random((self.L, self.S)) < 0.9
        keep[np.arange(min(self.L, self.S)), np.arange(min(self.L, self.S))] = True
        if self.mask == "bool":
            return keep
        bias = 0.1 * rng.standard_normal((self.L, self.S), dtype=np.float32)
        return np.where(keep, bias, np.float32(-np.inf)).astype(np.float32)

    def inputs(self, seed=0, as_float32=False):
        """(query, key, value) as numba_attn takes them: float32/float16 arrays, or for int8 a float32
        query with quantised key and value. ``as_float32``: the same tokens, all float32."""
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.B, self.H, self.L, self.D), dtype=np.float32)
        k = rng.standard_normal((self.B, self.kv_heads, self.S, self.D), dtype=np.float32)
        v = rng.standard_normal((self.B, self.kv_heads, self.S, self.D), dtype=np.float32)
        if self.dtype in ("float16", "float64"):
            q, k, v = (x.astype(self.dtype) for x in (q, k, v))
            if self.dtype == "float64" and not as_float32:
                return q, k, v
        if as_float32 or self.dtype == "float32":
            return tuple(x.astype(np.float32) for x in (q, k, v))
        if self.key_format in ("int8", "int4"):
            from .quant import quantize

            bits = {"int8": 8, "int4": 4}
            return q, quantize(k, bits=bits[self.key_format]), quantize(v, bits=bits[self.value_format])
        return q, k, v


def _one_each(*groups):
    """The cases of ``groups`` in order, each shape once: a case equal to an earlier one (same
    dimensions, causality, heads and dtype, whatever the name) adds its ``uses`` to that one."""
    merged = {}
    for group in groups:
        for case in group:
            key = dataclasses.replace(case, name="")
            if key in merged:
                first = merged[key]
                merged[key] = dataclasses.replace(
                    first, uses=first.uses + tuple(u for u in case.uses if u not in first.uses)
                )
            else:
                merged[key] = case
    return tuple(merged.values())


_BENCH = ("bench",)
_QUICK = ("bench", "quick")
#: Every attention shape numba_attn tracks, each once, with who times it (``Case.uses``):
#: ``bench`` (``python -m numba_attn bench``; ``quick``: also with ``--quick``), ``bench --full`` (only with
#: ``--full``), and the asv suite's groups ``asv prefill``, ``asv throughput``, ``asv memory``,
#: ``asv memory warm-up``, ``asv accuracy``, ``asv encoder``, ``asv masked``, ``asv decode``, ``asv decode shapes``,
#: ``asv bandwidth``, ``asv quantised``, ``asv layer`` (``asv_bench/benchmarks``). Both take their
#: shapes from here (``default_cases``, ``tracked``), so they cannot drift apart.
CASES = _one_each(
    [  # the bench table (../shared/ANCHORS.md), in its order
        Case("prefill", 1, 8, 1024, 1024, 64, uses=_QUICK + ("asv quantised", "asv masked")),
        Case("prefill causal", 1, 8, 1024, 1024, 64, causal=True, uses=_QUICK),
        Case("prefill D128", 1, 8, 1024, 1024, 128, uses=_BENCH),
        Case("encoder (MiniLM batch)", 8, 12, 128, 128, 32, uses=_QUICK + ("asv encoder", "asv layer")),
        Case("decode", 1, 32, 1, 4096, 64, uses=_QUICK + ("asv quantised", "asv layer")),
        Case("decode, 8 heads", 1, 8, 1, 16384, 64, uses=_BENCH),
        Case("decode, 4 query tokens", 1, 32, 4, 4096, 64, uses=_BENCH + ("asv decode shapes", "asv bandwidth")),
        Case(
            "decode GQA 64/8 (ggml's case)",
            1,
            64,
            1,
            7680,
            64,
            H_kv=8,
            uses=_BENCH + ("asv decode shapes", "asv bandwidth", "asv quantised"),
        ),
        Case("decode, float16 cache", 1, 32, 1, 4096, 64, dtype="float16", uses=_QUICK),
        Case("decode, int8 cache", 1, 32, 1, 4096, 64, dtype="int8", uses=_QUICK),
        Case("decode, int8 keys + int4 values", 1, 32, 1, 4096, 64, dtype="int8/int4", uses=_QUICK),
        Case("decode, int4 cache", 1, 32, 1, 4096, 64, dtype="int4", uses=_QUICK),
        Case("decode GQA 64/8, float16 cache", 1, 64, 1, 7680, 64, H_kv=8, dtype="float16", uses=_BENCH),
        Case("decode GQA 64/8, int8 cache", 1, 64, 1, 7680, 64, H_kv=8, dtype="int8", uses=_BENCH),
        Case("prefill, float16", 1, 8, 1024, 1024, 64, dtype="float16", uses=_BENCH),
        Case("prefill, boolean mask", 1, 8, 1024, 1024, 64, mask="bool", uses=_QUICK + ("asv masked",)),
        Case("prefill, float mask", 1, 8, 1024, 1024, 64, mask="float", uses=_QUICK + ("asv masked",)),
        Case("prefill", 1, 8, 4096, 4096, 64, uses=("bench --full", "quick", "asv memory")),
        Case("prefill causal", 1, 8, 4096, 4096, 64, causal=True, uses=("bench --full", "quick")),
        Case("prefill sweep", 1, 8, 256, 256, 64, uses=_QUICK + ("asv memory warm-up",)),
        Case("prefill sweep", 1, 8, 512, 512, 64, uses=_QUICK),
        Case("prefill sweep", 1, 8, 2048, 2048, 64, uses=_BENCH),
    ],
    [
        Case("prefill", 1, 8, n, n, d, causal=c, uses=("asv prefill",) + (("asv throughput",) if d == 64 else ()))
        for n in (512, 2048)
        for d in (64, 128)
        for c in (False, True)
    ],
    [
        Case("prefill", 1, 8, n, n, d, causal=c, uses=("asv accuracy",))
        for n in (256, 1024)
        for d in (64, 128)
        for c in (False, True)
    ],
    [Case("prefill", 1, h, n, n, 64, uses=("asv memory",)) for n in (1024, 4096) for h in (1, 8)],
    [Case("warm-up", 1, h, 256, 256, 64, uses=("asv memory warm-up",)) for h in (1, 8)],
    [
        Case("decode", 1, h, 1, s, 64, uses=("asv decode",) + (("asv bandwidth",) if h == 32 or s == 16384 else ()))
        for s in (1024, 4096, 16384)
        for h in (8, 32)
    ],
    [Case("decode GQA 32/8", 1, 32, 1, 4096, 64, H_kv=8, uses=("asv layer",))],
)


def tracked(use):
    """The cases of ``CASES`` that ``use`` (e.g. ``"asv decode"``) times, in order."""
    return [case for case in CASES if use in case.uses]


def default_cases(quick=False, small_memory=False, full=False):
    """The tracked shapes of the bench table (``CASES`` used by ``bench``), plus a prefill sweep over
    the sequence length.

    ``full`` adds the L = S = 4096 prefills (seconds per call on a small board); ``quick`` keeps the
    first case of each kind; ``small_memory`` drops cases whose K/V exceed 64 MiB (and ``full``)."""
    wanted = {"bench", "bench --full"} if full and not small_memory else {"bench"}
    cases = [c for c in CASES if wanted.intersection(c.uses) and (not quick or "quick" in c.uses)]
    if small_memory:
        cases = [c for c in cases if c.kv_bytes <= 64 << 20]
    return cases


def same_tokens(case):
    """What identifies a case's tokens, whatever their storage: float16/int8 cases are judged against
    the float32 case with the same key."""
    return (case.B, case.H, case.kv_heads, case.L, case.S, case.D, case.causal, case.mask)


# -- implementations ------------------------------------------------------------------------------
class NumbaAttn:
    name = "numba_attn"

    def prepare(self, case, threads):
        from ._threads import set_num_threads
        from .api import scaled_dot_product_attention

        set_num_threads(threads)  # not numba's: that would start the pool without numba_attn's wait policy
        q, k, v = case.inputs()
        gqa = case.kv_heads != case.H
        mask = case.attn_mask()

        def run():
            return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.causal, enable_gqa=gqa)

        return run


class Numpy:
    name = "numpy"
    max_scores = 1 << 26  # beyond this the materialised (B, H, L, S) matrix is too big to be fair

    def prepare(self, case, threads):
        if case.dtype != "float32":
            raise Unavailable("float32 only (the reference formula; compare the other dtypes with numba_attn float32)")
        if case.B * case.H * case.L * case.S > self.max_scores:
            raise Unavailable(f"the materialised score matrix would hold {case.B * case.H * case.L * case.S} floats")
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            threadpool_limits = None
        q, k, v = case.inputs()
        if case.kv_heads != case.H:
            k = np.repeat(k, case.H // case.kv_heads, axis=1)
            v = np.repeat(v, case.H // case.kv_heads, axis=1)
        scale = np.float32(1 / math.sqrt(case.D))
        causal = np.tril(np.ones((case.L, case.S), bool), case.S - case.L) if case.causal else None
        mask = case.attn_mask()

        def formula():
            s = q @ np.swapaxes(k, -1, -2) * scale
            if causal is not None:
                s = np.where(causal, s, -np.inf)
            if mask is not None:
                s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            return s @ v

        if threadpool_limits is None:  # BLAS then uses every core, whatever `threads` says
            return formula

        def run():
            with threadpool_limits(threads, user_api="blas"):
                return formula()

        return run


class Torch:
    name = "torch"

    def prepare(self, case, threads):
        try:
            import torch
        except ImportError:
            raise Unavailable("torch is not installed (pip install 'numba_attn[torch]')") from None
        if case.dtype not in ("float32", "float16", "float64"):
            raise Unavailable("no quantised attention; compare with its float32 row on the same tokens")
        torch.set_num_threads(threads)
        q, k, v = (torch.from_numpy(x) for x in case.inputs())
        gqa = case.kv_heads != case.H
        sdpa = torch.nn.functional.scaled_dot_product_attention
        mask = case.attn_mask()
        if case.causal and mask is not None:
            raise Unavailable("torch takes a mask or is_causal, not both")
        mask = None if mask is None else torch.from_numpy(mask).to(q.dtype if mask.dtype != bool else torch.bool)

        def run():
            if torch.get_num_threads() != threads:  # numba can reset it (numba issue #9387)
                torch.set_num_threads(threads)
            with torch.no_grad():
                return sdpa(q, k, v, attn_mask=mask, is_causal=case.causal, enable_gqa=gqa)

        return run


class OnnxRuntime:
    name = "onnxruntime"

    def prepare(self, case, threads):
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper
        except ImportError:
            raise Unavailable("onnxruntime and onnx are not installed") from None
        if case.kv_heads != case.H:
            raise Unavailable("the MultiHeadAttention contrib op has no grouped-query form")
        if case.causal and case.L != case.S:
            raise Unavailable("its causal flag is defined for L = S only")
        if case.dtype != "float32":
            raise Unavailable("float32 only here")
        B, H, L, S, D = case.B, case.H, case.L, case.S, case.D
        vi = helper.make_tensor_value_info
        inputs = [
            vi("q", TensorProto.FLOAT, [B, L, H * D]),
            vi("k", TensorProto.FLOAT, [B, S, H * D]),
            vi("v", TensorProto.FLOAT, [B, S, H * D]),
        ]
        mask = case.attn_mask()
        if mask is not None:  # its additive attention_bias (1, 1, L, S): a boolean mask as 0 / -inf
            bias = np.where(mask, np.float32(0), np.float32(-np.inf)) if mask.dtype == bool else mask
            inputs.append(vi("bias", TensorProto.FLOAT, [1, 1, L, S]))
        names = ["q", "k", "v"] + (["", "", "bias"] if mask is not None else [])
        graph = helper.make_graph(
            [
                helper.make_node(
                    "MultiHeadAttention",
                    names,
                    ["o"],
                    domain="com.microsoft",
                    num_heads=H,
                    unidirectional=int(case.causal),
                )
            ],
            "mha",
            inputs,
            [vi("o", TensorProto.FLOAT, [B, L, H * D])],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        q, k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, -1, H * D)) for x in case.inputs())
        feed = {"q": q, "k": k, "v": v}
        if mask is not None:
            feed["bias"] = np.ascontiguousarray(bias.reshape(1, 1, L, S))

        def run():
            return session.run(None, feed)[0]

        return run


IMPLEMENTATIONS = [NumbaAttn(), Torch(), OnnxRuntime(), Numpy()]


class TorchFloat32:
    """torch's float32 SDPA on a float16/int8/int4 case's tokens, timed in that case's alternation: the
    bench's 'ours × torch fp32' column (the float32 row of the same tokens is timed minutes apart)."""

    name = "torch fp32"

    def prepare(self, case, threads):
        if case.dtype == "float32":
            raise Unavailable("float32 case: its torch column is float32")
        return Torch().prepare(dataclasses.replace(case, dtype="float32"), threads)


# -- packed batches of different lengths ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VarlenCase:
    """A batch of B sequences (self-attention, L_b = S_b) with lengths drawn uniformly from
    [min_len, max_len] by a seeded generator: packed for ``scaled_dot_product_attention_varlen``,
    padded to the longest with a key padding mask for the others."""

    name: str
    B: int = 32
    H: int = 12
    D: int = 32
    min_len: int = 8
    max_len: int = 128
    causal: bool = False
    seed: int = 0
    memory_bound = False  # for run_cases

    @property
    def lengths(self):
        return np.random.default_rng(self.seed).integers(self.min_len, self.max_len + 1, self.B)

    @property
    def shape(self):
        return f"B{self.B} H{self.H} L{self.min_len}-{self.max_len} D{self.D}" + (" causal" if self.causal else "")

    @property
    def flops(self):
        """4·H·D·Σ L_b², the useful work (halved when causal)."""
        f = 4 * self.H * self.D * int((self.lengths.astype(np.int64) ** 2).sum())
        return f // 2 if self.causal else f

    def packed(self):
        """(q, k, v, cu_seqlens): (total, H, D) float32 each, offsets (B + 1,)."""
        lengths = self.lengths
        total = int(lengths.sum())
        rng = np.random.default_rng(self.seed + 1)
        q, k, v = (rng.standard_normal((total, self.H, self.D), dtype=np.float32) for _ in range(3))
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return q, k, v, cu

    def padded(self):
        """(q, k, v, keep): (B, H, T, D) float32 zero-padded to the longest T, keep (B, 1, 1, T) bool
        True where the key is a real token (the same tokens as ``packed``)."""
        q, k, v, cu = self.packed()
        lengths = np.diff(cu)
        T = int(lengths.max())
        out = []
        for x in (q, k, v):
            p = np.zeros((self.B, self.H, T, self.D), np.float32)
            for b in range(self.B):
                p[b, :, : lengths[b]] = x[cu[b] : cu[b + 1]].transpose(1, 0, 2)
            out.append(p)
        keep = (np.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
        return (*out, keep)


#: the packed-batch cases of ``scripts/varlen_bench.py`` and the asv suite (``asv_bench/benchmarks/varlen.py``)
VARLEN_CASES = (
    VarlenCase("32 sentences, 8-128 tokens"),
    VarlenCase("32 sentences, 8-128 tokens, causal", causal=True),
)


class NumbaAttnVarlen:
    name = "numba_attn varlen"

    def prepare(self, case, threads):
        import numba

        from .varlen import scaled_dot_product_attention_varlen

        numba.set_num_threads(threads)
        q, k, v, cu = case.packed()

        def run():
            return scaled_dot_product_attention_varlen(q, k, v, cu, cu, is_causal=case.causal)

        return run


class NumbaAttnPadded:
    name = "numba_attn padded"

    def prepare(self, case, threads):
        import numba

        from .api import scaled_dot_product_attention

        numba.set_num_threads(threads)
        q, k, v, keep = case.padded()

        def run():
            return scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=case.causal)

        return run


class TorchPadded:
    name = "torch padded"

    def prepare(self, case, threads):
        try:
            import torch
        except ImportError:
            raise Unavailable("torch is not installed (pip install 'numba_attn[torch]')") from None
        torch.set_num_threads(threads)
        q, k, v, keep = (torch.from_numpy(x) for x in case.padded())
        if case.causal:  # torch takes a mask or is_causal, not both
            T = q.shape[2]
            keep = keep & torch.ones(T, T, dtype=torch.bool).tril()
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            if torch.get_num_threads() != threads:  # numba can reset it (numba issue #9387)
                torch.set_num_threads(threads)
            with torch.no_grad():
                return sdpa(q, k, v, attn_mask=keep)

        return run


VARLEN_IMPLEMENTATIONS = [NumbaAttnVarlen(), NumbaAttnPadded(), TorchPadded()]


# -- measuring ------------------------------------------------------------------------------------
def median_seconds(fn, min_repeat=5, max_repeat=50, budget=1.0):
    """Median wall time of ``fn()`` after one warm-up call; repeats until ``budget`` seconds or max."""
    fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < min_repeat or (len(times) < max_repeat and time.perf_counter() - t_start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def read_bandwidth(threads, nbytes=1 << 30):
    """GB/s of a parallel sum over an ``nbytes`` float32 array (the memory-bound limit of decode)."""
    from ._threads import set_num_threads
    from .kernels.bandwidth import parallel_sum

    set_num_threads(threads)  # numba_attn's, so that the pool starts as a user's would (_threads.start_pool)
    a = np.ones(nbytes // 4, np.float32)
    return a.nbytes / median_seconds(lambda: parallel_sum(a), min_repeat=3, max_repeat=7, budget=2.0) / 1e9


def first_call_seconds(cache_dir=None):
    """Seconds for a fresh process to import numba_attn and make its first prefill + decode call.

    With ``cache_dir`` pointing to an empty directory this is the cold compile; without, the cached load.
    """
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np, numba_attn as na; t1 = time.perf_counter();"
        "q = np.ones((1, 2, 300, 64), np.float32); na.scaled_dot_product_attention(q, q, q);"
        "k = np.ones((1, 2, 2048, 64), np.float32); na.scaled_dot_product_attention(q[:, :, :1], k, k);"
        "print(t1 - t0, time.perf_counter() - t1)"
    )
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    t_import, t_first = (float(x) for x in out.stdout.split())
    return t_import, t_first


def preload_baselines():
    """Import torch and onnxruntime (when installed) before numba starts its thread pool.

    Measured here: torch imported *after* numba's OpenMP pool has run a kernel gets its own OpenMP
    runtime beside numba's and its SDPA runs 2-5× slower (80 ms instead of 15 ms at L = S = 1024).
    Importing it first avoids that; a benchmark that did not would flatter numba_attn.
    """
    for name in ("torch", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            continue  # not installed: nothing to protect


#: bytes read between two timed decode calls (more than any L3 cache here, 32 MiB)
EVICT_BYTES = 96 << 20
_evict_buffer = None


def evict_caches():
    """Read EVICT_BYTES of unrelated memory, so the next call finds its KV cache in DRAM, not in L3.

    A model decodes layer after layer, each with its own cache, so a layer's K and V never stay in
    L3 from one step to the next. Timing the same call over and over would keep a float16 (32 MiB)
    or int8 (19 MB) cache partly L3-resident and report speeds beyond the memory's.
    """
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = np.ones(EVICT_BYTES // 8, np.float64)
    return float(_evict_buffer.sum())


#: pause before timing the next library: OpenMP and OpenBLAS worker threads keep spinning for up to
#: ~0.1 s after a call returns, and on a small machine they would slow the next library down
HAND_OVER_SECONDS = 0.15


def run_cases(cases, threads, implementations=None, progress=None, budget=1.0):
    """{(case, implementation name): median seconds, or the reason it was skipped}.

    Each case times its implementations in two passes, in order and then in reverse order, so a
    machine whose speed drifts treats them alike. Each block starts with a pause (the previous
    library's threads go idle, see HAND_OVER_SECONDS) and an untimed warm-up call, then times
    calls for ``budget``/2 seconds (3 to 25 calls); the result is the median of both blocks.
    Memory-bound (decode) cases read unrelated memory before every timed call (``evict_caches``).
    """
    preload_baselines()
    implementations = IMPLEMENTATIONS if implementations is None else implementations
    results = {}
    for case in cases:
        fns = {}
        for impl in implementations:
            if progress:
                progress(f"{case.name} [{case.shape}] {impl.name} ...")
            try:
                fns[impl.name] = impl.prepare(case, threads)
            except Unavailable as why:
                results[case, impl.name] = str(why)
        times = {name: [] for name in fns}
        order = list(fns)
        for pass_order in (order, order[::-1]):
            for name in pass_order:
                time.sleep(HAND_OVER_SECONDS)
                fn = fns[name]
                fn()  # warm-up: compilation, caches, thread pools
                t_start = time.perf_counter()
                block = 0
                while block < 3 or (block < 25 and time.perf_counter() - t_start < budget / 2):
                    if case.memory_bound:
                        evict_caches()
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    block += 1
        for name in fns:
            results[case, name] = float(np.median(times[name]))
        del fns
    return results


def mask_cost(case, threads, rounds=11):
    """numba_attn's time on the masked ``case`` over its time on the same prefill without the mask: the
    median of ``rounds`` ratios, each of one call of either timed back to back. (The table's two rows are
    timed a minute or more apart, which moved their ratio by 20 % on a shared VM: 1.28× from the rows
    where the two in alternation gave 1.05×.)"""
    ours = next(impl for impl in IMPLEMENTATIONS if impl.name == "numba_attn")
    masked = ours.prepare(case, threads)
    plain = ours.prepare(dataclasses.replace(case, mask=""), threads)
    masked()
    plain()
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        masked()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return float(np.median(ratios))


def throughput(case, seconds):
    """(value, unit): GB/s of K and V read for decode, GFLOP/s otherwise."""
    if case.memory_bound:
        return case.kv_bytes / seconds / 1e9, "GB/s"
    return case.flops / seconds / 1e9, "GFLOP/s"


# -- the bench command ----------------------------------------------------------------------------
def _total_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def run_bench(quick=False, threads=None, json_path=None, plot_path=None, full=False, out=None):
    """``python -m numba_attn bench``: ``default_cases`` timed for every implementation (``run_cases``),
    printed as a table with throughput and ratios; also compile/load times in fresh processes and the
    memory bandwidth. Optionally writes JSON and a plot. Returns the exit status."""
    out = sys.stdout if out is None else out
    import json

    import numba

    from . import __version__
    from .check import print_table

    preload_baselines()  # before numba's pool starts: see preload_baselines
    threads = threads or numba.config.NUMBA_NUM_THREADS
    if threads > numba.config.NUMBA_NUM_THREADS:
        print(
            f"--threads {threads} is more than numba's pool ({numba.config.NUMBA_NUM_THREADS}); "
            "set NUMBA_NUM_THREADS first",
            file=sys.stderr,
        )
        return 2
    small = 0 < _total_memory_bytes() < (3 << 30)
    cases = default_cases(quick=quick, small_memory=small, full=full)

    def progress(msg):
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(
        f"numba_attn {__version__} bench: {len(cases)} cases, {threads} threads"
        + (", quick" if quick else "")
        + (", small-memory defaults" if small else ""),
        file=sys.stderr,
    )
    progress("compile times (fresh processes) ...")
    with tempfile.TemporaryDirectory() as empty_cache:
        t_import, t_cold = first_call_seconds(cache_dir=empty_cache)
    first_call_seconds()  # make sure the normal cache is filled
    _, t_cached = first_call_seconds()
    progress("memory bandwidth ...")
    bandwidth = read_bandwidth(threads, nbytes=(256 << 20) if (quick or small) else (1 << 30))
    results = run_cases(cases, threads, IMPLEMENTATIONS + [TorchFloat32()], progress, budget=0.2 if quick else 0.4)

    baselines = [impl.name for impl in IMPLEMENTATIONS if impl.name != "numba_attn"]
    header = (
        ["case", "shape", "numba_attn ms", "throughput"]
        + [f"{b} ms (ours ×)" for b in baselines]
        + ["ours × torch fp32"]
    )
    twins = {same_tokens(c): c for c in cases if c.dtype == "float32"}
    rows, records = [], []
    for case in cases:
        ours = results[case, "numba_attn"]
        value, unit = throughput(case, ours)
        tp = f"{value:.1f} {unit}" + (f" ({100 * value / bandwidth:.0f}% bw)" if unit == "GB/s" else "")
        row = [case.name, case.shape, f"{ours * 1e3:.2f}", tp]
        record = {
            "case": case.name,
            **dataclasses_asdict(case),
            "numba_attn_s": ours,
            "unit": unit,
            "throughput": value,
        }
        for b in baselines:
            theirs = results[case, b]
            if isinstance(theirs, str):
                row.append("-")
                record[f"{b}_s"] = None
                record[f"{b}_skipped"] = theirs
            else:
                row.append(f"{theirs * 1e3:.2f} ({theirs / ours:.2f}×)")
                record[f"{b}_s"] = theirs
        twin = twins.get(same_tokens(case))
        torch32 = results.get((case, "torch fp32"))
        if not isinstance(torch32, float):  # a float32 case: its own torch column
            torch32 = results.get((twin, "torch")) if twin is not None else None
        if isinstance(torch32, float):
            row.append(f"{torch32 / ours:.2f}×")
            record["torch_float32_same_tokens_s"] = torch32
        else:
            row.append("-")
        rows.append(row)
        records.append(record)
    print(file=out)
    print_table(tuple(header), [tuple(r) for r in rows], out)
    skipped = sorted({(b, results[c, b]) for c in cases for b in baselines if isinstance(results[c, b], str)})
    print(
        f"\nours × = baseline time / numba_attn time (above 1: numba_attn is faster). Median wall times, "
        f"{threads} threads for every implementation. Cases name the storage of K and V; a baseline runs the "
        "same dtype (torch float16 = its own float16 SDPA); 'ours × torch fp32' compares with torch's float32 "
        "SDPA on the same tokens (for float16/quantised cases timed in that case's own alternation). GB/s counts "
        "the bytes of K and V as stored.",
        file=out,
    )
    print(
        f"memory read bandwidth, measured in this run: {bandwidth:.1f} GB/s (decode's limit; 'bw' = share of it)",
        file=out,
    )
    print(
        f"import numba_attn {t_import:.2f} s; first prefill + decode call in a new process: cold compile "
        f"{t_cold:.1f} s, from the on-disk cache {t_cached:.2f} s",
        file=out,
    )
    for case in (c for c in cases if c.mask):
        ratio = mask_cost(case, threads, rounds=5 if quick else 11)
        print(
            f"{case.name}: {ratio:.2f}× the time of the same prefill without a mask (numba_attn, the two "
            "timed in alternation)",
            file=out,
        )
    for b, why in skipped:
        print(f"- {b} skipped on some cases: {why}", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "threads": threads,
                    "bandwidth_GBps": bandwidth,
                    "import_s": t_import,
                    "cold_first_call_s": t_cold,
                    "cached_first_call_s": t_cached,
                    "results": records,
                },
                f,
                indent=2,
            )
        print(f"wrote {json_path}", file=out)
    if plot_path:
        return _plot(cases, results, plot_path, out)
    return 0


def dataclasses_asdict(case):
    """The fields of ``case`` but its name, as a dict (for the JSON records)."""
    return {k: v for k, v in dataclasses.asdict(case).items() if k not in ("name", "uses")}


def _plot(cases, results, path, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'numba_attn[plot]' (or pip install matplotlib)", file=sys.stderr)
        return 2
    sweep = sorted(
        (c for c in cases if c.name.startswith("prefill") and not c.causal and c.D == 64 and c.B == 1 and c.H == 8),
        key=lambda c: c.L,
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in IMPLEMENTATIONS:
        pts = [
            (c.L, throughput(c, results[c, impl.name])[0]) for c in sweep if not isinstance(results[c, impl.name], str)
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L = S (B1 H8 D64, not causal)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("attention prefill throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=out)
    return 0


# -- shared by --busy and --layer -----------------------------------------------------------------
def alternate(fns, rounds=4, calls=5, evict=False):
    """{name: median seconds} of ``fns`` = {name: (library, zero-argument callable)}, timed in turns.

    Each callable is called once untimed (compilation, thread pools), then ``rounds`` rounds time
    ``calls`` calls of each in turn, the order reversed every other round, so that a machine whose
    speed drifts (or a neighbour whose load comes and goes) treats them alike. A block whose library
    differs from the previous block's starts after HAND_OVER_SECONDS (spinning threads go idle).
    ``evict``: read EVICT_BYTES of other memory before every timed call (``evict_caches``).
    """
    for _, fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    order = list(fns)
    previous = None
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            library, fn = fns[name]
            if library != previous:
                time.sleep(HAND_OVER_SECONDS)
                previous = library
            for _ in range(calls):
                if evict:
                    evict_caches()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def per_call_seconds(fn, inner=200, repeats=7):
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls (for µs-sized calls,
    where one timer read per call would be a visible share of the result); one warm-up batch first."""
    for _ in range(inner):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def _check_threads(threads):
    """``threads`` or all of numba's pool; None (after a message) when more than the pool is asked."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    if threads and threads > pool:
        print(f"--threads {threads} is more than numba's pool ({pool}); set NUMBA_NUM_THREADS first", file=sys.stderr)
        return None
    return threads or pool


def _torch_or_reason():
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install 'numba_attn[torch]'): its columns are left out"
    return torch, None


def _torch_threads(torch, threads):
    if torch.get_num_threads() != threads:  # numba can reset it (numba issue #9387)
        torch.set_num_threads(threads)


#: SmolLM2-135M's attention layer: hidden size 576 → 9 query heads and 3 K/V heads of 64, no biases
SMOLLM2 = {"embed_dim": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
#: storage formats of the layer's cache and weights in ``--layer``
FORMATS = ("float32", "float16", "int8")
#: the weights' formats in ``--layer``: the cache's and int4 (``LinearWeight``'s 4-bit blocks)
WEIGHT_FORMATS = FORMATS + ("int4",)


def smollm2_layer(weights="float32", seed=0):
    """A SmolLM2-shaped ``MultiHeadAttention`` (random weights) with its projections stored as ``weights``."""
    from .layers import MultiHeadAttention

    layer = MultiHeadAttention(
        SMOLLM2["embed_dim"], SMOLLM2["num_heads"], SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"], bias=False, seed=seed
    )
    return layer.quantize_weights(weights)


def smollm2_cache(tokens, dtype="float32", seed=1):
    """A full ring ``KVCache`` of ``tokens`` slots for the SmolLM2 layer (batch 1), filled with random
    tokens: every further append overwrites the oldest, so each decode step attends over ``tokens``."""
    from .cache import KVCache

    rng = np.random.default_rng(seed)
    cache = KVCache(1, SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"], capacity=1 << 40, dtype=dtype, window=tokens)
    shape = (1, SMOLLM2["num_kv_heads"], tokens, SMOLLM2["head_dim"])
    cache.append(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
    return cache


def smollm2_query(seed=2):
    """One decode step's query (1, 9, 1, 64) float32."""
    shape = (1, SMOLLM2["num_heads"], 1, SMOLLM2["head_dim"])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def attend_step(tokens, threads, cache_dtype="float32"):
    """SmolLM2's attention call of one decode step at ``tokens`` cached tokens: {"numba_attn":
    ``cache.attend(q)``, "torch": 4-D ``scaled_dot_product_attention`` with ``enable_gqa`` on the same
    float32 tokens (or why not)}."""
    from ._threads import set_num_threads

    set_num_threads(threads)
    cache = smollm2_cache(tokens, cache_dtype)
    q = smollm2_query()
    fns = {"numba_attn": lambda: cache.attend(q)}
    torch, why = _torch_or_reason()
    if torch is None:
        fns["torch"] = why
        return fns
    torch.set_num_threads(threads)
    cache32 = smollm2_cache(tokens, "float32")
    qt, kt, vt = (torch.from_numpy(np.array(x)) for x in (q, cache32.keys, cache32.values))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_step():
        _torch_threads(torch, threads)
        with torch.no_grad():
            return sdpa(qt, kt, vt, enable_gqa=True)

    fns["torch"] = torch_step
    return fns


# -- bench --busy ---------------------------------------------------------------------------------
#: the neighbours ``bench --busy`` starts, one kind at a time
NEIGHBOURS = ("busy loop", "BLAS", "numba")
#: seconds a neighbour runs after it says it is ready, before the timing starts
SETTLE_SECONDS = 1.0
#: seconds a neighbour lives at most, whatever happens (it also exits as soon as its parent is gone)
NEIGHBOUR_LIFETIME = 1800
#: the target of issue 13: ours_busy/ours_idle at most this many times torch_busy/torch_idle
BUSY_TARGET = 1.1

_WATCHDOG = """
import os, signal, sys, threading, time
_parent, _end = int(sys.argv[2]), time.monotonic() + float(sys.argv[1])
try:  # Linux: the kernel kills this process the moment its parent dies, whatever this one is doing
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != _parent:  # the parent died before the line above took effect
    os._exit(0)


def _watch():  # and, everywhere: exit once the parent is gone (killed, crashed) or the lifetime is over
    while os.getppid() == _parent and time.monotonic() < _end:
        time.sleep(0.1)
    os._exit(0)


threading.Thread(target=_watch, daemon=True).start()
"""

_NEIGHBOUR_WORK = {
    "busy loop": """
import numpy as np
a = np.arange(4096.0)
print("ready", flush=True)
while True:
    n = 0
    for i in range(20000):
        n += i
    a.sum()
""",
    "BLAS": """
import numpy as np
a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
c = a @ a
print("ready", flush=True)
while True:
    np.matmul(a, a, out=c)
""",
    "numba": """
import numpy as np
import numba_attn
q = np.random.default_rng(0).standard_normal((1, 8, 1024, 64), dtype=np.float32)
numba_attn.scaled_dot_product_attention(q, q, q, is_causal=True)  # compiles, or loads from the cache
print("ready", flush=True)
while True:
    numba_attn.scaled_dot_product_attention(q, q, q, is_causal=True)
""",
}


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _neighbour_processes(kind, cores):
    """(number of processes, extra environment) of a neighbour ``kind`` on ``cores`` cores."""
    one = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kind == "busy loop":
        return cores, one  # one single-threaded process per core
    if kind == "BLAS":
        return 1, {name: str(cores) for name in one}  # one process, BLAS threads = cores
    if kind == "numba":
        return 1, {**one, "NUMBA_NUM_THREADS": str(cores)}  # numba's pool = cores, numba_attn's defaults
    raise ValueError(f"neighbour must be one of {', '.join(NEIGHBOURS)}, got {kind!r}")


@contextlib.contextmanager
def neighbours(kind, cores=None, settle=SETTLE_SECONDS, ready_timeout=300.0, lifetime=NEIGHBOUR_LIFETIME):
    """Run a neighbour while the ``with`` block runs; yields the pids of its processes.

    ``kind``: ``"busy loop"`` (a pure-Python/numpy loop, one process per core), ``"BLAS"`` (numpy
    float32 matmul in a loop, one process, BLAS threads = cores) or ``"numba"`` (numba_attn's causal
    prefill B1 H8 L=S=1024 in a loop, one process, numba's pool = cores; its first call compiles or
    loads the kernel). Each is a ``sys.executable`` subprocess in a session of its own; the block
    starts once every process has said it is ready and ``settle`` seconds more have passed. On the
    way out (normally, on an exception, on KeyboardInterrupt) every process group is killed and
    reaped; should this process die without that, the kernel kills each neighbour with it (Linux's
    parent-death signal; call this from the thread that will leave the block), a watchdog thread
    in each neighbour exits within 0.1 s of noticing its parent is gone (every platform), and
    every neighbour exits after ``lifetime`` seconds in any case.
    """
    cores = cores or available_cores()
    count, extra = _neighbour_processes(kind, cores)
    env = dict(os.environ, **extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = _WATCHDOG + _NEIGHBOUR_WORK[kind]
    procs = []
    with contextlib.ExitStack() as files:
        try:
            for _ in range(count):
                err = files.enter_context(tempfile.TemporaryFile())
                procs.append(
                    (
                        subprocess.Popen(
                            [sys.executable, "-c", code, str(lifetime), str(os.getpid())],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=err,
                            env=env,
                            start_new_session=True,
                        ),
                        err,
                    )
                )
            deadline = time.monotonic() + ready_timeout
            for proc, err in procs:
                _wait_ready(kind, proc, err, deadline)
            time.sleep(settle)
            yield [proc.pid for proc, _ in procs]
        finally:
            for proc, _ in procs:
                _stop(proc)


def _wait_ready(kind, proc, err, deadline):
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the {kind} neighbour (pid {proc.pid}) did not get ready in time")
        readable, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if not readable:
            continue
        line = proc.stdout.readline()
        if line.strip() == b"ready":
            return
        if not line:  # end of file: it exited
            proc.wait()
            err.seek(0)
            tail = err.read()[-3000:].decode(errors="replace")
            raise RuntimeError(
                f"the {kind} neighbour exited with status {proc.returncode} before it was ready:\n{tail}"
            )


def _stop(proc):
    """Kill ``proc``'s process group (it leads a session of its own) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def busy_cases(threads):
    """[(case label, {"numba_attn": callable, "torch": callable or why not})] of ``bench --busy``:
    decode B1 H32 S4096 D64, causal prefill B1 H8 L=S=1024 D64 (``CASES``, float32) and SmolLM2's
    ``cache.attend`` step at 512 cached tokens (``attend_step``)."""
    preload_baselines()
    picked = [
        next(c for c in CASES if (c.name, c.H, c.S, c.dtype) == ("decode", 32, 4096, "float32")),
        next(c for c in CASES if (c.name, c.L, c.causal) == ("prefill causal", 1024, True)),
    ]
    out = []
    for case in picked:
        fns = {"numba_attn": NumbaAttn().prepare(case, threads)}
        try:
            fns["torch"] = Torch().prepare(case, threads)
        except Unavailable as why:
            fns["torch"] = str(why)
        out.append((f"{case.name} {case.shape}", fns))
    out.append(("SmolLM2 cache.attend B1 H9/3 L1 S512 D64", attend_step(512, threads)))
    return out


def busy_results(threads, quick=False, kinds=NEIGHBOURS, cores=None, settle=SETTLE_SECONDS, progress=None):
    """[{case, neighbour, ours_idle_s, ours_busy_s, torch_idle_s, torch_busy_s}] (torch's None without
    it): for each neighbour kind, every case timed idle, then again beside that neighbour. Ours and
    torch are timed in turns (``alternate``), so both see the same noise."""
    cases = busy_cases(threads)
    rounds = 4 if quick else 8
    records = []

    def timed(fns):
        usable = {name: (name, fn) for name, fn in fns.items() if callable(fn)}
        return alternate(usable, rounds=rounds, calls=3)

    for kind in kinds:
        if progress:
            progress(f"idle, before the {kind} neighbour ...")
        idle = [timed(fns) for _, fns in cases]
        if progress:
            progress(f"beside the {kind} neighbour ...")
        with neighbours(kind, cores=cores, settle=settle):
            busy = [timed(fns) for _, fns in cases]
        for (label, fns), i, b in zip(cases, idle, busy):
            records.append(
                {
                    "case": label,
                    "neighbour": kind,
                    "ours_idle_s": i["numba_attn"],
                    "ours_busy_s": b["numba_attn"],
                    "torch_idle_s": i.get("torch"),
                    "torch_busy_s": b.get("torch"),
                    "torch_skipped": None if callable(fns["torch"]) else fns["torch"],
                }
            )
    return records


def busy_ratio(record):
    """(ours_busy/ours_idle, torch_busy/torch_idle or None, their quotient or None) of a record."""
    ours = record["ours_busy_s"] / record["ours_idle_s"]
    if record["torch_idle_s"] is None:
        return ours, None, None
    theirs = record["torch_busy_s"] / record["torch_idle_s"]
    return ours, theirs, ours / theirs


def print_busy(records, threads, cores, out):
    from .check import print_table

    with_torch = any(r["torch_idle_s"] is not None for r in records)
    header = ["case", "neighbour", "ours idle ms", "ours busy ms", "ours busy/idle"]
    if with_torch:
        header += ["torch idle ms", "torch busy ms", "torch busy/idle", f"ours/torch (target ≤ {BUSY_TARGET})"]
    rows = []
    for r in records:
        ours, theirs, quotient = busy_ratio(r)
        row = [r["case"], r["neighbour"], f"{r['ours_idle_s'] * 1e3:.2f}", f"{r['ours_busy_s'] * 1e3:.2f}"]
        row.append(f"{ours:.2f}")
        if with_torch:
            if theirs is None:
                row += ["-", "-", "-", "-"]
            else:
                verdict = "ok" if quotient <= BUSY_TARGET else "over"
                row += [
                    f"{r['torch_idle_s'] * 1e3:.2f}",
                    f"{r['torch_busy_s'] * 1e3:.2f}",
                    f"{theirs:.2f}",
                    f"{quotient:.2f} {verdict}",
                ]
        rows.append(tuple(row))
    print(file=out)
    print_table(tuple(header), rows, out)
    print(
        f"\nMedian wall times, {threads} threads for ours and torch, {cores} cores; idle = just before the "
        "neighbour started, busy = beside it. Neighbours: 'busy loop' = one pure-Python/numpy loop process "
        "per core; 'BLAS' = one numpy float32 matmul loop process with BLAS threads = cores; 'numba' = one "
        "process running numba_attn's causal prefill B1 H8 L=S=1024 in a loop (numba's pool = cores). "
        f"Target (issue 13): ours busy/idle ≤ {BUSY_TARGET} × torch busy/idle, with no environment variable set.",
        file=out,
    )
    skipped = sorted({r["torch_skipped"] for r in records if r["torch_skipped"]})
    for why in skipped:
        print(f"- torch: {why}", file=out)


def run_busy(quick=False, threads=None, json_path=None, out=None, kinds=NEIGHBOURS, cores=None, settle=SETTLE_SECONDS):
    """``python -m numba_attn bench --busy``: decode, prefill and SmolLM2's ``cache.attend`` step, idle
    and beside each neighbour (``neighbours``), ours and torch side by side. Returns the exit status."""
    import json

    out = sys.stdout if out is None else out
    preload_baselines()  # before numba's pool starts: see preload_baselines
    threads = _check_threads(threads)
    if threads is None:
        return 2
    cores = cores or available_cores()
    print(f"bench --busy: {threads} threads, {cores} cores" + (", quick" if quick else ""), file=sys.stderr)
    records = busy_results(threads, quick=quick, kinds=kinds, cores=cores, settle=settle, progress=_progress)
    print_busy(records, threads, cores, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"threads": threads, "cores": cores, "busy": records}, f, indent=2)
        print(f"wrote {json_path}", file=out)
    return 0


def _progress(msg):
    print(f"  {msg}", file=sys.stderr, flush=True)


# -- bench --layer --------------------------------------------------------------------------------
#: cached tokens of the SmolLM2 layer step in ``--layer`` (the targets are at 512)
LAYER_TOKENS = (512, 4096)
#: issue 13's targets for the layer step at 512 cached tokens: × today's float32 path (numpy float32
#: projections + ``scaled_dot_product_attention`` on the cache's views)
LAYER_TARGETS = {("int8", "int8"): 3.0, ("float32", "float32"): 1.5}
#: issue 13's targets for the per-call costs, seconds
CALL_TARGET, BEYOND_KERNEL_TARGET, APPEND_TARGET = 25e-6, 15e-6, 10e-6


def _blas_limits(threads):
    """numpy's BLAS limited to ``threads`` (threadpoolctl, when installed) until ``.unregister()``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(threads, user_api="blas")


def layer_step(tokens, cache_dtype, weights, threads):
    """One SmolLM2-shaped decode step of ``MultiHeadAttention`` (batch 1, one new token) over a full
    ring of ``tokens`` cached tokens (each call appends one and attends over ``tokens``), and its
    parts on the same layer and cache: {"step": ``layer(x, cache=cache)``, "projections": Q/K/V
    (one fused product) and O, "attention": ``cache.attend`` on the step's query}. The rest of a
    step (append, reshapes, Python) is step − projections − attention."""
    from ._threads import set_num_threads

    set_num_threads(threads)
    layer = smollm2_layer(weights)
    cache = smollm2_cache(tokens, cache_dtype)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, SMOLLM2["embed_dim"]), dtype=np.float32)
    q, _, _ = layer.project_qkv(x)
    merged = rng.standard_normal((1, SMOLLM2["num_heads"] * SMOLLM2["head_dim"]), dtype=np.float32)
    packed = layer._packed
    w_o = layer.w_o

    def o_projection():
        return packed["o"](merged) if packed is not None else merged @ w_o

    def projections():
        layer.project_qkv(x)
        return o_projection()

    return {
        "step": lambda: layer(x, cache=cache),
        "projections": projections,
        "attention": lambda: cache.attend(q, check_finite=False),
    }


def old_layer_step(tokens, threads):
    """The float32 path before issue 13, on the same shapes: numpy float32 projections (one fused
    Q/K/V product, then O), ``cache.append`` and ``scaled_dot_product_attention(q, cache.keys,
    cache.values, is_causal="lower_right", enable_gqa=True)`` on the cache's views."""
    from ._threads import set_num_threads
    from .api import scaled_dot_product_attention

    set_num_threads(threads)
    layer = smollm2_layer("float32")
    cache = smollm2_cache(tokens, "float32")
    H, Hkv, D = SMOLLM2["num_heads"], SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"]
    w_in = np.concatenate([layer.w_q, layer.w_k, layer.w_v], axis=1)
    w_o = layer.w_o.copy()
    x = np.random.default_rng(3).standard_normal((1, SMOLLM2["embed_dim"]), dtype=np.float32)

    def step():
        qkv = x @ w_in
        q = qkv[:, : H * D].reshape(1, 1, H, D).transpose(0, 2, 1, 3)
        k = qkv[:, H * D : (H + Hkv) * D].reshape(1, 1, Hkv, D).transpose(0, 2, 1, 3)
        v = qkv[:, (H + Hkv) * D :].reshape(1, 1, Hkv, D).transpose(0, 2, 1, 3)
        cache.append(k, v, check_finite=False)
        out = scaled_dot_product_attention(
            q, cache.keys, cache.values, is_causal="lower_right", enable_gqa=True, check_finite=False
        )
        return out.transpose(0, 2, 1, 3).reshape(1, H * D) @ w_o

    return step


def torch_layer_step(tokens, threads):
    """The same decode step in torch (float32): ``F.linear`` projections, a preallocated ring of K/V
    tensors written in place, 4-D ``scaled_dot_product_attention`` with ``enable_gqa``. Raises
    ``Unavailable`` without torch."""
    torch, why = _torch_or_reason()
    if torch is None:
        raise Unavailable(why)
    torch.set_num_threads(threads)
    layer = smollm2_layer("float32")
    cache = smollm2_cache(tokens, "float32")
    H, Hkv, D = SMOLLM2["num_heads"], SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"]
    w_in = torch.from_numpy(np.ascontiguousarray(np.concatenate([layer.w_q, layer.w_k, layer.w_v], axis=1).T))
    w_o = torch.from_numpy(np.ascontiguousarray(layer.w_o.T))
    keys, values = (torch.from_numpy(np.array(x)) for x in (cache.keys, cache.values))  # writeable copies
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 1, SMOLLM2["embed_dim"]), dtype=np.float32))
    linear, sdpa = torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention
    position = [0]

    def step():
        _torch_threads(torch, threads)
        with torch.no_grad():
            qkv = linear(x, w_in)
            q = qkv[..., : H * D].view(1, 1, H, D).transpose(1, 2)
            slot = position[0] % tokens
            position[0] += 1
            keys[:, :, slot] = qkv[0, :, H * D : (H + Hkv) * D].view(Hkv, D)
            values[:, :, slot] = qkv[0, :, (H + Hkv) * D :].view(Hkv, D)
            out = sdpa(q, keys, values, enable_gqa=True)
            return linear(out.transpose(1, 2).reshape(1, 1, H * D), w_o)

    return step


def layer_results(
    threads, quick=False, tokens=LAYER_TOKENS, formats=FORMATS, weight_formats=WEIGHT_FORMATS, progress=None
):
    """[{tokens, cache, weights, step_s, projections_s, attention_s, rest_s, old_s, torch_s}] for
    every cache × weight format (``layer_step``). The old float32 path is timed in turns with each
    row's step and parts (``alternate``), so each row's ratio comes from one stretch of time; torch
    (float32) once per token count, in turns with the old path (``torch_s`` None without torch).
    Every timed call first reads EVICT_BYTES of other memory: in a model each layer's weights and
    cache come from DRAM, not from a cache level the previous call filled."""
    rounds = 2 if quick else 4
    records = []
    for n in tokens:
        old = old_layer_step(n, threads)
        try:
            theirs = torch_layer_step(n, threads)
        except Unavailable:
            theirs = None
        torch_s = old_vs_torch = None
        if theirs is not None:
            if progress:
                progress(f"layer step, {n} tokens: torch and the old path ...")
            t = alternate({"old": ("numba_attn", old), "torch": ("torch", theirs)}, rounds=rounds, evict=True)
            torch_s, old_vs_torch = t["torch"], t["old"]
        for cache_dtype in formats:
            for weights in weight_formats:
                if progress:
                    progress(f"layer step, {n} tokens: {cache_dtype} cache, {weights} weights ...")
                fns = layer_step(n, cache_dtype, weights, threads)
                timed = alternate(
                    {name: ("numba_attn", fn) for name, fn in (*fns.items(), ("old", old))}, rounds=rounds, evict=True
                )
                records.append(
                    {
                        "tokens": n,
                        "cache": cache_dtype,
                        "weights": weights,
                        "step_s": timed["step"],
                        "projections_s": timed["projections"],
                        "attention_s": timed["attention"],
                        "rest_s": timed["step"] - timed["projections"] - timed["attention"],
                        "old_s": timed["old"],
                        "torch_s": torch_s,
                        "old_in_torch_run_s": old_vs_torch,
                    }
                )
    return records


def _captured_kernel_call(call):
    """(the numba kernel, its arguments) of the attention kernel ``call()`` runs, captured by running
    it once with recording wrappers around the four kernels."""
    from .kernels import decode, prefill

    seen = {}
    kernels = ((decode, "decode_serial"), (decode, "decode_parallel"), (prefill, "prefill_serial"))
    kernels += ((prefill, "prefill_parallel"),)
    patched = [(module, name, getattr(module, name)) for module, name in kernels]

    def recording(kernel):
        def run_kernel(*args):
            seen["kernel"], seen["args"] = kernel, args
            return kernel(*args)

        return run_kernel

    try:
        for module, name, real in patched:
            setattr(module, name, recording(real))
        call()
    finally:
        for module, name, real in patched:
            setattr(module, name, real)
    return seen["kernel"], seen["args"]


def call_overhead(tokens=64, threads=None, inner=200, repeats=7):
    """Seconds per call of a 1-token grouped-query decode call (SmolLM2's 9 query / 3 K/V heads, D64)
    at ``tokens`` cached tokens (float32): {"attend": ``cache.attend(q)``, "kernel": the numba kernel
    alone on the arguments that call passes it, through its compiled entry point as ``attend`` calls it
    (``api.compiled_entry``: the arguments' unboxing included, not the dispatcher's typing of them),
    "dispatch": the same call through numba's dispatcher, "beyond_kernel": attend − kernel}."""
    from ._threads import set_num_threads

    if threads:
        set_num_threads(threads)
    cache = smollm2_cache(tokens, "float32")
    q = smollm2_query()
    from .api import compiled_entry

    kernel, args = _captured_kernel_call(lambda: cache.attend(q))
    entry = compiled_entry(kernel, args)
    attend = per_call_seconds(lambda: cache.attend(q), inner, repeats)
    alone = per_call_seconds(lambda: entry(*args), inner, repeats)
    dispatch = per_call_seconds(lambda: kernel(*args), inner, repeats)
    return {"attend": attend, "kernel": alone, "dispatch": dispatch, "beyond_kernel": attend - alone}


def append_seconds(dtype, inner=200, repeats=7):
    """Seconds per one-token ``KVCache.append`` (SmolLM2's 3 K/V heads of 64, float32 key and value)
    into a ``dtype`` cache (a 1024-slot ring, so it never fills)."""
    from .cache import KVCache

    rng = np.random.default_rng(4)
    cache = KVCache(1, SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"], capacity=1 << 40, dtype=dtype, window=1024)
    k, v = (rng.standard_normal((1, SMOLLM2["num_kv_heads"], 1, SMOLLM2["head_dim"]), dtype=np.float32) for _ in "kv")
    return per_call_seconds(lambda: cache.append(k, v), inner, repeats)


def print_layer(records, overhead, appends, threads, out):
    from .check import print_table

    with_torch = any(r["torch_s"] is not None for r in records)
    header = ["tokens", "cache", "weights", "step ms", "projections", "attention", "rest", "× old fp32 path"]
    if with_torch:
        header.append("× torch fp32")
    rows = []
    for r in records:
        target = LAYER_TARGETS.get((r["cache"], r["weights"])) if r["tokens"] == 512 else None
        speedup = r["old_s"] / r["step_s"]
        row = [
            str(r["tokens"]),
            r["cache"],
            r["weights"],
            f"{r['step_s'] * 1e3:.3f}",
            f"{r['projections_s'] * 1e3:.3f}",
            f"{r['attention_s'] * 1e3:.3f}",
            f"{r['rest_s'] * 1e3:.3f}",
            f"{speedup:.2f}×"
            + (f" ({'ok' if speedup >= target else 'under'}, target ≥ {target:g}×)" if target else ""),
        ]
        if with_torch:
            row.append("-" if r["torch_s"] is None else f"{r['torch_s'] / r['step_s']:.2f}×")
        rows.append(tuple(row))
    print(file=out)
    print_table(tuple(header), rows, out)
    olds = {r["tokens"]: r for r in records}
    for n, r in olds.items():
        line = f"old float32 path at {n} tokens: {r['old_s'] * 1e3:.3f} ms"
        if r["torch_s"] is not None:
            line += f"; torch float32: {r['torch_s'] * 1e3:.3f} ms"
            line += f" (the old path {r['old_in_torch_run_s'] * 1e3:.3f} ms in turns with it)"
        print(line, file=out)
    print(
        f"\nOne decode step of a SmolLM2-135M-shaped attention layer ({SMOLLM2['embed_dim']} → "
        f"{SMOLLM2['num_heads']}×{SMOLLM2['head_dim']} query / {SMOLLM2['num_kv_heads']}×{SMOLLM2['head_dim']} "
        f"K/V heads, no RoPE, batch 1) over a full ring of 'tokens' cached tokens, {threads} threads (numba and, "
        "with threadpoolctl, numpy's BLAS; torch the same). Median ms; each timed call reads 96 MiB of other "
        "memory first (weights and cache come from DRAM, as in a model). projections = Q/K/V (one product) + O; "
        "attention = cache.attend; rest = step − both (append, reshapes, Python). × = the other's time / this "
        "step's: old fp32 path = numpy float32 projections + scaled_dot_product_attention on the cache views, "
        "timed in turns with each row.",
        file=out,
    )
    print(file=out)
    print(
        f"1-token GQA decode call at {overhead['tokens']} cached tokens (H9/3 D64, float32, back to back): "
        f"cache.attend {overhead['attend'] * 1e6:.1f} µs (target ≤ {CALL_TARGET * 1e6:.0f}), "
        f"the numba kernel alone {overhead['kernel'] * 1e6:.1f} µs ({overhead['dispatch'] * 1e6:.1f} through "
        "numba's dispatcher), "
        f"beyond the kernel {overhead['beyond_kernel'] * 1e6:.1f} µs (target ≤ {BEYOND_KERNEL_TARGET * 1e6:.0f})",
        file=out,
    )
    print(
        "one-token KVCache.append (3 K/V heads × 64, float32 in): "
        + ", ".join(f"{d} {s * 1e6:.1f} µs" for d, s in appends.items())
        + f" (target ≤ {APPEND_TARGET * 1e6:.0f} µs each)",
        file=out,
    )


def run_layer(
    quick=False,
    threads=None,
    json_path=None,
    out=None,
    tokens=LAYER_TOKENS,
    formats=FORMATS,
    weight_formats=WEIGHT_FORMATS,
):
    """``python -m numba_attn bench --layer``: the SmolLM2-shaped layer decode step (``layer_results``),
    the per-call overhead of ``cache.attend`` (``call_overhead``) and one-token appends per format
    (``append_seconds``). Returns the exit status."""
    import json

    out = sys.stdout if out is None else out
    preload_baselines()
    threads = _check_threads(threads)
    if threads is None:
        return 2
    print(f"bench --layer: {threads} threads" + (", quick" if quick else ""), file=sys.stderr)
    limits = _blas_limits(threads)
    try:
        records = layer_results(
            threads, quick=quick, tokens=tokens, formats=formats, weight_formats=weight_formats, progress=_progress
        )
        _progress("call overhead and appends ...")
        overhead = dict(call_overhead(64, threads), tokens=64)
        appends = {d: append_seconds(d) for d in FORMATS}
    finally:
        if limits is not None:
            limits.unregister()
    print_layer(records, overhead, appends, threads, out)
    if json_path:
        with open(json_path, "w") as f:
            data = {"threads": threads, "layer": records, "call_overhead_s": overhead, "append_s": appends}
            json.dump(data, f, indent=2)
        print(f"wrote {json_path}", file=out)
    return 0
