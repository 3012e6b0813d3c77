"""Property-based tests of the elementwise rules: random values, magnitudes (scale
exponents -60..60), data dtypes (float32, float16, bfloat16) and shapes, against the
float32 oracle, with the output scales docs/design.md promises (rule families and their
scales).

Elementwise rules do not look at shapes beyond scalar-versus-array broadcasting, and
every new shape costs XLA compilations, so shapes come from a small pool (a scalar and
an array) while values, scales and dtypes are fully random. Each example runs every
rule of a family in one `jax.jit(scalify(...))` program (compiled once per shape and
dtype); the eager path is covered by tests/rules/test_elementwise.py.
"""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import scalify as sfy
from scalify.core.pow2 import pow2_round_down
from tests.utils import assert_pow2_scales, oracle, rtol_of

DTYPES = [np.float32, np.float16, jnp.bfloat16]
# Data below this (times the output scale) is not resolved: float16 subnormal spacing,
# and float32 / bfloat16 values that XLA's CPU kernels flush to zero.
RESOLUTION = {
    np.dtype(np.float32): 2.0**-126,
    np.dtype(np.float16): 2.0**-24,
    np.dtype(jnp.bfloat16): 2.0**-126,
}

shapes = st.sampled_from([(), (2, 3)])
exponents = st.integers(-60, 60)
dtypes = st.sampled_from(DTYPES)


# Data near unit magnitude (the premise of scaling), zeros included. Magnitudes stay
# above 2**-16 so that data * scale (scales >= 2**-60) is a normal float32: the
# oracle's own inputs are then exact (XLA on CPU flushes float32 subnormals to zero).
magnitudes = st.one_of(st.just(0.0), st.floats(2.0**-16, 4.0, width=32))
elements = st.builds(lambda m, neg: -m if neg else m, magnitudes, st.booleans())


def data_of(draw, shape, dtype):
    values = draw(hnp.arrays(np.float32, shape, elements=elements))
    return jnp.asarray(values, dtype)


def f64(x):
    if isinstance(x, sfy.ScaledArray):
        return np.asarray(x.data, np.float64) * np.float64(np.asarray(x.scale))
    return np.asarray(x, np.float64)


def check_values(out, want, dtype, extra_atol=0.0, name=""):
    """Close to the oracle wherever the oracle is finite and representable in the data
    format at the output scale; non-finite exactly where the oracle is."""
    assert isinstance(out, sfy.ScaledArray), name
    assert_pow2_scales(out)
    scale = float(np.asarray(out.scale))
    got, want = f64(out), np.asarray(want, np.float64)
    assert got.shape == want.shape
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(got[~fin]), np.isnan(want[~fin]), err_msg=name)
    # Where float32 overflows, a ScaledArray may still hold the value (its range is
    # wider): inf, or beyond float32's largest value with the same sign.
    inf = np.isinf(want)
    beyond = np.isinf(got[inf]) | (np.abs(got[inf]) > float(np.finfo(np.float32).max))
    assert np.all(beyond & (np.sign(got[inf]) == np.sign(want[inf]))), f"{name}: inf mismatch"
    # The zero tensor (scale 0) must hold the oracle's value to atol everywhere.
    fits = fin & ((scale == 0) | (np.abs(want) <= float(jnp.finfo(dtype).max) * scale))
    assert np.all(np.isfinite(got[fits])), f"{name}: overflow where the value fits the data format"
    atol = RESOLUTION[np.dtype(dtype)] * scale + np.finfo(np.float32).tiny + extra_atol
    np.testing.assert_allclose(got[fits], want[fits], rtol=rtol_of(dtype), atol=atol, err_msg=name)


_JITTED = {}


def jitted(f):
    """``jax.jit(scalify(f))``, built once per function (JAX caches per shape/dtype),
    traced with the range guard off: these properties are those of the static scale
    estimates, which the guard keeps for in-band data and overrides for the rest
    (tests/rules/test_range_guard.py)."""
    if f not in _JITTED:
        _JITTED[f] = jax.jit(sfy.scalify(f))

    def call(*args):
        with sfy.ScalifyConfig(range_guard=False):
            return _JITTED[f](*args)

    return call


def pow2_down(x):
    return float(pow2_round_down(np.float32(x)))


# --------------------------------------------------------------------------------------
# Binary rules.
# --------------------------------------------------------------------------------------

# name -> (function, expected output scale from the input scales, "selection" (see
# check_selection) or None for plain bool)
BINARY = {
    "add": (lax.add, lambda a, b: pow2_down(np.hypot(a, b))),
    "sub": (lax.sub, lambda a, b: pow2_down(np.hypot(a, b))),
    "mul": (lax.mul, lambda a, b: a * b),
    "div": (lax.div, lambda a, b: a / b),
    "max": (lax.max, "selection"),
    "min": (lax.min, "selection"),
    "rem": (lax.rem, min),
    "atan2": (lax.atan2, lambda a, b: 1.0),
    "eq": (lax.eq, None),
    "ne": (lax.ne, None),
    "lt": (lax.lt, None),
    "le": (lax.le, None),
    "gt": (lax.gt, None),
    "ge": (lax.ge, None),
}


