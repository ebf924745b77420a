"""Modelled throughput of numba_attn's micro-kernel inner loops, by llvm-mca: NEON shown without a board.

What it does. ``tests/aarch64_codegen_probe.py`` compiles every vector-IR micro-kernel (``LOOP_PROBES``: the
prefill register tiles ``tile_add``/``tile_set``, and the decode key-score and value tiles for float32,
float16, int8 with its scales and 4-bit) with numba, then cross-compiles numba's IR with llvmlite for a
target CPU. This script takes the hot inner loop out of that assembly (a label that a backward branch
jumps to, innermost, the one with the most vector FMAs), runs ``llvm-mca -iterations=100`` on it for

    aarch64 (tile 4x4)          cortex-a72, cortex-a76
    x86-64 AVX2 (tile 8x2)      znver3
    x86-64 AVX-512 (tile 16x4)  skylake-avx512

(one subprocess per tile shape: the shape is frozen per process by ``NUMBA_ATTN_TILE``) and prints, per
loop: LLVM's unroll factor, instructions, modelled cycles and vector FMAs per *step* (one t of a prefill
tile, one chunk of VW entries of VW keys for decode scores, one key for decode values; a loop body that
LLVM unrolled U times is U steps), the share of the modelled FMA peak, the bottleneck (the busiest
execution units in llvm-mca's resource pressure, or "dependencies" when no unit is near saturation, or
"dispatch"), decode's modelled cycles per key at head dim E (``--head-dim``, default 128; for the value
tiles: per key for all of the tile's query rows), and the vector spills (vector registers stored to or
loaded from the stack inside the loop) and other stack accesses in it. ``--json FILE`` writes it all.

The FMA peak is llvm-mca's own: the cycles it models for a block of independent vector FMAs of the tile's
width (LLVM 14: 1 per cycle on the A57-class model and on znver3, 2 on skylake-avx512). FMAs per step count
every vector FMA in the loop, int4's dequantisation (code·step + min, one FMA per vector) included.

``--measure`` checks the x86 model against this machine: it times the float32 prefill P·V tile (``tile_add``,
T = 128 keys, B contiguous with stride W; all in L1) single-threaded as numba compiles it for the host,
converts seconds to cycles with the clock measured by a dependent chain of float64 adds (its cycles
per add modelled by llvm-mca for the host CPU; /proc/cpuinfo's MHz is printed beside it), and prints
measured cycles per step (per call / T, and the marginal cost per key from T = 64 to 128) against
llvm-mca's for the loop numba actually emitted (best of 9 interleaved timings, about 3 s: run it on a
quiet machine). On a Zen 3 it runs the tile at ~1.7 vector FMAs per cycle, where LLVM 14's znver3 model
allows one (it books each 256-bit FMA for two cycles of a pipe; llvm/llvm-project#59325): there the
model is pessimistic by up to 2× for FMA-bound loops, and its "peak" column is against its own peak.

Limits. llvm-mca models one loop iteration after another with every load an L1 hit and perfect branch
prediction; it ignores the front end (decode, micro-op cache, loop buffer) and the code outside the loop
(a tile's loads and stores of C, the decode scores' butterfly sum and the loop set-up, which matter for
short loops: decode's E/VW steps per call). Its scheduling models are approximations: LLVM 14 uses one
Cortex-A57-class model for both cortex-a72 and cortex-a76 (one 128-bit FMLA per cycle, 10 cycles of
latency); a real Cortex-A76 has two FMLA pipes with lower latency, so there the model is a lower bound on
speed. The cross-compiled code is what LLVM emits from numba's IR at -O3 for that CPU, as numba would on
it; ``--measure`` models numba's own host code.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE_DIR = ROOT / "tests"  # aarch64_codegen_probe.py: the probes and the cross-compiler

#: (name, LLVM triple, NUMBA_ATTN_TILE, CPUs): one subprocess each
TARGETS = (
    ("aarch64", "aarch64-unknown-linux-gnu", "4x4", ("cortex-a72", "cortex-a76")),
    ("x86-64 AVX2", "x86_64-unknown-linux-gnu", "8x2", ("znver3",)),
    ("x86-64 AVX-512", "x86_64-unknown-linux-gnu", "16x4", ("skylake-avx512",)),
)
#: the environment the probes are compiled in: numba's IR scalar, vectorised by the target's own pipeline
PROBE_ENV = {"NUMBA_LOOP_VECTORIZE": "0", "NUMBA_SLP_VECTORIZE": "0", "NUMBA_ATTN_CACHE": "0"}
ITERATIONS = 100


def find_llvm_mca():
    """Path of llvm-mca: $LLVM_MCA, else on the PATH, else the newest /usr/lib/llvm-*/bin/llvm-mca
    (Debian's llvm-N packages); None if there is none."""
    candidates = [os.environ.get("LLVM_MCA"), shutil.which("llvm-mca")]

    def version(path):
        m = re.search(r"llvm-(\d+)", path)
        return int(m.group(1)) if m else 0

    candidates += sorted(glob.glob("/usr/lib/llvm-*/bin/llvm-mca"), key=version, reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------------------------------------------------
# What one step of each loop is (names: LOOP_PROBES in tests/aarch64_codegen_probe.py)
# ---------------------------------------------------------------------------------------------------------------------


def step_of(probe, shape):
    """(vector FMAs in one step as the IR writes them, keys per step, entries of each key per step) of a
    probe's loop; keys is None for the prefill tiles (no per-key figure). ``shape``: the worker's VW, NV and
    (for the decode probes) ``_decode_tiles``' KEYS_PER_PASS and FOUR_ROW_VECTORS."""
    vw, nv = shape["VW"], shape["NV"]
    if probe.startswith("prefill"):
        return 4 * nv, None, None  # 4 rows of A × NV vectors of B
    if probe.startswith("decode scores"):
        keys = shape["KEYS_PER_PASS"]  # quantised keys: a block's sums, KEYS_PER_PASS keys at a time
        if probe.endswith("int4"):  # VW bytes = 2·VW entries (low and high codes) of each key
            return 2 * keys, keys, 2 * vw
        if probe.endswith("int8"):
            return keys, keys, vw
        return vw, vw, vw
    if probe.startswith("decode values"):
        if probe.endswith(" rows"):  # 4 (or 3) rows × FOUR_ROW_VECTORS vectors
            rows, vectors = int(probe.split()[-2]), shape["FOUR_ROW_VECTORS"]
            return rows * vectors, 1, vectors * vw
        if probe.endswith(" 8 vectors"):  # one row × 8 vectors (float32 values, a head of its own)
            return 8, 1, 8 * vw
        if probe.endswith("int4"):  # 2 byte vectors = 4 vectors of columns, each dequantised by an FMA
            return 4 + 4, 1, 4 * vw
        return 4, 1, 4 * vw
    raise KeyError(probe)


# ---------------------------------------------------------------------------------------------------------------------
# Assembly: the hot inner loop
# ---------------------------------------------------------------------------------------------------------------------


def _isa(triple):
    return "aarch64" if triple.startswith("aarch64") else "x86"


_LABEL = re.compile(r"^([.\w$]+):")
_INSTRUCTION = re.compile(r"^\s+([a-z][\w.]*)\b")
_TARGET = re.compile(r"(\.L\w+)\s*$")


def _vector_reg(isa, vw):
    return r"v\d+\.4s" if isa == "aarch64" else {4: r"%xmm\d+", 8: r"%ymm\d+", 16: r"%zmm\d+"}[vw]


def is_vector_fma(line, isa, vw):
    """A fused multiply-add on vectors of ``vw`` float32 lanes (NEON fmla, also by element; x86 vfmadd*ps)."""
    if isa == "aarch64":
        return re.match(rf"\s+fmla\s+{_vector_reg(isa, vw)}", line) is not None
    return bool(re.match(r"\s+vfn?m(add|sub)\d{3}ps\s", line) and re.search(_vector_reg(isa, vw), line))


def stack_access(line, isa):
    """'vector' for a vector register stored to or loaded from the stack (a spill), 'scalar' for another
    stack access, else None."""
    if isa == "aarch64":
        if not re.search(r"\[sp\b", line):
            return None
        return "vector" if re.match(r"\s+(ldr|str|ldp|stp|ldur|stur)\s+q\d+", line) else "scalar"
    if "(%rsp" not in line:
        return None
    return "vector" if re.search(r"%[xyz]mm\d+", line) else "scalar"


def _strip_comment(line, isa):
    return line.split("//")[0] if isa == "aarch64" else line.split("#")[0]


def hot_loop(asm, triple, is_work):
    """The innermost loop with the most instructions for which ``is_work(line)`` is true (the vector FMAs):
    its label line and its instruction lines, in order; None if no loop has one.

    A loop is a local label and the last branch back to it (LLVM lays an innermost loop out as one
    contiguous run of blocks ending in that branch); innermost: it contains no other such span."""
    isa = _isa(triple)
    lines = [_strip_comment(line, isa).rstrip() for line in asm.splitlines()]
    labels = {}
    ends = {}  # loop header line → its last backward branch
    for j, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = j
            continue
        if _INSTRUCTION.match(line):
            t = _TARGET.search(line)
            if t and t.group(1) in labels:  # a label already seen: a backward branch
                ends[labels[t.group(1)]] = j
    spans = list(ends.items())
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    best, best_work = None, 0
    for i, j in innermost:
        body = [line for line in lines[i + 1 : j + 1] if _INSTRUCTION.match(line)]
        work = sum(bool(is_work(line)) for line in body)
        if work > best_work:
            best, best_work = [lines[i], *body], work
    return best


# ---------------------------------------------------------------------------------------------------------------------
# llvm-mca
# ---------------------------------------------------------------------------------------------------------------------


def run_mca(mca, triple, cpu, code):
    """llvm-mca's summary of ``code`` (assembly text): cycles and micro-ops per iteration, the block's
    reciprocal throughput, the dispatch width, and the pressure on each execution unit per iteration."""
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write(code + "\n")
        f.flush()
        out = subprocess.run(
            [mca, f"-mtriple={triple.split('-')[0]}", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def number(key):
        return float(re.search(rf"^{key}:\s+([\d.]+)", out, re.M).group(1))

    iterations = number("Iterations")
    units = dict(re.findall(r"^\[([\d.]+)\]\s+-\s+(\S+)", out.split("Resources:", 1)[1].split("\n\n")[0], re.M))
    pressure_block = out.split("Resource pressure per iteration:", 1)[1].strip().splitlines()
    pressure = {
        units[key]: (0.0 if value == "-" else float(value))
        for key, value in zip(re.findall(r"\[([\d.]+)\]", pressure_block[0]), pressure_block[1].split())
    }
    return {
        "cycles": number("Total Cycles") / iterations,
        "uops": number("Total uOps") / iterations,
        "block_rthroughput": number("Block RThroughput"),
        "dispatch_width": number("Dispatch Width"),
        "pressure": pressure,
    }


def bottleneck(summary):
    """What limits the loop in llvm-mca's model: the execution units within 5 % of the busiest one when
    that one is busy ≥ 80 % of the cycles, dispatch when the micro-ops fill ≥ 95 % of the dispatch width,
    else dependencies (latency chains). Each with its busy share of the cycles."""
    cycles = summary["cycles"]
    parts = []
    top = max(summary["pressure"].values(), default=0.0)
    if top >= 0.8 * cycles:
        busiest = sorted(u for u, p in summary["pressure"].items() if p >= 0.95 * top)
        parts.append(f"{'/'.join(busiest)} {top / cycles:.0%}")
    if summary["uops"] >= 0.95 * summary["dispatch_width"] * cycles:
        parts.append(f"dispatch {summary['uops'] / cycles:.1f}/{summary['dispatch_width']:.0f}")
    if not parts:
        busiest = max(summary["pressure"], key=summary["pressure"].get)
        parts.append(f"dependencies (busiest {busiest} {top / cycles:.0%})")
    return ", ".join(parts)


def fma_peak(mca, triple, cpu, vw):
    """Vector FMAs per cycle in llvm-mca's model of ``cpu``: a block of independent FMAs (more than latency ×
    pipes of them, each into its own register)."""
    if _isa(triple) == "aarch64":
        code = [f"fmla v{i}.4s, v30.4s, v31.4s" for i in range(24)]
    else:
        reg = {4: "xmm", 8: "ymm", 16: "zmm"}[vw]
        n = 32 if reg == "zmm" else 16  # registers
        code = [f"vfmadd231ps %{reg}{n - 2}, %{reg}{n - 1}, %{reg}{i}" for i in range(n - 4)]
    return len(code) / run_mca(mca, triple, cpu, "\n".join(code))["cycles"]


def model_loop(mca, probe, triple, cpu, shape, asm, head_dim, peaks):
    """One row of the table: the hot loop of ``asm`` modelled on ``cpu`` (``shape``: see ``step_of``)."""
    vw, nv = shape["VW"], shape["NV"]
    isa = _isa(triple)
    row = {"probe": probe, "triple": triple, "cpu": cpu, "tile": f"{vw}x{nv}"}
    loop = hot_loop(asm, triple, lambda line: is_vector_fma(line, isa, vw))
    if loop is None:
        row["error"] = "no loop with vector FMAs found"
        return row
    body = loop[1:]
    fmas = sum(is_vector_fma(line, isa, vw) for line in body)
    step_fmas, keys, entries = step_of(probe, shape)
    unroll = fmas / step_fmas
    if unroll != int(unroll):
        row["error"] = f"{fmas} vector FMAs in the loop: not a whole number of steps of {step_fmas}"
        return row
    unroll = int(unroll)
    summary = run_mca(mca, triple, cpu, "\n".join(loop))
    key = (triple, cpu, vw)
    if key not in peaks:
        peaks[key] = fma_peak(mca, triple, cpu, vw)
    cycles = summary["cycles"] / unroll
    accesses = [stack_access(line, isa) for line in body]
    row.update(
        unroll=unroll,
        instructions_per_step=len(body) / unroll,
        cycles_per_step=cycles,
        block_rthroughput_per_step=summary["block_rthroughput"] / unroll,
        fmas_per_step=fmas / unroll,
        fma_peak_per_cycle=peaks[key],
        fma_share=fmas / unroll / (cycles * peaks[key]),
        bottleneck=bottleneck(summary),
        cycles_per_key=None if keys is None else cycles / keys * head_dim / entries,
        vector_spills=accesses.count("vector"),
        stack_accesses=accesses.count("scalar"),
        loop=loop,
    )
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Subprocess workers (numba, with the tile shape frozen per process)
# ---------------------------------------------------------------------------------------------------------------------


def _import_probe():
    sys.path.insert(0, str(PROBE_DIR))
    import aarch64_codegen_probe

    return aarch64_codegen_probe


def emit_worker(triple, cpus):
    """Print {VW, NV, KEYS_PER_PASS, FOUR_ROW_VECTORS, asm: {probe: {cpu: assembly}}} for LOOP_PROBES compiled
    for ``triple``/``cpus``."""
    import llvmlite.binding as llvm

    from numba_attn import config
    from numba_attn.kernels import _decode_tiles

    probe = _import_probe()
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    asm = {}
    for name, (fn, sig) in probe.LOOP_PROBES.items():
        fn.compile(sig)
        ir = fn.inspect_llvm(sig)
        asm[name] = {cpu: probe.assemble(ir, cpu, triple) for cpu in cpus}
    shape = {
        "VW": config.TILE_VW,
        "NV": config.TILE_NV,
        "KEYS_PER_PASS": _decode_tiles.KEYS_PER_PASS,
        "FOUR_ROW_VECTORS": _decode_tiles.FOUR_ROW_VECTORS,
    }
    print(json.dumps({**shape, "asm": asm}))


def _worker(args, extra_env):
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # the numba_attn beside this script
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model(mca, head_dim):
    rows, peaks = [], {}
    for _, triple, tile, cpus in TARGETS:
        compiled = _worker(["--emit-worker", triple, ",".join(cpus)], {**PROBE_ENV, "NUMBA_ATTN_TILE": tile})
        for cpu in cpus:
            for probe, by_cpu in compiled["asm"].items():
                rows.append(model_loop(mca, probe, triple, cpu, compiled, by_cpu[cpu], head_dim, peaks))
    return rows


def measure_worker():
    """Time the float32 prefill P·V tile and a float64 add chain as numba compiles them for this host; print
    the timings and the assembly that ran."""
    import time

    import llvmlite.binding as llvm
    import numpy as np
    from numba import njit

    from numba_attn import config

    probe = _import_probe()
    W = config.TILE_VW * config.TILE_NV

    @njit(fastmath=config.FASTMATH)
    def repeat_tile(pt, vn, acct, nk, reps):
        for _ in range(reps):
            probe.prefill_tile(pt, vn, acct, nk)

    @njit
    def add_chain(n, x, y):  # n dependent float64 adds (no fast-math: nothing reassociates them)
        for _ in range(n):
            x = x + y
        return x

    rng = np.random.default_rng(0)
    T, Ev = 128, 64
    pt = rng.uniform(0.5, 1.0, (T, W)).astype(np.float32)  # B: T rows of W, stride W
    vn = rng.uniform(0.5, 1.0, (T, Ev)).astype(np.float32)  # A[i, t] = vn[t, i]
    acct = np.zeros((4, W), np.float32)

    reps, n = 100_000, 20_000_000  # about 20 ms per timing
    repeat_tile(pt, vn, acct, T, 1)  # compile
    add_chain(1, 0.0, 1e-9)
    timings = {"chain": [], 64: [], T: []}
    for _ in range(9):  # interleaved, so that each sees the same clock and the same neighbours; best of 9
        t0 = time.perf_counter()
        add_chain(n, 0.0, 1e-9)
        timings["chain"].append(time.perf_counter() - t0)
        for t in (64, T):
            t0 = time.perf_counter()
            repeat_tile(pt, vn, acct, t, reps)
            timings[t].append((time.perf_counter() - t0) / reps)
    per_call = {t: min(timings[t]) for t in (64, T)}
    chain = min(timings["chain"])
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read()).group(1))
    except (OSError, AttributeError):
        pass
    sig = repeat_tile.signatures[0]
    print(
        json.dumps(
            {
                "cpu": llvm.get_host_cpu_name(),
                "VW": config.TILE_VW,
                "NV": config.TILE_NV,
                "T": T,
                "seconds_per_call": {str(t): s for t, s in per_call.items()},
                "tile_asm": repeat_tile.inspect_asm(sig),
                "chain_adds": n,
                "chain_seconds": chain,
                "chain_asm": add_chain.inspect_asm(add_chain.signatures[0]),
                "cpuinfo_mhz": mhz,
            }
        )
    )


def measure(mca, rows):
    """Measured against modelled cycles per step of the float32 prefill P·V tile on this host."""
    m = _worker(["--measure-worker"], {"NUMBA_ATTN_CACHE": "0"})
    triple, cpu, vw, nv = "x86_64-unknown-linux-gnu", m["cpu"], m["VW"], m["NV"]
    # the clock: llvm-mca's cycles per iteration of the add chain's loop over seconds per add
    is_add = re.compile(r"\s+v?addsd\s").match
    chain_loop = hot_loop(m["chain_asm"], triple, is_add)
    adds = sum(bool(is_add(line)) for line in chain_loop[1:])
    chain_cycles_per_add = run_mca(mca, triple, cpu, "\n".join(chain_loop))["cycles"] / adds
    hz = chain_cycles_per_add * m["chain_adds"] / m["chain_seconds"]
    modelled = model_loop(mca, "prefill P·V tile", triple, cpu, m, m["tile_asm"], 0, {})
    T = m["T"]
    per_call = {int(t): s for t, s in m["seconds_per_call"].items()}
    result = {
        "cpu": cpu,
        "tile": f"{vw}x{nv}",
        "T": T,
        "clock_ghz": hz / 1e9,
        "chain_cycles_per_add": chain_cycles_per_add,
        "cpuinfo_mhz": m["cpuinfo_mhz"],
        "measured_cycles_per_step": per_call[T] * hz / T,
        "measured_marginal_cycles_per_step": (per_call[T] - per_call[64]) * hz / (T - 64),
        "modelled_cycles_per_step": modelled.get("cycles_per_step"),
        "modelled_bottleneck": modelled.get("bottleneck"),
        "modelled_unroll": modelled.get("unroll"),
        "fmas_per_step": modelled.get("fmas_per_step"),
        "fma_peak_per_cycle": modelled.get("fma_peak_per_cycle"),
    }
    cross = [r for r in rows if r["probe"] == "prefill P·V tile" and r["cpu"] == cpu and r["tile"] == f"{vw}x{nv}"]
    if cross and "cycles_per_step" in cross[0]:
        result["cross_compiled_modelled_cycles_per_step"] = cross[0]["cycles_per_step"]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def table(rows, head_dim):
    lines = []
    header = (
        f"{'loop':<30} {'cpu':<15} {'tile':>5} {'unroll':>6} {'instr':>6} {'cycles':>7} {'FMAs':>5} "
        f"{'peak':>5} {'cyc/key':>8} {'spills':>6} {'stack':>5}  bottleneck"
    )
    lines.append(f"per step (see the docstring); cycles per key at head dim {head_dim}")
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        if "error" in r:
            lines.append(f"{r['probe']:<30} {r['cpu']:<15} {r['tile']:>5}  {r['error']}")
            continue
        lines.append(
            f"{r['probe']:<30} {r['cpu']:<15} {r['tile']:>5} {r['unroll']:>6} {r['instructions_per_step']:>6.1f} "
            f"{r['cycles_per_step']:>7.2f} {r['fmas_per_step']:>5.1f} {r['fma_share']:>5.0%} "
            f"{_fmt(r['cycles_per_key'], '>8.2f')} {r['vector_spills']:>6} {r['stack_accesses']:>5}  {r['bottleneck']}"
        )
    return "\n".join(lines)


def measure_text(m):
    return "\n".join(
        [
            f"measured on this host ({m['cpu']}, tile {m['tile']}, float32 prefill P·V tile, T = {m['T']}, 1 thread):",
            f"  clock {m['clock_ghz']:.2f} GHz (add chain, {m['chain_cycles_per_add']:.2f} modelled cycles per add; "
            f"/proc/cpuinfo {_fmt(m['cpuinfo_mhz'], '.0f')} MHz)",
            f"  modelled (llvm-mca -mcpu={m['cpu']}, numba's host code, unroll {m['modelled_unroll']}): "
            f"{_fmt(m['modelled_cycles_per_step'], '.2f')} cycles per step ({m['modelled_bottleneck']})"
            + (
                f"; cross-compiled probe: {m['cross_compiled_modelled_cycles_per_step']:.2f}"
                if "cross_compiled_modelled_cycles_per_step" in m
                else ""
            ),
            f"  measured: {m['measured_cycles_per_step']:.2f} cycles per step (per call / T), "
            f"{m['measured_marginal_cycles_per_step']:.2f} marginal (T = 64 → {m['T']}): "
            f"{m['fmas_per_step'] / m['measured_cycles_per_step']:.2f} vector FMAs per cycle "
            f"(the model's peak: {m['fma_peak_per_cycle']:.2f})",
            f"  measured / modelled: {m['measured_cycles_per_step'] / m['modelled_cycles_per_step']:.2f}",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows (and the measurement) as JSON")
    parser.add_argument("--head-dim", type=int, default=128, help="E for decode's cycles per key (default 128)")
    parser.add_argument("--measure", action="store_true", help="time the x86 prefill tile here against the model")
    parser.add_argument("--emit-worker", nargs=2, metavar=("TRIPLE", "CPUS"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.emit_worker:
        emit_worker(args.emit_worker[0], args.emit_worker[1].split(","))
        return 0
    if args.measure_worker:
        measure_worker()
        return 0
    mca = find_llvm_mca()
    if mca is None:
        print("llvm-mca not found (PATH, $LLVM_MCA, /usr/lib/llvm-*/bin): apt-get install llvm-14", file=sys.stderr)
        return 2
    version = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"LLVM version ([\d.]+)", version)
    rows = model(mca, args.head_dim)
    print(f"llvm-mca {version.group(1) if version else '?'} ({mca}), {ITERATIONS} iterations")
    print(table(rows, args.head_dim))
    result = {"llvm_mca": mca, "head_dim": args.head_dim, "rows": rows}
    if args.measure:
        result["measure"] = measure(mca, rows)
        print()
        print(measure_text(result["measure"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
