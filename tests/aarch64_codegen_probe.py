"""Cross-compile numba_attn's inner loops for aarch64 with llvmlite and print the instructions used.

Run in a fresh process with NUMBA_LOOP_VECTORIZE=0 NUMBA_SLP_VECTORIZE=0: numba then hands over
optimised but still scalar IR, and LLVM's aarch64 pipeline vectorises it with the aarch64 cost model
(as numba itself would on a board). Prints one JSON object {probe: {cpu: {mnemonic: count}}}.

``assemble`` takes any LLVM triple (``scripts/mca_model.py`` also compiles for x86-64 CPUs), and
``LOOP_PROBES`` (the micro-kernels' inner loops, every storage format) are what that script models.
"""

import collections
import json
import re

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types

from numba_attn import config
from numba_attn.kernels import _vector_ir
from numba_attn.kernels._decode_tiles import (
    FOUR_ROW_VECTORS,
    key_scores,
    key_scores_q4,
    value_rows_1x4,
    value_rows_1x8,
    value_rows_3x1,
    value_rows_3x2,
    value_rows_3x4,
    value_rows_4x1,
    value_rows_4x2,
    value_rows_4x4,
    value_rows_q4_1x2,
)
from numba_attn.kernels._load import load
from numba_attn.kernels._prefill_tiles import VW, tile_add, tile_set
from numba_attn.kernels.quantised import int8_dot

#: the four-row value tile the decode kernel uses on this target (4 × FOUR_ROW_VECTORS vectors)
value_rows_four = {4: value_rows_4x4, 2: value_rows_4x2, 1: value_rows_4x1}[FOUR_ROW_VECTORS]
#: the three-row tile (a group of 3 query heads per K/V head, or the 3 left over after fours)
value_rows_three = {4: value_rows_3x4, 2: value_rows_3x2, 1: value_rows_3x1}[FOUR_ROW_VECTORS]

TRIPLE = "aarch64-unknown-linux-gnu"
CPUS = ("cortex-a76", "cortex-a72")  # Raspberry Pi 5 / Jetson Orin class, and Raspberry Pi 4


@njit(fastmath=config.FASTMATH)
def f32_dot(q, k):
    a = np.float32(0)
    for d in range(q.shape[0]):
        a += q[d] * load(k[d])
    return a


@njit(fastmath=config.FASTMATH)
def f16_dot(q, k):  # the same source as f32_dot, with float16 keys as uint16 bits
    a = np.float32(0)
    for d in range(q.shape[0]):
        a += q[d] * load(k[d])
    return a


@njit(fastmath=config.FASTMATH)
def i8_dot(a, b):
    return int8_dot(a, b, 0, a.shape[0])


@njit(fastmath=config.FASTMATH)
def prefill_tile(pt, vn, acct, nk):  # the prefill P·V register tile (4 columns × W rows)
    tile_add(vn, 0, 1, vn.shape[1], pt, 0, pt.shape[1], acct, 0, acct.shape[1], nk)


@njit(fastmath=config.FASTMATH)
def prefill_scores_tile(kn, qt, st, E):  # the prefill Q·Kᵀ register tile (4 keys × W query rows)
    tile_set(kn, 0, kn.shape[1], 1, qt, 0, qt.shape[1], st, 0, st.shape[1], E)


@njit(fastmath=config.FASTMATH)
def decode_scores(q, k, s):  # VW float32 or float16 keys' scores (shuffle butterfly)
    key_scores(q, 0, k, 0, k.shape[1], q, 0, 0, 0, k.shape[1], s, 0)


@njit(fastmath=config.FASTMATH)
def decode_scores_i8(q, k, ks, shift, s):  # VW int8 keys' scores, one scale per 2^shift entries
    key_scores(q, 0, k, 0, k.shape[1], ks, 0, ks.shape[1], shift, k.shape[1], s, 0)


@njit(fastmath=config.FASTMATH)
def decode_scores_q4(q, k, ks, block, s):  # VW 4-bit keys' scores, (step, min) float16 per block
    key_scores_q4(q, 0, k, 0, k.shape[1], ks, 0, ks.shape[1], block, q.shape[0], s, 0)


