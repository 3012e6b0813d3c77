"""benchmarks/overhead.py: the reference programs of ``--decompose`` compute the step they
stand for (timings themselves are the benchmark's business, not the tests')."""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import scalify as sfy
from scalify.core.config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import overhead  # noqa: E402


def test_static_scale_programs_compute_the_step():
    step, plain, scaled = overhead.mlp_case(jnp.float32)
    want = jax.jit(step)(*plain)
    scalified = sfy.asarray(jax.jit(sfy.scalify(step))(*scaled))
    static = jax.jit(overhead.with_static_scales(step))
    for got in (scalified, sfy.asarray(static(*plain))):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    # Static input scales fold away: the scalified step's scalar scale inputs are gone.
    n_scalar_args = sum(np.ndim(a) == 0 for a in jax.tree.leaves(scaled))
    assert n_scalar_args > 0 and len(jax.make_jaxpr(static)(*plain).jaxpr.invars) == len(jax.tree.leaves(plain))

    def n_sums(jaxpr):
        return [e.primitive.name for e in jaxpr.jaxpr.eqns].count("reduce_sum")

    saved = get_config()
    measured = n_sums(jax.make_jaxpr(overhead.with_static_scales(step))(*plain))
    with overhead.static_sums():
        assert get_config().measured_min_reduced > 2**40
        fn = overhead.with_static_scales(step)
        assert n_sums(jax.make_jaxpr(fn)(*plain)) < measured  # no sums of squares
        got = sfy.asarray(jax.jit(fn)(*plain))
    assert get_config() is saved
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_measure_reports_the_decomposition():
    step, plain, scaled = overhead.mlp_case(jnp.float32)
    r = overhead.measure(step, plain, scaled, repeats=1, rounds=1, trace_rounds=1, decompose=True)
    assert set(r["decomposition"]) == {"static-scales", "static-sums"}
    for part in r["decomposition"].values():
        assert all(math.isfinite(v) and v > 0 for v in part.values())
    assert set(r["median_s"]) == {"jax", "scalify", "unguarded", "undeferred", "narrow", "scales_inlined",
                                  "static-scales", "static-sums"}
    assert set(r["ratio_scales_inlined"]) == {"compile", "run"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratio_unguarded"].values())
    assert set(r["ratio_undeferred"]) == {"trace", "compile", "run"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratio_undeferred"].values())
    assert set(r["ratio_narrow"]) == {"compile", "run"}
