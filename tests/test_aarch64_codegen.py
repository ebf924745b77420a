"""The vector instructions numba_attn relies on, checked for aarch64 (Raspberry Pi 4/5, Jetson) by
cross-compiling the kernels' inner loops with llvmlite on any host (see aarch64_codegen_probe.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("aarch64_codegen_probe.py")


@pytest.fixture(scope="module")
def asm_counts():
    env = dict(
        os.environ, NUMBA_LOOP_VECTORIZE="0", NUMBA_SLP_VECTORIZE="0", NUMBA_ATTN_CACHE="0", NUMBA_ATTN_TILE="4x4"
    )  # the tile shape numba_attn picks on an aarch64 host
    # the numba_attn beside these tests, not whichever one is installed
    env["PYTHONPATH"] = str(PROBE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_float32_dot_uses_vector_fma(asm_counts, cpu):
    assert asm_counts["float32 dot"][cpu].get("fmla", 0) > 0


@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_float16_loads_convert_with_fcvtl(asm_counts, cpu):
    ops = asm_counts["float16 load + dot"][cpu]
    assert ops.get("fcvtl", 0) + ops.get("fcvtl2", 0) > 0
    assert ops.get("fmla", 0) > 0


def test_int8_dot_uses_sdot_on_cortex_a76(asm_counts):
    assert asm_counts["int8 dot"]["cortex-a76"].get("sdot", 0) > 0


def test_int8_dot_uses_widening_multiplies_on_cortex_a72(asm_counts):
    ops = asm_counts["int8 dot"]["cortex-a72"]
    assert "sdot" not in ops  # the A72 (Armv8.0) has no dot-product instructions
    assert ops.get("smull", 0) + ops.get("smull2", 0) + ops.get("smlal", 0) + ops.get("smlal2", 0) > 0


@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_int8_gemv_pairs_accumulate_with_smlal(asm_counts, cpu):
    """The int8 GEMV's int8 × int16 products (``madd_pairs_into``, generic IR on aarch64) are widening
    multiply-accumulates (smlal/smlal2) into registers, the pairs summed once per block (addp), nothing
    spilled and no float conversion per weight."""
    ops = asm_counts["int8 gemv pairs"][cpu]
    assert ops.get("smlal", 0) + ops.get("smlal2", 0) >= 16, ops
    assert ops.get("addp", 0) > 0 and ops["vector spills"] == 0, ops
    assert "scvtf" not in ops and "fmla" not in ops, ops


@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_int4_gemv_takes_nibbles_apart_in_registers(asm_counts, cpu):
    """The int4 GEMV's products (``madd_nibble_quads_into``, generic IR on aarch64) take the 4-bit codes
    apart with vector and/shift (no byte loop: no ldrb/strb) and accumulate with widening
    multiply-adds in registers: nothing spilled, no float conversion per weight."""
    ops = asm_counts["int4 gemv quads"][cpu]
    assert ops.get("ushr", 0) + ops.get("ushll", 0) + ops.get("ushll2", 0) > 0, ops
    assert ops.get("smlal", 0) + ops.get("smlal2", 0) + ops.get("mla", 0) >= 16, ops
    assert "ldrb" not in ops and "strb" not in ops and ops["vector spills"] == 0, ops
    assert "scvtf" not in ops and "fmla" not in ops, ops


@pytest.mark.parametrize("probe", ["prefill tile", "decode scores float16", "decode values int8"])
@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72"])
def test_vector_ir_micro_kernels_stay_in_neon_registers(asm_counts, probe, cpu):
    """The LLVM vector-IR micro-kernels (4-lane tiles on aarch64) compile to NEON fused multiply-adds
    with every accumulator in a register: no vector spills to the stack."""
    assert asm_counts["VW"] == 4
    ops = asm_counts[probe][cpu]
    assert ops.get("fmla", 0) >= 4, ops
    assert ops["vector spills"] == 0, ops
    if probe == "decode scores float16":
        assert ops.get("fcvtl", 0) + ops.get("fcvtl2", 0) > 0


def test_importing_the_probe_leaves_this_process_codegen_alone():
    """pytest's doctest collection imports the probe module in its workers: importing it must not switch
    ``multiply_add_pairs`` to the generic (aarch64) IR there, or every int8 LinearWeight kernel compiled
    afterwards in that worker, and written to the on-disk cache, would be the slow x86 build of it."""
    import importlib.util

    from numba_attn.kernels import _vector_ir as vir

    spec = importlib.util.spec_from_file_location("probe_import_check", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert vir.MADD_KIND == vir._madd_kind()