def check_selection(out, want, dtype, sx, sy, name):
    """A selection between operands at distinct traced scales (docs/design.md, "max,
    min, clamp, select"): in a narrow format (float16) the float32 selection's largest
    element is moved to unit size (data max-abs in [1, 2); the zero tensor at scale 0);
    in a wide one it keeps the largest operand scale. Elements more than float32's range
    below the largest operand scale flush when aligned to it (extra_atol)."""
    if jnp.dtype(dtype) == jnp.float16:
        top = float(np.max(np.abs(np.asarray(out.data, np.float32))))
        assert (top == 0 and float(out.scale) == 0) or 1 <= top < 2, (name, top, float(out.scale))
    else:
        assert float(out.scale) == max(sx, sy), name
    check_values(out, want, dtype, extra_atol=2.0**-126 * max(sx, sy), name=name)


def _all_binary(x, y):
    return {name: fn(x, y) for name, (fn, _) in BINARY.items()}


@given(dtype=dtypes, shape=shapes, ex=exponents, ey=exponents, data=st.data())
def test_binary_rules(dtype, shape, ex, ey, data):
    """Every binary rule on the same random operands: scales, values, range."""
    x = sfy.ScaledArray(data_of(data.draw, shape, dtype), jnp.float32(2.0**ex))
    y = sfy.ScaledArray(data_of(data.draw, shape, dtype), jnp.float32(2.0**ey))
    outs = jitted(_all_binary)(x, y)
    wants = oracle(jax.jit(_all_binary), x, y)
    for name, (_, expected_scale) in BINARY.items():
        out, want = outs[name], wants[name]
        if expected_scale is None:  # comparisons: a plain boolean array, exact
            assert not isinstance(out, sfy.ScaledArray), name
            np.testing.assert_array_equal(np.asarray(out), np.asarray(want), err_msg=name)
            continue
        if expected_scale == "selection":
            check_selection(out, want, dtype, 2.0**ex, 2.0**ey, name)
            continue
        assert float(out.scale) == expected_scale(2.0**ex, 2.0**ey), name
        check_values(out, want, dtype, name=name)


@given(dtype=dtypes, shape=shapes, ex=exponents, ey=exponents, k=st.integers(-40, 40), data=st.data())
def test_binary_scale_invariance(dtype, shape, ex, ey, k, data):
    """Multiplying both input scales by 2**k leaves every output's data bit-identical."""
    dx, dy = data_of(data.draw, shape, dtype), data_of(data.draw, shape, dtype)
    sx, sy = 2.0**ex, 2.0**ey
    a, b = [
        jitted(_all_binary)(sfy.ScaledArray(dx, jnp.float32(sx * f)), sfy.ScaledArray(dy, jnp.float32(sy * f)))
        for f in (1.0, 2.0**k)
    ]
    for name in BINARY:
        da, db = [
            np.asarray(o.data if isinstance(o, sfy.ScaledArray) else o, np.float32)  # NaN == NaN
            for o in (a[name], b[name])
        ]
        np.testing.assert_array_equal(da, db, err_msg=name)


def _select_and_clamp(pred, x, y):
    return lax.select_n(pred, x, y), lax.clamp(-jnp.abs(y), x, jnp.abs(y))


@given(dtype=dtypes, shape=shapes, ex=exponents, ey=exponents, data=st.data())
def test_select_n_and_clamp(dtype, shape, ex, ey, data):
    pred = jnp.asarray(data.draw(hnp.arrays(np.bool_, shape)))
    x = sfy.ScaledArray(data_of(data.draw, shape, dtype), jnp.float32(2.0**ex))
    y = sfy.ScaledArray(data_of(data.draw, shape, dtype), jnp.float32(2.0**ey))
    outs = jitted(_select_and_clamp)(pred, x, y)
    wants = oracle(_select_and_clamp, pred, x, y)
    for out, want, name in zip(outs, wants, ["select_n", "clamp"]):
        check_selection(out, want, dtype, 2.0**ex, 2.0**ey, name)


# --------------------------------------------------------------------------------------
# Unary rules.
# --------------------------------------------------------------------------------------


def _one(s):
    return 1.0


def _near_identity(s):
    return min(s, 1.0)


def _growing(s):
    return max(s, 1.0)


