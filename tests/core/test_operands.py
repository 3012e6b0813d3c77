"""Alignment of operands to a common scale (scalify/core/operands.py) and the trace-scoped
power-of-two registry (scalify/core/trace_state.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core import trace_state
from tests.utils import primitive_names

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8,)).astype(np.float32)
Y = RNG.normal(size=(8,)).astype(np.float32)
# Scales that are not powers of two, as a user may pass them, and powers of two.
SCALES = [(3.0, 0.7), (2.0**-20, 2.0**9), (1.0, 1.0), (5.0, 2.0**100)]


_prims = primitive_names


@pytest.mark.parametrize("sx,sy", SCALES)
@pytest.mark.parametrize("op", ["add", "sub", "max", "select"])
def test_alignment_is_exact_for_any_scales_and_output_scale_is_a_power_of_two(op, sx, sy):
    fns = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "max": jnp.maximum,
        "select": lambda a, b: jnp.where(X > 0, a, b),
    }
    x = sfy.scaled_array(X, np.float32(sx))
    y = sfy.scaled_array(Y, np.float32(sy))
    out = jax.jit(sfy.scalify(fns[op]))(x, y)
    want = fns[op](X.astype(np.float64) * sx, Y.astype(np.float64) * sy)
    # float32 data: exact up to the one rounding of each aligned operand and of the result
    np.testing.assert_allclose(np.asarray(sfy.asarray(out), np.float64), want, rtol=0,
                               atol=4e-7 * np.max(np.abs(want)))
    s = float(out.scale)
    assert s == 2.0 ** np.floor(np.log2(s)), s


def test_alignment_emits_no_division():
    """XLA compiles every scalar division to a kernel of its own; aligning to a rounded
    scale multiplies by its exact reciprocal instead."""
    x = sfy.scaled_array(X, np.float32(3.0))
    y = sfy.scaled_array(Y, np.float32(0.7))
    for fn in (lambda a, b: a + b, lambda a, b: a - b, jnp.maximum, lambda a, b: jnp.concatenate([a, b])):
        prims = _prims(sfy.scalify(fn), x, y)
        assert "div" not in prims, prims
    # Not in NONE mode, where scales are not rounded: the exact ratio then divides.
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.NONE):
        assert "div" in _prims(sfy.scalify(lambda a, b: a + b), x, y)


@pytest.mark.parametrize("name", ["sqrt", "rsqrt", "square", "cube", "pow"])
@pytest.mark.parametrize("scale", [3.0, 2.0**-41, 2.0**40])
def test_power_rules_on_traced_scales_emit_no_division_and_are_exact(name, scale):
    """sqrt / rsqrt / powers of a traced scale take their power-of-two scales from exponent
    bits: no division or square root of the scale (each would be an XLA kernel of its
    own), and the values match float64."""
    fns = {"sqrt": jnp.sqrt, "rsqrt": jax.lax.rsqrt, "square": jnp.square,
           "cube": lambda a: a**3, "pow": lambda a: a**0.5}
    d = np.abs(X) + 0.5
    fn = sfy.scalify(fns[name])
    x = sfy.scaled_array(d, np.float32(scale))
    prims = _prims(lambda x: fn(x), x)
    assert "div" not in prims, prims
    if name in ("sqrt", "rsqrt"):
        assert {p for p in prims if "sqrt" in p} == {name}  # the data's root only
    out = jax.jit(fn)(x)
    want = fns[name](d.astype(np.float64) * scale) if name != "rsqrt" else 1 / np.sqrt(d.astype(np.float64) * scale)
    np.testing.assert_allclose(np.asarray(sfy.asarray(out), np.float64), want, rtol=2e-6)
    s = float(out.scale)
    assert s == 2.0 ** np.floor(np.log2(s)), s


@pytest.mark.parametrize("sx,sy", SCALES[:2])
def test_gradient_wrt_scales_through_alignment(sx, sy):
    """The aligned scale is treated as a constant (its reciprocal comes from bits): the
    gradients of the value with respect to the input scales stay exact."""
    def f(ds, ss):
        x = sfy.ScaledArray(ds[0], ss[0])
        y = sfy.ScaledArray(ds[1], ss[1])
        return jnp.sum(sfy.asarray(sfy.scalify(lambda a, b: (a + b) * (a + b))(x, y)))

    ss = (jnp.float32(sx), jnp.float32(sy))
    gd, gs = jax.jit(jax.grad(f, argnums=(0, 1)))((jnp.asarray(X), jnp.asarray(Y)), ss)
    a, b = X.astype(np.float64) * sx, Y.astype(np.float64) * sy  # value = sum((a + b)**2)
    np.testing.assert_allclose(np.asarray(gs[0]), np.sum(2 * (a + b) * X), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gs[1]), np.sum(2 * (a + b) * Y), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gd[0]), 2 * (a + b) * sx, rtol=1e-5)


def test_power_of_two_registry_is_emptied_after_each_trace():
    x = sfy.scaled_array(X, np.float32(3.0))
    jax.jit(sfy.scalify(lambda a: a + a * 2.0))(x)
    assert trace_state.registered_pow2() == {}
    assert trace_state.known_pow2(np.float32(0.25)) and not trace_state.known_pow2(np.float32(0.3))