@njit(fastmath=config.FASTMATH)
def decode_values_1x4(p, v, vs, shift, acc, nk):  # one row × 4 vectors of float32/float16/int8 values
    value_rows_1x4(p, 0, p.shape[1], v, 0, v.shape[1], vs, 0, vs.shape[1], 0, shift, acc, 0, acc.shape[1], nk)


@njit(fastmath=config.FASTMATH)
def decode_values_1x8(p, v, vs, shift, acc, nk):  # one row × 8 vectors of float32 values (a head of its own)
    value_rows_1x8(p, 0, p.shape[1], v, 0, v.shape[1], vs, 0, vs.shape[1], 0, shift, acc, 0, acc.shape[1], nk)


@njit(fastmath=config.FASTMATH)
def decode_values_4x4(p, v, vs, shift, acc, nk):  # 4 rows (grouped heads) × FOUR_ROW_VECTORS vectors of values
    value_rows_four(p, 0, p.shape[1], v, 0, v.shape[1], vs, 0, vs.shape[1], 0, shift, acc, 0, acc.shape[1], nk)


@njit(fastmath=config.FASTMATH)
def decode_values_3x4(p, v, vs, shift, acc, nk):  # 3 rows × FOUR_ROW_VECTORS vectors of values
    value_rows_three(p, 0, p.shape[1], v, 0, v.shape[1], vs, 0, vs.shape[1], 0, shift, acc, 0, acc.shape[1], nk)


@njit(fastmath=config.FASTMATH)
def decode_values_q4(p, v, vs, block, acc, nk):  # one row × 2 byte vectors (4 vectors of columns) of 4-bit values
    value_rows_q4_1x2(p, 0, p.shape[1], v, 0, v.shape[1], vs, 0, vs.shape[1], 0, block, acc, 0, acc.shape[1], nk)


@njit
def gemv_int8_block(q, x, out, steps):  # one int8 GEMV panel: 64 outputs += Σ pairs of int8 codes × int16 pairs
    _vector_ir.madd_pairs_into(q, 0, 128, x, 0, steps, out, 0, 64)


@njit
def gemv_int4_block(q4, x, out, steps):  # one int4 GEMV panel: 64 outputs += Σ quads of 4-bit codes × int16
    _vector_ir.madd_nibble_quads_into(q4, 0, 128, x, 0, steps, out, 0, 64)


F32_2D, U16_2D, I8_2D = types.float32[:, ::1], types.uint16[:, ::1], types.int8[:, ::1]
U8_2D, F32_1D, I64 = types.uint8[:, ::1], types.float32[::1], types.int64
#: the vector-IR micro-kernels (run with NUMBA_ATTN_TILE=4x4, NEON's tile shape)
TILE_PROBES = {
    "prefill tile": (prefill_tile, (F32_2D, F32_2D, F32_2D, types.int64)),
    "decode scores float16": (decode_scores, (F32_1D, U16_2D, F32_1D)),
    "decode values int8": (decode_values_1x4, (F32_2D, I8_2D, F32_2D, I64, F32_2D, I64)),  # per-2^shift scales
}

#: every inner loop of the vector-IR micro-kernels, for ``scripts/mca_model.py`` (one step of each: see its
#: ``STEPS``); the value tiles take a scale array and shift (unused for float values)
LOOP_PROBES = {
    "prefill P·V tile": TILE_PROBES["prefill tile"],
    "prefill Q·Kᵀ tile": (prefill_scores_tile, (F32_2D, F32_2D, F32_2D, I64)),
    "decode scores float32": (decode_scores, (F32_1D, F32_2D, F32_1D)),
    "decode scores float16": TILE_PROBES["decode scores float16"],
    "decode scores int8": (decode_scores_i8, (F32_1D, I8_2D, F32_2D, I64, F32_1D)),
    "decode scores int4": (decode_scores_q4, (F32_1D, U8_2D, U16_2D, I64, F32_1D)),
    "decode values float32": (decode_values_1x4, (F32_2D, F32_2D, F32_2D, I64, F32_2D, I64)),
    "decode values float16": (decode_values_1x4, (F32_2D, U16_2D, F32_2D, I64, F32_2D, I64)),
    "decode values int8": TILE_PROBES["decode values int8"],
    "decode values int4": (decode_values_q4, (F32_2D, U8_2D, U16_2D, I64, F32_2D, I64)),
    "decode values float32 8 vectors": (decode_values_1x8, (F32_2D, F32_2D, F32_2D, I64, F32_2D, I64)),
    "decode values float32 4 rows": (decode_values_4x4, (F32_2D, F32_2D, F32_2D, I64, F32_2D, I64)),
    "decode values int8 4 rows": (decode_values_4x4, (F32_2D, I8_2D, F32_2D, I64, F32_2D, I64)),
    "decode values float32 3 rows": (decode_values_3x4, (F32_2D, F32_2D, F32_2D, I64, F32_2D, I64)),
    "decode values int8 3 rows": (decode_values_3x4, (F32_2D, I8_2D, F32_2D, I64, F32_2D, I64)),
}

