"""benchmarks/fuzz.py: random programs through `jit(scalify(f))` agree with float32 JAX.

A fixed-seed sample of the differential fuzzer's cases must show no contract violation:
no ``nonfinite``, no ``inaccurate``, no ``error``, and ``unsupported`` only for the
primitives `fuzz.DOCUMENTED_UNSUPPORTED` names. A failing case reruns verbosely with
``python benchmarks/fuzz.py --case SEED:INDEX``.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fuzz  # noqa: E402

SEED = 0  # the first N_CASES cases of `python benchmarks/fuzz.py --seed 0`
# About 1.5 s per case on one core under pytest (compiling the case's two programs is most
# of it; failing cases cost more): 40 cases take about 60-80 s.
N_CASES = 40


def test_cases_are_reproducible_from_seed_and_index():
    a, b = fuzz.draw_case(SEED, 7), fuzz.draw_case(SEED, 7)
    assert a.key == b.key and [op.label for op in a.ops] == [op.label for op in b.ops]
    assert all(np.array_equal(x, y) for x, y in zip(a.values, b.values))
    assert fuzz.draw_case(SEED, 8).key != a.key


def test_host_inputs_are_those_of_as_scaled_array():
    """The fuzzer converts its inputs on the host (`fuzz.scaled_inputs`), to spare a
    compilation per shape: bit for bit what `sfy.as_scaled_array` / `sfy.asarray` give,
    all-zero, heavy-tailed and float8 inputs included."""
    kinds = set()
    for i in range(15):
        case = fuzz.draw_case(SEED, i)
        scaled, x32 = fuzz.scaled_inputs(case)
        dtype = fuzz.DTYPES[case.dtype]
        want, want32 = jax.jit(lambda v: (s := sfy.as_scaled_array(v, dtype=dtype), sfy.asarray(s, dtype=jnp.float32)))(
            [jnp.asarray(v) for v in case.values])
        for inp, got, w, g32, w32 in zip(case.inputs, scaled, want, x32, want32):
            if isinstance(w, sfy.ScaledArray):
                kinds.add((inp.dist, case.dtype))
                assert float(got.scale) == float(w.scale), (case.name, inp.describe())
                assert got.dtype == w.dtype
                np.testing.assert_array_equal(np.asarray(got.data).astype(np.float32),
                                              np.asarray(w.data).astype(np.float32))
            np.testing.assert_array_equal(np.asarray(g32), np.asarray(w32))
    assert {d for d, _ in kinds} == {"normal", "zeros", "student_t", "outliers"}


def test_oracle_is_exact_on_data_movement_and_sees_conditioning():
    """The oracle behind the tolerance: data movement costs nothing; ``exp`` of large
    values costs more than one rounding (its condition number is the value)."""
    def case_of(names, scale):
        case = fuzz.draw_case(SEED, 0)
        ctx = fuzz.Ctx("float16", "fwd")
        rng = np.random.default_rng(0)
        shape, ops = (4, 8), []
        for name in names:
            op = fuzz.OPS[name](rng, shape, ctx)
            ops.append(op)
            shape = op.out_shape
        x0 = fuzz.Input("float", (4, 8), exp=0, role="x")
        values = [np.asarray(rng.standard_normal((4, 8)) * scale, np.float32)]
        values += [fuzz._values(i, rng) for op in ops for i in op.inputs]
        return fuzz.Case(case.seed, case.index, "fwd", "float16", x0, ops, None, values)

    def oracle_error(case):
        _, x32 = fuzz.scaled_inputs(case)
        ref, orc = jax.jit(lambda *x: (fuzz.program(case)(*x), fuzz.oracle(case)(*x)))(*x32)
        return fuzz.rel_err(np.asarray(orc, np.float64), np.asarray(ref, np.float64))

    assert oracle_error(case_of(["transpose", "reshape", "neg"], 1.0)) == 0
    # exp(x * x): the rounding of x * x (relative 2**-11 at most) is amplified by x * x.
    small, large = (oracle_error(case_of(["mul_self", "exp"], s)) for s in (0.1, 3.0))
    assert small < 2.0**-11 < 2 * 2.0**-11 < large


@pytest.mark.slow
def test_fuzz_sample_keeps_the_contract():
    results = fuzz.run(SEED, N_CASES, progress=False)
    counts = results["counts"]
    assert sum(counts.values()) == N_CASES
    # The sample must exercise the contract, not skip it.
    assert counts["ok"] >= N_CASES // 2, counts
    bad = []
    for f in results["failures"]:
        if f["cls"] == "unsupported" and f.get("primitive") in fuzz.DOCUMENTED_UNSUPPORTED:
            continue
        bad.append(f"  {f['cls']:<11} case {f['case']} ({f['mode']}, {f['dtype']}) "
                   f"culprit {f.get('culprit', '?')}: {' -> '.join(f['ops'])}"
                   + (f"  [{f['error']}]" if "error" in f else f"  err {f.get('err')} > tol {f.get('tol')}"
                      if "err" in f else ""))
    assert not bad, (f"{len(bad)} contract violation(s) in {N_CASES} fuzzed cases "
                     f"(rerun one with `python benchmarks/fuzz.py --case SEED:INDEX`):\n" + "\n".join(bad))
