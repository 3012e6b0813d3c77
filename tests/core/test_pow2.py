import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core import pow2

MODES = [sfy.Pow2RoundMode.DOWN, sfy.Pow2RoundMode.UP, sfy.Pow2RoundMode.STOCHASTIC]
DTYPES = [np.float32, np.float16, jnp.bfloat16]


def _values(dtype):
    fi = jnp.finfo(dtype)
    rng = np.random.default_rng(0)
    v = np.exp2(rng.uniform(np.log2(float(fi.tiny)) + 1, np.log2(float(fi.max)) - 1, 200))
    return np.asarray(v, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [True, False])
def test_round_down_up_bracket_value(dtype, static):
    x = _values(dtype)
    xin = x if static else jnp.asarray(x)
    down = np.asarray(pow2.pow2_round_down(xin)).astype(np.float64)
    up = np.asarray(pow2.pow2_round_up(xin)).astype(np.float64)
    xf = x.astype(np.float64)
    assert np.all(down <= xf) and np.all(xf < 2 * down)
    assert np.all(up >= xf) and np.all(xf > up / 2)
    for arr in (down, up):
        m, _ = np.frexp(arr)
        np.testing.assert_array_equal(m, 0.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [True, False])
def test_exact_powers_unchanged(mode, dtype, static):
    fi = jnp.finfo(dtype)
    e = np.arange(int(np.log2(float(fi.tiny))), int(np.log2(float(fi.max))) + 1)
    x = np.exp2(e.astype(np.float64)).astype(dtype)
    xin = x if static else jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(pow2.pow2_round(xin, mode)), x)


@pytest.mark.parametrize("static", [True, False])
def test_static_stays_numpy_and_matches_jax(static):
    x = _values(np.float32)
    out_np = pow2.pow2_round_stochastic(x)
    assert isinstance(out_np, np.ndarray)
    out_jax = pow2.pow2_round_stochastic(jnp.asarray(x))
    out_jit = jax.jit(pow2.pow2_round_stochastic)(jnp.asarray(x))
    np.testing.assert_array_equal(out_np, np.asarray(out_jax))
    np.testing.assert_array_equal(out_np, np.asarray(out_jit))


def test_stochastic_rounding_is_unbiased_on_average():
    rng = np.random.default_rng(1)
    # Values 1.25 * 2^k with varied bits: expectation of the rounding is the value itself.
    x = (1.25 + rng.uniform(-1e-3, 1e-3, 20000)).astype(np.float32)
    r = pow2.pow2_round_stochastic(x)
    assert set(np.unique(r)) == {1.0, 2.0}
    assert abs(r.mean() - x.mean()) < 0.02
    assert 0.2 < np.mean(r == 2.0) < 0.3


def test_special_values_pass_through():
    x = np.array([0.0, np.inf, np.nan], np.float32)
    for fn in (pow2.pow2_round_down, pow2.pow2_round_up, pow2.pow2_round_stochastic):
        out = np.asarray(fn(jnp.asarray(x)))
        assert out[0] == 0 and out[1] == np.inf and np.isnan(out[2])


def test_none_mode_is_identity_and_config_default():
    x = np.float32(3.0)
    assert pow2.pow2_round(x, sfy.Pow2RoundMode.NONE) == 3.0
    assert pow2.pow2_round(x) == 2.0  # default DOWN
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        assert pow2.pow2_round(x) == 4.0
    assert pow2.pow2_round(x) == 2.0


def test_mantissa_and_is_pow2():
    x = np.array([3.0, -6.0, 0.75, 1.0], np.float32)
    np.testing.assert_array_equal(pow2.get_mantissa(x), [1.5, -1.5, 1.5, 1.0])
    np.testing.assert_array_equal(np.asarray(pow2.is_pow2(jnp.asarray(x))), [False, False, False, True])


@pytest.mark.parametrize("dtype", DTYPES)
def test_floor_and_reciprocal_of_every_normal_power_of_two_are_exact(dtype):
    fi = jnp.finfo(dtype)
    p = np.exp2(np.arange(int(fi.minexp), int(fi.maxexp))).astype(dtype)  # all normal 2**k
    x = (p.astype(np.float64) * 1.75).astype(dtype)[:-1]  # same exponents, mantissa 1.75
    floor = np.asarray(jax.jit(pow2.pow2_floor)(jnp.asarray(x)))
    np.testing.assert_array_equal(floor, p[:-1])
    recip = np.asarray(jax.jit(pow2.pow2_reciprocal)(jnp.asarray(p))).astype(np.float64)
    # 1 / 2**emax is subnormal in the scale's own dtype, and still exact.
    np.testing.assert_array_equal(recip, 1.0 / p.astype(np.float64))
    assert pow2.pow2_reciprocal(np.float32(0.25)) == 4.0  # static values fold in NumPy


def test_floor_and_reciprocal_carry_no_gradient():
    g = jax.grad(lambda s: pow2.pow2_floor(s) + pow2.pow2_reciprocal(s))(jnp.float32(4.0))
    assert g == 0


def _normal_values(dtype):
    """Every normal exponent of ``dtype``, each with mantissas 1, 1.25 and 1.875."""
    fi = jnp.finfo(dtype)
    e = np.arange(int(fi.minexp), int(fi.maxexp), dtype=np.float64)
    v = np.concatenate([np.exp2(e) * m for m in (1.0, 1.25, 1.875)])
    v = v[v <= float(fi.max)].astype(dtype)
    return v, v.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_and_mantissa_bit_formulas_are_exact(dtype):
    """The bit formulas that replace a square root or a division of a traced scale agree
    with float64 at every normal exponent, powers of two and not."""
    x, x64 = _normal_values(dtype)
    down = np.exp2(np.floor(np.log2(np.sqrt(x64))))
    p, inv = jax.jit(jax.vmap(pow2.pow2_sqrt_down))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(p, np.float64), down)
    np.testing.assert_array_equal(np.asarray(inv, np.float64), 1.0 / down)
    r = jax.jit(jax.vmap(pow2.pow2_rsqrt_down))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(r, np.float64), np.exp2(np.floor(np.log2(1.0 / np.sqrt(x64)))))
    m = jax.jit(pow2.mantissa)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(m, np.float64), x64 / np.exp2(np.floor(np.log2(x64))))


def test_scalar_helpers_are_one_jit_equation_traced_once():
    """Each helper binds one `jit` per call (its ~10 scalar primitives are traced once per
    dtype), so a trace with many alignments stays cheap."""
    for fn in (pow2.pow2_floor_and_reciprocal, pow2.pow2_sqrt_down, pow2.pow2_rsqrt_down):
        eqns = jax.make_jaxpr(fn)(jnp.float32(3.0)).jaxpr.eqns
        assert [e.primitive.name for e in eqns] == ["jit"], (fn, eqns)
    f, inv = jax.jit(pow2.pow2_floor_and_reciprocal)(jnp.float32(3.0))
    assert (float(f), float(inv)) == (2.0, 0.5)
    assert jax.grad(lambda s: sum(pow2.pow2_floor_and_reciprocal(s)))(jnp.float32(3.0)) == 0