# name -> (function, data domain, expected output scale from the input scale)
UNARY = {
    "neg": (lax.neg, None, lambda s: s),
    "abs": (lax.abs, None, lambda s: s),
    "sign": (lax.sign, None, _one),
    "sqrt": (lax.sqrt, jnp.abs, lambda s: pow2_down(np.sqrt(s))),
    "rsqrt": (lax.rsqrt, jnp.abs, lambda s: pow2_down(1 / np.sqrt(s))),
    "cbrt": (lax.cbrt, None, lambda s: pow2_down(np.cbrt(s))),
    "square": (lax.square, None, lambda s: s * s),
    "cube": (lambda x: lax.integer_pow(x, 3), None, None),
    "inverse_square": (lambda x: lax.integer_pow(x, -2), None, None),
    "pow0.5": (lambda x: x**0.5, jnp.abs, lambda s: pow2_down(np.sqrt(s))),
    "pow-1.5": (lambda x: x**-1.5, jnp.abs, lambda s: pow2_down(s**-1.5)),
    "exp": (lax.exp, None, _one),
    "log": (lax.log, jnp.abs, _one),
    "log1p": (lax.log1p, None, _near_identity),
    "expm1": (lax.expm1, None, _near_identity),
    "tanh": (lax.tanh, None, _near_identity),
    "logistic": (lax.logistic, None, _one),
    "erf": (lax.erf, None, _near_identity),
    "erfc": (lax.erfc, None, _one),
    "sin": (lax.sin, None, _near_identity),
    "cos": (lax.cos, None, _one),
    "atan": (lax.atan, None, _near_identity),
    "asin": (lax.asin, None, _near_identity),
    "sinh": (lax.sinh, None, _near_identity),
    "cosh": (lax.cosh, None, _one),
    "asinh": (lax.asinh, None, _near_identity),
    "lgamma": (lax.lgamma, None, _growing),
    "digamma": (lax.digamma, None, lambda s: max(1 / s, 1.0)),
    "floor": (lax.floor, None, _growing),
    "ceil": (lax.ceil, None, _growing),
    "round": (lax.round, None, _growing),
    "stop_gradient": (lax.stop_gradient, None, lambda s: s),
}


def _all_unary(x):
    return {name: fn(x if domain is None else domain(x)) for name, (fn, domain, _) in UNARY.items()}


@given(dtype=dtypes, shape=shapes, e=exponents, data=st.data())
def test_unary_rules(dtype, shape, e, data):
    """Every unary rule on the same random operand: scales, values, range."""
    d = data_of(data.draw, shape, dtype)
    s = 2.0**e
    x = sfy.ScaledArray(d, jnp.float32(s))
    outs = jitted(_all_unary)(x)
    wants = oracle(jax.jit(_all_unary), x)
    for name, (_, _, expected_scale) in UNARY.items():
        out = outs[name]
        if expected_scale is not None:
            assert float(out.scale) == expected_scale(s), name
        extra = 0.0
        if name == "log":  # log(d) + log(s): float32 rounding of the two terms
            extra = 4 * 2.0**-24 * (abs(e) + np.max(np.abs(np.log(np.abs(f64(d)) + 1e-30)), initial=0))
        check_values(out, wants[name], dtype, extra_atol=extra, name=name)


@given(dtype=dtypes, shape=shapes, e=st.integers(-20, 20), k=st.integers(-3, 3), data=st.data())
def test_unary_scale_invariance(dtype, shape, e, k, data):
    """Scaling the input scale by 2**(6k) (a multiple of the root orders) leaves the
    output data of the exact rules bit-identical (while output scales such as the
    cube's stay inside float32's range, where they are not clamped)."""
    d = data_of(data.draw, shape, dtype)
    a = jitted(_all_unary)(sfy.ScaledArray(d, jnp.float32(2.0**e)))
    b = jitted(_all_unary)(sfy.ScaledArray(d, jnp.float32(2.0 ** (e + 6 * k))))
    for name in ("neg", "abs", "square", "cube", "sqrt", "rsqrt", "cbrt", "pow0.5", "sign", "stop_gradient"):
        da, db = (np.asarray(o[name].data, np.float32) for o in (a, b))  # NaN == NaN in float32
        np.testing.assert_array_equal(da, db, err_msg=name)


CONSTANTS = (3.0, -0.5, 1.5, 0.0)


def _with_constants(x):
    return {
        (op, c): f(x, c)
        for c in CONSTANTS
        for op, f in (("mul", lambda x, c: x * c), ("div", lambda x, c: x / c),
                      ("add", lambda x, c: x + c), ("max", lambda x, c: jnp.maximum(x, c)))
        if not (op == "div" and c == 0.0)
    }


@given(dtype=dtypes, shape=shapes, e=exponents, data=st.data())
def test_static_constants(dtype, shape, e, data):
    """x * c, x / c, x + c, max(x, c) with static literals c (0 included)."""
    x = sfy.ScaledArray(data_of(data.draw, shape, dtype), jnp.float32(2.0**e))
    outs = jitted(_with_constants)(x)
    wants = oracle(jax.jit(_with_constants), x)
    for key, out in outs.items():
        check_values(out, wants[key], dtype, name=str(key))
        if key[0] == "mul":
            c = key[1]
            assert float(out.scale) == 2.0**e * (pow2_down(abs(c)) if c else 1.0), key