PROBES = {
    "float32 dot": (f32_dot, (types.float32[::1], types.float32[::1])),
    "float16 load + dot": (f16_dot, (types.float32[::1], types.uint16[::1])),
    "int8 dot": (i8_dot, (types.int8[::1], types.int8[::1])),
    "int8 gemv pairs": (gemv_int8_block, (types.int8[::1], types.int16[::1], types.int32[::1], types.int64)),
    "int4 gemv quads": (gemv_int4_block, (types.uint8[::1], types.int16[::1], types.int32[::1], types.int64)),
}


def _portable_ir(ir, triple=TRIPLE):
    """The module's IR without host specifics: Python wrappers and NRT bodies become declarations."""
    out = []
    for block in re.split(r"(?m)^(?=define )", ir):
        head = block.split("\n", 1)[0]
        if block.startswith("define ") and ("@NRT_" in head or "cpython." in head or "cfunc." in head):
            decl = re.sub(
                r"^define\s+(?:(?:internal|linkonce_odr|weak_odr|private|dso_local|local_unnamed_addr|"
                r"unnamed_addr)\s+)*",
                "declare ",
                head,
            )
            decl = re.sub(r"\s*(#\d+\s*)?\{\s*$", "", decl)
            out.append(decl + "\n" + block[block.index("\n}\n") + 3 :])
        else:
            out.append(block)
    ir = "".join(out)
    ir = re.sub(r'target triple = "[^"]*"', f'target triple = "{triple}"', ir)
    ir = re.sub(r'target datalayout = "[^"]*"\n', "", ir)
    return re.sub(r'"target-cpu"="[^"]*"|"target-features"="[^"]*"|"tune-cpu"="[^"]*"', "", ir)


def assemble(ir, cpu, triple=TRIPLE):
    """``ir`` (a numba function's LLVM IR) optimised and vectorised at -O3 for ``cpu``, as assembly text."""
    mod = llvm.parse_assembly(_portable_ir(ir, triple))
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features="", opt=3)
    mod.triple = triple
    mod.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def aarch64_codegen():
    """Emit the int8 GEMV's pair products as an aarch64 build does (on an x86 host the x86 intrinsics would
    be chosen). Only in a process that compiles for the cross-compiler with numba_attn's cache off
    (``main``, ``scripts/mca_*.py`` workers): not at import, which pytest's doctest collection does in
    its own workers, where a cached kernel compiled with it would then be the slow generic build."""
    _vector_ir.MADD_KIND = "generic"


def main():
    aarch64_codegen()
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    result = {"VW": VW}
    for name, (fn, sig) in {**PROBES, **TILE_PROBES}.items():
        fn.compile(sig)
        ir = fn.inspect_llvm(sig)
        result[name] = {}
        for cpu in CPUS:
            asm = assemble(ir, cpu)
            counts = collections.Counter(re.findall(r"^\s+([a-z][a-z0-9.]*)\s", asm, re.M))
            # vector registers reloaded from the stack (a spilled accumulator comes back this way; the
            # wrappers only store zeros there)
            counts["vector spills"] = len(re.findall(r"^\s+(?:ldr|ldp|ldur)\s+q\d+.*\[sp", asm, re.M))
            result[name][cpu] = dict(counts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
