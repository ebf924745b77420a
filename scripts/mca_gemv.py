"""The int8 GEMV's inner loop modelled with llvm-mca: the int16 × int8 pair products (``madd_pairs_into``)
against the float path it replaced (each weight converted to float32 and FMA'd), per multiply-add.

    NUMBA_LOOP_VECTORIZE=0 NUMBA_SLP_VECTORIZE=0 NUMBA_ATTN_CACHE=0 python scripts/mca_gemv.py

Prints, for cortex-a72/a76 (the generic IR NEON gets) and znver3/skylake-avx512 (x86's ``vpmaddwd``):
instructions and modelled cycles of the hot loop, and multiply-adds per cycle. Each target compiles in
its own subprocess (``MADD_KIND`` is read when a kernel compiles). Needs llvm-mca (LLVM 14 was used).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "generic": [("aarch64-unknown-linux-gnu", "cortex-a72"), ("aarch64-unknown-linux-gnu", "cortex-a76")],
    "avx2": [("x86_64-unknown-linux-gnu", "znver3"), ("x86_64-unknown-linux-gnu", "skylake-avx512")],
}
#: multiply-adds in one run of each loop body's work instructions: (pattern, products per instruction)
WORK = {
    "aarch64": (r"\b(smlal2?|fmla)\s", {"smlal": 4, "smlal2": 4, "fmla": 4}),
    "x86": (r"\b(vpmaddwd|vfmadd\w+ps)\s", {"vpmaddwd": 16}),
}


def worker(kind):
    import llvmlite.binding as llvm
    import numpy as np
    from numba import njit, types

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
    import mca_model

    import aarch64_codegen_probe as probe
    from numba_attn import config
    from numba_attn.kernels import _vector_ir as vir

    vir.MADD_KIND = kind
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()

    @njit
    def pairs(q, x, out, steps):  # one panel, 64 outputs: Σ over steps of int8 code pairs × int16 pairs
        vir.madd_pairs_into(q, 0, 128, x, 0, steps, out, 0, 64)

    @njit(fastmath=config.FASTMATH)
    def floats(qp, x, part, k0):  # the replaced loop: 32 inputs × 64 outputs, each code → float32, FMA
        for k in range(k0, k0 + 32, 4):
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            w0, w1, w2, w3 = qp[k], qp[k + 1], qp[k + 2], qp[k + 3]
            for t in range(64):
                part[t] += (
                    x0 * np.float32(w0[t]) + x1 * np.float32(w1[t]) + x2 * np.float32(w2[t]) + x3 * np.float32(w3[t])
                )

    loops = {
        "int16 x int8 pairs": (pairs, (types.int8[::1], types.int16[::1], types.int32[::1], types.int64)),
        "float (before)": (floats, (types.int8[:, ::1], types.float32[::1], types.float32[::1], types.int64)),
    }
    mca = mca_model.find_llvm_mca()
    rows = []
    for triple, cpu in TARGETS[kind]:
        isa = "aarch64" if triple.startswith("aarch64") else "x86"
        pattern, lanes = WORK[isa]
        for name, (fn, sig) in loops.items():
            fn.compile(sig)
            asm = probe.assemble(fn.inspect_llvm(sig), cpu, triple)
            loop = mca_model.hot_loop(asm, triple, lambda line, p=pattern: re.search(p, line))
            body = loop[1:]
            macs = 0
            for line in body:
                m = re.search(pattern, line)
                if m:
                    op = m.group(1)
                    if op.startswith("vfmadd"):
                        macs += 16 if "%zmm" in line else 8 if "%ymm" in line else 4
                    else:
                        macs += lanes[op]
            summary = mca_model.run_mca(mca, triple, cpu, "\n".join(loop))
            rows.append(
                {
                    "cpu": cpu,
                    "loop": name,
                    "instructions": len(body),
                    "multiply_adds": macs,
                    "cycles": summary["cycles"],
                    "macs_per_cycle": macs / summary["cycles"],
                }
            )
    print(json.dumps(rows))


def main():
    env = dict(os.environ, NUMBA_LOOP_VECTORIZE="0", NUMBA_SLP_VECTORIZE="0", NUMBA_ATTN_CACHE="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"{'cpu':16} {'loop':20} {'instr':>6} {'MACs':>6} {'cycles':>8} {'MACs/cycle':>10}")
    for kind in TARGETS:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind], env=env, capture_output=True, text=True, check=True
        )
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            print(
                f"{r['cpu']:16} {r['loop']:20} {r['instructions']:6d} {r['multiply_adds']:6d} "
                f"{r['cycles']:8.1f} {r['macs_per_cycle']:10.2f}"
            )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
