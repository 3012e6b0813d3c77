"""Elementwise rules: values against the float32 oracle, power-of-two scales, the range
promise (2**-60 and 2**60 held in float16 data), scale invariance, static constants,
comparisons across scales, casts, and composite functions (softmax, layer norm...)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from jax.extend.core import primitives as jax_primitives

import scalify as sfy
from scalify.core.pow2 import is_static
from scalify.rules import elementwise as ew
from tests.utils import assert_pow2_scales, oracle, primitive_names, rtol_of

DTYPES = [np.float32, np.float16]
# Absolute tolerance, relative to the largest finite expected magnitude: a rule rounds
# once to the data dtype at its output scale, so elements far below the largest one
# may land in the data format's subnormals.
ATOL_REL = {np.dtype(np.float32): 1e-6, np.dtype(np.float16): 2.0**-21, np.dtype(jnp.bfloat16): 2.0**-20}

RNG = np.random.default_rng(0)
Z = RNG.standard_normal(16)
Z2 = RNG.standard_normal(16)


_JITTED = {}


def run(f, *args, jit=False):
    """``scalify(f)(*args)``, or under ``jax.jit`` (compiled once per function object)."""
    if not jit:
        return sfy.scalify(f)(*args)
    if f not in _JITTED:
        _JITTED[f] = jax.jit(sfy.scalify(f))
    return _JITTED[f](*args)


def make(values, scale, dtype):
    """A ScaledArray of value ``values`` (data = values / scale, rounded to dtype)."""
    data = jnp.asarray(np.asarray(values, np.float64) / scale, dtype=dtype)
    return sfy.ScaledArray(data, jnp.asarray(scale, jnp.float32))


def f64(x):
    if isinstance(x, sfy.ScaledArray):
        return np.asarray(x.data, np.float64) * np.float64(np.asarray(x.scale))
    return np.asarray(x, np.float64)


def check(out, want, dtype, extra_atol=0.0):
    """``out`` equals the oracle ``want``: same non-finite elements, finite wherever the
    oracle is finite (the range promise), close elsewhere; power-of-two scales."""
    if not isinstance(out, sfy.ScaledArray) and np.asarray(out).dtype == bool:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        return
    assert isinstance(out, sfy.ScaledArray), type(out)
    assert_pow2_scales(out)
    got, want = f64(out), np.asarray(want, np.float64)
    assert got.shape == want.shape
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(got[~fin]), np.isnan(want[~fin]), "NaN mismatch")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], "inf mismatch")
    assert np.all(np.isfinite(got[fin])), f"non-finite result where float32 is finite: {got[fin]}"
    mag = np.max(np.abs(want[fin]), initial=0.0)
    # Below float32's normal range the oracle itself flushes to zero (XLA on CPU).
    atol = ATOL_REL[np.dtype(dtype)] * mag + extra_atol + np.finfo(np.float32).tiny
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol_of(dtype), atol=atol)


# --------------------------------------------------------------------------------------
# Unary rules.
# --------------------------------------------------------------------------------------


def _any(z):
    return z


def _pos(z):
    return np.abs(z) + 0.125


def _unit(z):
    return np.tanh(z) * 0.9


def _ge1(z):
    return 1.0 + np.abs(z)


def _gtm1(z):
    return np.abs(z) - 0.5


def _wide(z):
    return 4.0 * z


UNARY = {
    "neg": (lax.neg, _any),
    "abs": (lax.abs, _any),
    "sign": (lax.sign, _any),
    "sqrt": (lax.sqrt, _pos),
    "rsqrt": (lax.rsqrt, _pos),
    "cbrt": (lax.cbrt, _any),
    "square": (lax.square, _any),
    "integer_pow3": (lambda x: lax.integer_pow(x, 3), _any),
    "integer_pow-2": (lambda x: lax.integer_pow(x, -2), _pos),
    "pow0.5": (lambda x: x**0.5, _pos),
    "pow-1.5": (lambda x: x**-1.5, _pos),
    "pow2.0": (lambda x: jnp.power(x, 2.0), _any),
    "pow1/3": (lambda x: x ** (1 / 3), _pos),
    "exp": (lax.exp, _any),
    "exp2": (lax.exp2, _any),
    "log": (lax.log, _pos),
    "log1p": (lax.log1p, _gtm1),
    "expm1": (lax.expm1, _any),
    "tanh": (lax.tanh, _any),
    "logistic": (lax.logistic, _any),
    "erf": (lax.erf, _any),
    "erfc": (lax.erfc, _any),
    "erf_inv": (lax.erf_inv, _unit),
    "sin": (lax.sin, _any),
    "cos": (lax.cos, _any),
    "tan": (lax.tan, _unit),
    "asin": (lax.asin, _unit),
    "acos": (lax.acos, _unit),
    "atan": (lax.atan, _any),
    "sinh": (lax.sinh, _any),
    "cosh": (lax.cosh, _any),
    "asinh": (lax.asinh, _any),
    "acosh": (lax.acosh, _ge1),
    "atanh": (lax.atanh, _unit),
    "lgamma": (lax.lgamma, _any),
    "digamma": (lax.digamma, _any),
    "round_away": (lambda x: lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO), _wide),
    "round_even": (lambda x: lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN), _wide),
    "floor": (lax.floor, _wide),
    "ceil": (lax.ceil, _wide),
    "bessel_i0e": (lax.bessel_i0e, _any),
    "bessel_i1e": (lax.bessel_i1e, _any),
    "stop_gradient": (lax.stop_gradient, _any),
    "reduce_precision": (lambda x: lax.reduce_precision(x, 5, 7), _any),
    "to_float32": (lambda x: x.astype(jnp.float32), _any),
}

# Simulated casts act on the data's exponent range (by design), not the value's.
RANGE_EXCLUDED = {"reduce_precision"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(UNARY))
def test_unary_values(name, dtype):
    fn, domain = UNARY[name]
    values = domain(Z)
    for scale in (2.0**-2, 2.0**2):
        x = make(values, scale, dtype)
        check(run(fn, x), oracle(fn, x), dtype)


@pytest.mark.parametrize("name", [n for n in UNARY if n not in RANGE_EXCLUDED])
def test_unary_range(name):
    """Float16 data at scales 2**-60 and 2**60: finite and correct where float32 is."""
    fn, domain = UNARY[name]
    for scale in (2.0**-60, 2.0**60):
        x = sfy.ScaledArray(jnp.asarray(domain(Z), jnp.float16), jnp.float32(scale))
        check(run(fn, x), oracle(fn, x), np.float16)


def _all_unary(xs):
    return {name: UNARY[name][0](x) for name, x in xs.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unary_under_jit(dtype):
    """Every unary rule under jax.jit(scalify(f)) (one program holding all of them), at
    moderate scales and, for float16 data, at 2**-60 and 2**60."""
    for scale in (2.0**-2, 2.0**2):
        xs = {name: make(domain(Z), scale, dtype) for name, (_, domain) in UNARY.items()}
        outs = run(_all_unary, xs, jit=True)
        for name, x in xs.items():
            check(outs[name], oracle(UNARY[name][0], x), dtype)
    if np.dtype(dtype) == np.float16:
        for scale in (2.0**-60, 2.0**60):
            xs = {
                name: sfy.ScaledArray(jnp.asarray(domain(Z), dtype), jnp.float32(scale))
                for name, (_, domain) in UNARY.items()
            }
            outs = run(_all_unary, xs, jit=True)
            for name, x in xs.items():
                if name not in RANGE_EXCLUDED:
                    check(outs[name], oracle(UNARY[name][0], x), dtype)


@pytest.mark.parametrize(
    "name, factor",
    [("neg", 2.0**7), ("abs", 2.0**-9), ("square", 2.0**5), ("integer_pow3", 2.0**-4),
     ("sqrt", 2.0**8), ("rsqrt", 2.0**-10), ("cbrt", 2.0**9), ("pow0.5", 2.0**6),
     ("stop_gradient", 2.0**3), ("reduce_precision", 2.0**-3), ("sign", 2.0**11),
     ("to_float32", 2.0**4)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unary_scale_invariance(name, factor, dtype):
    """Scaling the input scale by 2**k leaves the output data bit-identical."""
    fn, domain = UNARY[name]
    data = jnp.asarray(domain(Z), dtype)
    a = run(fn, sfy.ScaledArray(data, jnp.float32(0.5)))
    b = run(fn, sfy.ScaledArray(data, jnp.float32(0.5 * factor)))
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_sqrt_scale_is_exact():
    """sqrt moves half the scale's exponent: sqrt(2**-60) = 2**-30, data sqrt(d)."""
    x = sfy.ScaledArray(jnp.asarray([4.0, 9.0, 2.0], jnp.float16), jnp.float32(2.0**-60))
    out = run(lax.sqrt, x)
    assert float(out.scale) == 2.0**-30
    np.testing.assert_array_equal(np.asarray(out.data), np.sqrt(np.float16([4, 9, 2])))
    out = run(lax.sqrt, sfy.ScaledArray(x.data, jnp.float32(2.0**61)))
    assert float(out.scale) == 2.0**30
    np.testing.assert_allclose(np.asarray(out.data, np.float32), np.sqrt([8.0, 18.0, 4.0]), rtol=1e-3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_integer_pow_scale_overflow_is_clamped(jit):
    """x**3 of 1e18 overflows float32: the value is inf (like float32), the scale stays a
    finite power of two, and a downstream tanh saturates instead of giving NaN."""
    x = sfy.ScaledArray(jnp.asarray([1.0, -2.0, 0.5], jnp.float16), jnp.float32(2.0**60))
    out = run(lambda x: lax.integer_pow(x, 3), x, jit=jit)
    assert_pow2_scales(out)
    assert np.isfinite(float(out.scale))
    np.testing.assert_array_equal(f64(out), [np.inf, -np.inf, np.inf])
    t = run(lambda x: jnp.tanh(x**3 * 0.5 + x), x, jit=jit)
    np.testing.assert_array_equal(f64(t), [1.0, -1.0, 1.0])
    tiny = sfy.ScaledArray(x.data, jnp.float32(2.0**-60))
    out = run(lambda x: lax.integer_pow(x, 3) + lax.integer_pow(x, 3), tiny, jit=jit)
    assert_pow2_scales(out)
    np.testing.assert_array_equal(f64(out), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mul_scale_underflow_is_clamped(jit):
    """(x*y) + (x*y) at 2**-100 each: the product's scale (2**-200) is clamped to the
    float32 normal range, the value is float32's 0 and the sum is 0, not NaN."""
    x = sfy.ScaledArray(jnp.asarray([1.0, -2.0, 3.0], jnp.float16), jnp.float32(2.0**-100))
    out = run(lambda x, y: x * y + x * y, x, x, jit=jit)
    assert_pow2_scales(out)
    check(out, oracle(lambda x, y: x * y + x * y, x, x), np.float16)
    big = sfy.ScaledArray(x.data, jnp.float32(2.0**100))
    out = run(lambda x, y: x * y, big, big, jit=jit)
    assert_pow2_scales(out)
    np.testing.assert_array_equal(f64(out), [np.inf, np.inf, np.inf])
    out = run(lambda x, y: x / y, x, big, jit=jit)
    assert_pow2_scales(out)
    check(out, oracle(lambda x, y: x / y, x, big), np.float16)


# --------------------------------------------------------------------------------------
# Binary rules.
# --------------------------------------------------------------------------------------


def _away0(z):
    return np.sign(z + 1e-9) * (np.abs(z) + 0.25)


def _half(z):
    return 0.5 * z


BINARY = {
    "add": (lax.add, _any, _any),
    "sub": (lax.sub, _any, _any),
    "mul": (lax.mul, _any, _any),
    "div": (lax.div, _any, _away0),
    "max": (lax.max, _any, _any),
    "min": (lax.min, _any, _any),
    "atan2": (lax.atan2, _any, _any),
    "rem": (lax.rem, _wide, _away0),
    "add_any": (jax_primitives.add_jaxvals_p.bind, _any, _any),
}
SCALE_PAIRS = [(1.0, 1.0), (2.0**-3, 2.0**5), (2.0**-60, 2.0**-58), (2.0**60, 2.0**61), (2.0**-60, 2.0**60)]


def _binary_inputs(name, dtype, a, b):
    _, dom_x, dom_y = BINARY[name]
    x = sfy.ScaledArray(jnp.asarray(dom_x(Z), dtype), jnp.float32(a))
    y = sfy.ScaledArray(jnp.asarray(dom_y(Z2), dtype), jnp.float32(b))
    return x, y


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_values(name, dtype):
    fn = BINARY[name][0]
    for sx, sy in SCALE_PAIRS:
        for a, b in ((sx, sy), (sy, sx)):
            x, y = _binary_inputs(name, dtype, a, b)
            check(run(fn, x, y), oracle(fn, x, y), dtype)


def _all_binary(xys):
    return {name: BINARY[name][0](x, y) for name, (x, y) in xys.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_binary_under_jit(dtype):
    for sx, sy in SCALE_PAIRS:
        for a, b in ((sx, sy), (sy, sx)):
            xys = {name: _binary_inputs(name, dtype, a, b) for name in BINARY}
            outs = run(_all_binary, xys, jit=True)
            for name, (x, y) in xys.items():
                check(outs[name], oracle(BINARY[name][0], x, y), dtype)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_pow_traced_exponent(dtype, jit):
    """pow with a traced exponent is computed on unscaled float32 values at scale 1."""
    for sx, sy in [(1.0, 1.0), (2.0**-3, 2.0**-2), (2.0**2, 2.0**-4)]:
        x = sfy.ScaledArray(jnp.asarray(_pos(Z), dtype), jnp.float32(sx))
        y = sfy.ScaledArray(jnp.asarray(_half(Z2), dtype), jnp.float32(sy))
        check(run(lax.pow, x, y, jit=jit), oracle(lax.pow, x, y), dtype)
        check(run(lambda y: 2.0**y, y, jit=jit), oracle(lambda y: 2.0**y, y), dtype)


def test_binary_scale_results():
    """The scales of docs/design.md (rule families): add hypot, mul product, div ratio,
    max the larger."""
    x = sfy.ScaledArray(jnp.ones(3, jnp.float16), jnp.float32(2.0**-3))
    y = sfy.ScaledArray(jnp.ones(3, jnp.float16), jnp.float32(2.0**5))
    assert float(run(lax.add, x, y).scale) == 2.0**5
    assert float(run(lax.add, x, x).scale) == 2.0**-3  # pow2_down(sqrt(2) * s)
    assert float(run(lax.sub, y, y).scale) == 2.0**5
    assert float(run(lax.mul, x, y).scale) == 2.0**2
    assert float(run(lax.div, x, y).scale) == 2.0**-8
    # max/min of distinct scales: selected in float32, the larger value kept exactly
    np.testing.assert_array_equal(np.asarray(sfy.asarray(run(lax.max, x, y), dtype=jnp.float32)), 32.0)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(run(lax.min, x, y), dtype=jnp.float32)), 0.125)
    assert float(run(lax.rem, x, y).scale) == 2.0**-3
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        assert float(run(lax.add, x, x).scale) == 2.0**-2


@pytest.mark.parametrize("k", [7, -9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(BINARY) + ["eq", "lt", "ge"])
def test_binary_scale_invariance(name, dtype, k):
    """Multiplying both input scales by 2**k leaves the output data bit-identical."""
    fn = {"eq": lax.eq, "lt": lax.lt, "ge": lax.ge}.get(name) or BINARY[name][0]
    dom_x, dom_y = (BINARY[name][1], BINARY[name][2]) if name in BINARY else (_any, _any)
    dx, dy = jnp.asarray(dom_x(Z), dtype), jnp.asarray(dom_y(Z2), dtype)
    outs = [
        run(fn, sfy.ScaledArray(dx, jnp.float32(0.25 * f)), sfy.ScaledArray(dy, jnp.float32(8.0 * f)))
        for f in (1.0, 2.0**k)
    ]
    data = [np.asarray(o.data if isinstance(o, sfy.ScaledArray) else o) for o in outs]
    np.testing.assert_array_equal(data[0], data[1])


# --------------------------------------------------------------------------------------
# Comparisons.
# --------------------------------------------------------------------------------------

COMPARISONS = {"eq": lax.eq, "ne": lax.ne, "lt": lax.lt, "le": lax.le, "gt": lax.gt, "ge": lax.ge}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(COMPARISONS))
def test_comparisons_across_scales(name, jit):
    """Equal values held at different scales compare equal; mixed values compare as in
    float32, even 2**-60 against 2**60, and the output is a plain boolean array."""
    fn = COMPARISONS[name]
    values = np.float32([-3.0, -0.5, 0.0, 0.25, 1.0, 6.0])
    x = make(values, 2.0**-3, np.float16)
    y = make(values, 2.0**5, np.float16)
    out = run(fn, x, y, jit=jit)
    assert not isinstance(out, sfy.ScaledArray) and out.dtype == bool
    np.testing.assert_array_equal(np.asarray(out), fn(values, values))
    shifted = make(np.roll(values, 1), 2.0**5, np.float16)
    np.testing.assert_array_equal(np.asarray(run(fn, x, shifted, jit=jit)), fn(values, np.roll(values, 1)))
    for sx, sy in SCALE_PAIRS:
        x = sfy.ScaledArray(jnp.asarray(Z, jnp.float16), jnp.float32(sx))
        y = sfy.ScaledArray(jnp.asarray(Z2, jnp.float16), jnp.float32(sy))
        check(run(fn, x, y, jit=jit), oracle(fn, x, y), np.float16)
        check(run(fn, y, x, jit=jit), oracle(fn, y, x), np.float16)
    # Against static constants and plain arrays.
    x = make(values, 2.0**-3, np.float16)
    check(run(lambda x: fn(x, np.float16(0.25)), x, jit=jit), fn(values, np.float32(0.25)), np.float16)
    check(run(fn, x, jnp.asarray(values[::-1], jnp.float16), jit=jit), fn(values, values[::-1]), np.float16)


def test_is_finite():
    x = sfy.ScaledArray(jnp.asarray([1.0, np.inf, -np.inf, np.nan, 0.0], jnp.float16), jnp.float32(2.0**60))
    out = run(lax.is_finite, x)
    assert not isinstance(out, sfy.ScaledArray)
    np.testing.assert_array_equal(np.asarray(out), [True, False, False, False, True])


# --------------------------------------------------------------------------------------
# Static constants and plain operands.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_static_constants(dtype, jit):
    """Literals (in the data dtype, as JAX writes them) combine with scaled operands."""
    values = np.float32([-3.0, -0.5, 0.0, 0.25, 1.0, 6.0]) * 2.0**-12
    x = make(values, 2.0**-12, dtype)
    c = np.float32(2.0**-13)  # exact in float16 and float32, near the data's magnitude

    def lit(v, x):  # a literal of x's dtype (the oracle sees float32 operands)
        return np.asarray(v, x.dtype)

    fns = {
        "mul3": lambda x: x * 3.0,
        "rmul3": lambda x: 3.0 * x,
        "div3": lambda x: x / 3.0,
        "rdiv": lambda x: lit(1.5, x) / (x + lit(c, x)),
        "add0": lambda x: x + 0.0,
        "sub2": lambda x: x - lit(3 * c, x),
        "max_ninf": lambda x: jnp.maximum(x, -jnp.inf),
        "max0": lambda x: jnp.maximum(x, 0.0),
        "min_c": lambda x: jnp.minimum(x, lit(c, x)),
        "mul0": lambda x: x * 0.0,
        "mulinf": lambda x: x * jnp.inf,
        "clamp": lambda x: lax.clamp(lit(-c, x), x, lit(c, x)),
        "pow_static": lambda x: x**2.0,
        "big": lambda x: x * 4096.0 + 2048.0,
    }
    outs = run(lambda x: _apply_all(fns, x), x, jit=jit)  # one program for all of them
    for name, fn in fns.items():
        check(outs[name], oracle(fn, x), dtype)


def _apply_all(fns, *args):
    return {name: fn(*args) for name, fn in fns.items()}


def test_mul_by_zero_and_inf_like_float32():
    x = sfy.ScaledArray(jnp.asarray([1.0, 0.0, np.inf, -2.0], jnp.float16), jnp.float32(2.0**40))
    np.testing.assert_array_equal(f64(run(lambda x: x * 0.0, x)), [0.0, 0.0, np.nan, -0.0])
    np.testing.assert_array_equal(f64(run(lambda x: x * jnp.inf, x)), [np.inf, np.nan, np.inf, -np.inf])


def test_static_scales_fold_at_trace_time():
    """A static scale (NumPy) gives a static output scale: `x * 3.0` has scale s * 2 and
    data d * 1.5; `x + 0` and `max(x, -inf)` keep the scale object itself."""
    s = np.float32(4.0)
    x = sfy.ScaledArray(jnp.asarray([1.0, -2.0], jnp.float16), s)
    out = ew.mul(x, np.asarray(3.0, np.float16)).materialise()  # deferred rounding: `Wide`
    assert is_static(out.scale) and float(out.scale) == 8.0
    np.testing.assert_array_equal(np.asarray(out.data), np.float16([1.5, -3.0]))
    assert ew.add(x, np.asarray(0.0, np.float16)).scale is s
    assert ew.max_(x, np.asarray(-np.inf, np.float16)).scale is s
    assert ew.select_n(jnp.asarray([True, False]), x, np.broadcast_to(np.float16(0), (2,))).scale is s
    acc = {"accuracy": None}
    # The static estimates themselves; range-guarded rules (rsqrt, square, exp, powers)
    # measure float16 results on top of them (tests/rules/test_range_guard.py).
    with sfy.ScalifyConfig(range_guard=False):
        for fn, params in [(ew.sqrt, acc), (ew.rsqrt, acc), (ew.cbrt, acc), (ew.square, {}),
                           (ew.exp, acc), (ew.tanh, acc), (ew.log, acc), (ew.floor, {}), (ew.digamma, {})]:
            assert is_static(fn(x, **params).scale), fn
        assert is_static(ew.integer_pow(x, y=3).scale) and float(ew.integer_pow(x, y=3).scale) == 64.0
        assert is_static(ew.pow_(x, np.asarray(0.5, np.float16)).scale)
    for fn, params in [(ew.sqrt, acc), (ew.cbrt, acc), (ew.tanh, acc), (ew.log, acc), (ew.floor, {})]:
        assert is_static(fn(x, **params).scale), fn  # bounded: no guard


def test_static_constants_have_no_runtime_scale_rounding():
    """Under jit with a traced scale, `x * 3.0`, `x + 0` and `max(x, -inf)` compute no
    power-of-two rounding on device (the constant's pow2 part was found at trace time):
    no mantissa mask (`and` on the scale's bits) is in the program."""
    x = sfy.ScaledArray(jnp.ones(4, jnp.float16), jnp.float32(0.5))
    for fn in (lambda x: x * 3.0, lambda x: x + 0.0, lambda x: jnp.maximum(x, -jnp.inf)):
        prims = primitive_names(sfy.scalify(fn), x)
        assert "and" not in prims, prims
    # the check can fail: sqrt rounds its traced scale from bits (in a nested `jit`)
    assert "and" in primitive_names(sfy.scalify(lambda x: jnp.sqrt(x)), x)
    jaxpr = jax.make_jaxpr(sfy.scalify(lambda x: x + 0.0))(x).jaxpr
    assert jaxpr.outvars[1] is jaxpr.invars[1]  # the scale passes through untouched
    # beside a -inf fill the scale is kept off 0 (an all-zero x: -inf * 0 would be NaN)
    jaxpr = jax.make_jaxpr(sfy.scalify(lambda x: jnp.maximum(x, -jnp.inf)))(x).jaxpr
    assert "max" in [e.primitive.name for e in jaxpr.eqns]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mixed_plain_and_scaled(jit):
    """A plain traced array beside a ScaledArray is read with scale 1."""
    x = make(Z, 2.0**-4, np.float16)
    p = jnp.asarray(Z2, jnp.float16)
    fns = {f.__name__: f for f in (lax.add, lax.sub, lax.mul, lax.div, lax.max, lax.min, lax.atan2, lax.lt)}
    for a, b in ((x, p), (p, x)):
        outs = run(_mixed, a, b, jit=jit)
        for name, fn in fns.items():
            check(outs[name], oracle(fn, a, b), np.float16)
    assert float(outs["mul"].scale) == 2.0**-4


def _mixed(a, b):
    fns = (lax.add, lax.sub, lax.mul, lax.div, lax.max, lax.min, lax.atan2, lax.lt)
    return {f.__name__: f(a, b) for f in fns}


# --------------------------------------------------------------------------------------
# Selection and clamping.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_select_n(dtype, jit):
    pred = jnp.asarray(Z > 0)
    which = jnp.asarray((np.arange(16) % 3).astype(np.int32))
    for sx, sy in SCALE_PAIRS:
        x = sfy.ScaledArray(jnp.asarray(Z, dtype), jnp.float32(sx))
        y = sfy.ScaledArray(jnp.asarray(Z2, dtype), jnp.float32(sy))
        out = run(lax.select_n, pred, x, y, jit=jit)
        check(out, oracle(lax.select_n, pred, x, y), dtype)
        # Distinct scales: selected in float32, max-abs at the top of the format's band.
        amax = float(np.max(np.abs(np.asarray(out.data, np.float32))))
        assert not np.issubdtype(dtype, np.float16) or 2.0**10 <= amax < 2.0**11, amax
        out = run(_select3, which, x, y, jit=jit)
        check(out, oracle(_select3, which, x, y), dtype)
        # Scale-free static cases (zeros, -inf) adopt the scaled case's scale.
        outs = run(_select_fills, pred, x, jit=jit)
        for out, want in zip(outs, oracle(_select_fills, pred, x)):
            check(out, want, dtype)
            assert float(out.scale) == sx


def _select3(w, x, y):
    return lax.select_n(w, x, y, x * 2.0)


def _select_fills(p, x):
    return [lax.select_n(p, x, jnp.full_like(x, fill)) for fill in (0.0, -np.inf)]


def test_select_n_static_predicate_keeps_case():
    x = make(Z * 2.0**-50, 2.0**-50, np.float16)
    y = make(Z2 * 2.0**50, 2.0**50, np.float16)
    out = run(lambda x, y: lax.select_n(True, x, y), x, y)
    assert float(out.scale) == 2.0**50
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(y.data))
    out = run(lambda x, y: lax.select_n(np.zeros(16, bool), x, y), x, y)
    assert float(out.scale) == 2.0**-50
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clamp(jit):
    for sx, sy in SCALE_PAIRS:
        x = sfy.ScaledArray(jnp.asarray(2 * Z, jnp.float16), jnp.float32(sx))
        lo = sfy.ScaledArray(jnp.asarray(-1.0, jnp.float16), jnp.float32(sy))
        hi = sfy.ScaledArray(jnp.asarray(1.5, jnp.float16), jnp.float32(sy))
        out = run(lax.clamp, lo, x, hi, jit=jit)
        # Distinct scales: clamped in float32, the result's max-abs at the top of float16's
        # band; values far below it round to its float16 ulp.
        assert float(np.max(np.abs(np.asarray(out.data, np.float32)))) < 2.0**11
        ulp = float(out.scale) * float(jnp.finfo(jnp.float16).smallest_subnormal)
        check(out, oracle(lax.clamp, lo, x, hi), np.float16, extra_atol=ulp)
        fn = lambda x: lax.clamp(jnp.zeros((), x.dtype), x, jnp.full((), jnp.inf, x.dtype))  # noqa: E731
        out = run(fn, x, jit=jit)
        check(out, oracle(fn, x), np.float16)
        assert float(out.scale) == sx


@pytest.mark.parametrize("op", [jnp.maximum, jnp.minimum], ids=["max", "min"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_max_min_derivative_finds_an_operand_far_below_the_other(op, jit):
    """``max(x, y)`` with ``y`` 2**37 below ``x``: the result, rounded to one float16
    scale, cannot hold ``y``'s elements, yet ``max``'s derivative (which compares each
    operand with the result) still finds where ``y`` was selected: both gradients equal
    float32's, exactly (they are ``w`` or 0)."""
    x = sfy.ScaledArray(jnp.asarray(Z, jnp.float16), jnp.float32(2.0**6))
    y = sfy.ScaledArray(jnp.asarray(np.abs(Z2), jnp.float16), jnp.float32(2.0**-31))
    w = (1 + np.arange(16) / 16).astype(np.float32)  # exact in float16
    grad = jax.grad(lambda x, y: jnp.sum(op(x, y).astype(jnp.float32) * w), argnums=(0, 1))
    got = run(grad, x, y, jit=jit)
    want = oracle(grad, x, y)
    assert 0 < np.count_nonzero(want[1]) < 16  # y selected somewhere, not everywhere
    for g, e in zip(got, want):
        np.testing.assert_array_equal(np.asarray(sfy.asarray(g, jnp.float32)), e)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_elementwise_rule_reads_a_selection_of_distant_scales_in_float32(jit):
    """``rsqrt(|min(x, eps)|)`` with ``x`` at 2**23 and ``eps`` at 2**-14: the minimum's
    elements span 37 binades, more than float16 holds below its largest, so rounded to
    one scale the ``eps`` elements would flush to 0 and their ``rsqrt`` be inf. The
    selection is handed on in float32, and ``rsqrt`` reads it there: finite, and
    float32's values within float16's rounding. The gradient is finite too (it was NaN:
    ``rsqrt``'s derivative divides by the selection) and ``eps``'s is float32's; ``x``'s
    passes through a cotangent whose elements span 50 binades (``v**-1.5`` of both
    operands), which no single float16 scale holds, so only its finiteness is asked."""
    x = sfy.as_scaled_array(jnp.asarray(Z * 2.0**23), dtype=jnp.float16)
    eps = sfy.as_scaled_array(jnp.float32(1.5 * 2.0**-14), dtype=jnp.float16)
    f = lambda x, e: lax.rsqrt(jnp.abs(jnp.minimum(x, e)))  # noqa: E731
    out = run(f, x, eps, jit=jit)
    want = oracle(f, x, eps)
    assert np.any(want > 1) and np.any(want < 2.0**-10)  # both operands selected
    assert np.all(np.isfinite(np.asarray(out.data, np.float32)))
    np.testing.assert_allclose(f64(out), want, rtol=2e-3)
    grad = jax.grad(lambda x, e: jnp.sum(f(x, e).astype(jnp.float32)), argnums=(0, 1))
    got, want = run(grad, x, eps, jit=jit), oracle(grad, x, eps)
    got = [np.asarray(sfy.asarray(g, jnp.float32), np.float64) for g in got]
    assert all(np.all(np.isfinite(g)) for g in got)
    np.testing.assert_allclose(got[1], want[1], rtol=4e-3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_selection_that_takes_only_the_smaller_operand_is_at_its_scale(jit):
    """``max(x, y)`` with float8 ``x`` at 2**-40 and a scalar ``y = -2**33``: every
    element comes from ``x``, 2**-73 below the larger scale; squared there in float32 it
    would underflow to 0. The selection's largest element is moved to unit size first,
    so ``x * x`` is float32's, within float8's rounding (relative, or its subnormal
    spacing for the smallest squares)."""
    x = sfy.as_scaled_array(jnp.asarray(np.abs(Z) * 2.0**-40), dtype=jnp.float8_e4m3fn)
    y = sfy.as_scaled_array(jnp.float32(-(2.0**33)), dtype=jnp.float8_e4m3fn)
    f = lambda x, y: jnp.square(jnp.maximum(x, y))  # noqa: E731
    out = run(f, x, y, jit=jit)
    want = oracle(f, x, y)
    assert np.all(want > 0)
    np.testing.assert_allclose(f64(out), want, rtol=0.15, atol=2.0**-9 * np.max(want))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float8_sum_lifts_what_its_static_scale_would_flush(dtype, jit):
    """``relu(x) - 1.5`` for negative ``x`` at scale 2**16: the relu is zeros at ``x``'s
    scale, and at the sum's static scale 1.5 lies below float8's smallest subnormal; the
    guarded float8 sum moves it back into range: exactly -1.5, as in float32."""
    x = sfy.ScaledArray(jnp.asarray(-np.abs(Z[:8]) - 0.5, dtype), jnp.float32(2.0**16))
    f = lambda x: jax.nn.relu(x) - 1.5  # noqa: E731
    out = run(f, x, jit=jit)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(out, jnp.float32)), oracle(f, x))


# --------------------------------------------------------------------------------------
# nextafter, casts, precision, gradients.
# --------------------------------------------------------------------------------------


def test_nextafter():
    values = np.float32([1.0, -2.0, 3.0, 0.5, 1.0])
    target = np.float32([2.0, -3.0, 0.0, 0.5, np.nan])
    for scale in (2.0**-60, 1.0, 2.0**60):
        # float32 data: bit-exact with float32's nextafter of the value.
        x, t = make(values * scale, scale, np.float32), make(target * scale, 2 * scale, np.float32)
        out = run(lax.nextafter, x, t)
        want = np.nextafter(values * np.float32(scale), target * np.float32(scale))
        np.testing.assert_array_equal(f64(out), want)
        # float16 data: one float16 ulp of the data at x's scale.
        x, t = make(values * scale, scale, np.float16), make(target * scale, scale, np.float16)
        out = run(lax.nextafter, x, t)
        assert float(out.scale) == scale
        want = np.nextafter(np.float16(values), np.float16(target))
        np.testing.assert_array_equal(np.asarray(out.data), want)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_convert_element_type(jit):
    x = make(Z * 2.0**-70, 2.0**-70, np.float16)
    out = run(lambda x: x.astype(jnp.float32), x, jit=jit)
    assert out.dtype == np.float32 and float(out.scale) == 2.0**-70
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data, np.float32))
    out = run(lambda x: x.astype(jnp.bfloat16), x, jit=jit)
    assert out.dtype == jnp.bfloat16 and float(out.scale) == 2.0**-70
    # float -> int / bool: unscaled, plain output.
    y = make(Z * 40, 2.0**3, np.float16)
    out = run(lambda x: x.astype(jnp.int32), y, jit=jit)
    assert not isinstance(out, sfy.ScaledArray)
    np.testing.assert_array_equal(np.asarray(out), oracle(lambda x: x.astype(jnp.int32), y))
    z = make(np.float32([0.0, 1e-30, -2.0 * 2.0**-100]), 2.0**-100, np.float16)
    out = run(lambda x: x.astype(bool), z, jit=jit)
    np.testing.assert_array_equal(np.asarray(out), [False, True, True])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_convert_to_float8_saturates(jit):
    """E4M3FN has no infinity: finite data beyond 448 saturate instead of becoming NaN."""
    data = jnp.asarray([1000.0, -600.0, 3.0, np.inf, np.nan], jnp.float16)
    x = sfy.ScaledArray(data, jnp.float32(2.0**-40))
    with sfy.ScalifyConfig(range_guard=False):  # the static cast alone
        out = run(lambda x: x.astype(ml_dtypes.float8_e4m3fn), x, jit=jit)
        assert out.dtype == ml_dtypes.float8_e4m3fn and float(out.scale) == 2.0**-40
        got = np.asarray(out.data, np.float32)
        np.testing.assert_array_equal(got[:3], [448.0, -448.0, 3.0])
        assert np.isnan(got[3]) and np.isnan(got[4])
        out = run(lambda x: x.astype(ml_dtypes.float8_e5m2), x, jit=jit)
        np.testing.assert_array_equal(np.asarray(out.data, np.float32)[:2], [1024.0, -640.0])
    # Range-guarded (default): inf/NaN keep the scale and stay visible (NaN in E4M3FN);
    # the finite values are cast as they are at it.
    out = run(lambda x: x.astype(ml_dtypes.float8_e4m3fn), x, jit=jit)
    got = np.asarray(out.data, np.float32)
    assert np.isnan(got[3]) and np.isnan(got[4]) and float(out.scale) == 2.0**-40


def test_reduce_precision_acts_on_data():
    x = make(np.float32([1.0 + 2**-9, 3.0, 1e-3]) * 2.0**-60, 2.0**-60, np.float32)
    out = run(lambda x: lax.reduce_precision(x, 5, 7), x)
    assert float(out.scale) == 2.0**-60
    want = lax.reduce_precision(x.data, 5, 7)
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(want))


def test_stop_gradient_gradients():
    s = jnp.float32(2.0**-30)

    def loss(d):
        out = sfy.scalify(lambda x: x * lax.stop_gradient(x))(sfy.ScaledArray(d, s))
        return jnp.sum(sfy.asarray(out, jnp.float32))

    d = jnp.asarray([1.0, -2.0, 3.0], jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(d)), np.asarray(d) * float(s) ** 2, rtol=1e-6)


def test_add_jaxvals_under_vjp_inside_scalify():
    """jax.vjp inside scalify: the cotangents are summed by `add_any`."""

    def f(x, ct):
        _, vjp = jax.vjp(lambda x: x * x + jnp.sin(x), x)
        return vjp(ct)[0]

    jaxpr = jax.make_jaxpr(f)(jnp.ones(4), jnp.ones(4))
    assert any(e.primitive is jax_primitives.add_jaxvals_p for e in jaxpr.eqns)
    x = make(Z[:4] * 2.0**-40, 2.0**-40, np.float16)
    ct = make(Z2[:4], 1.0, np.float16)
    for jit in (False, True):
        check(run(f, x, ct, jit=jit), oracle(f, x, ct), np.float16)


def test_gelu_tanh_approximation_at_extreme_scales():
    """gelu's x**3 overflows float32 for 1e18 inputs; the value must match float32's."""
    for scale in (2.0**-60, 1.0, 2.0**60):
        x = sfy.ScaledArray(jnp.asarray(Z, jnp.float16), jnp.float32(scale))
        out = run(_gelu_tanh, x, jit=True)
        want = np.asarray(oracle(_gelu_tanh, x), np.float64)
        assert_pow2_scales(out)
        # Eight float16 roundings in a row: composite tolerance.
        np.testing.assert_allclose(f64(out), want, rtol=2e-2, atol=1e-2 * np.max(np.abs(want)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------------------
# Composite functions (these need reductions, shape, and control-flow rules too).
# --------------------------------------------------------------------------------------


def _layer_norm(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5)


COMPOSITES = {
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "log_softmax": lambda x: jax.nn.log_softmax(x, axis=-1),
    "logsumexp": lambda x: jax.nn.logsumexp(x, axis=-1),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "layer_norm": _layer_norm,
    "var": lambda x: jnp.var(x, axis=-1),
    "norm": lambda x: jnp.linalg.norm(x),
}


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composite_functions(name):
    fn = COMPOSITES[name]
    z = Z.reshape(2, 8)
    for scale in (2.0**-60, 1.0, 2.0**60):
        x = sfy.ScaledArray(jnp.asarray(z, jnp.float16), jnp.float32(scale))
        out = jax.jit(sfy.scalify(fn))(x)
        want = oracle(fn, x)
        got = f64(out)
        want = np.asarray(want, np.float64)
        assert_pow2_scales(out)
        assert np.all(np.isfinite(got)), (name, scale, got)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * np.max(np.abs(want)))


@pytest.mark.parametrize(
    "fn",
    [jnp.tanh, jnp.exp, lax.sqrt, lax.log, lambda x: x**3, lambda x: x * 3.0, lambda x: x / (x * x + 1.0),
     lambda x: jnp.maximum(x, 0.0), lambda x: x**0.5, jax.nn.sigmoid],
    ids=["tanh", "exp", "sqrt", "log", "cube", "mul3", "div", "relu", "pow0.5", "sigmoid"],
)
def test_gradient_through_rules(fn):
    """jax.grad of a scalified function (differentiating the rules themselves) matches
    the float32 gradient."""
    s = jnp.float32(2.0**-3)
    d = jnp.asarray(_pos(Z[:6]) * 8.0, jnp.float32)

    def scaled_loss(d):
        return jnp.sum(sfy.asarray(sfy.scalify(fn)(sfy.ScaledArray(d, s)), jnp.float32))

    want = jax.grad(lambda d: jnp.sum(fn(d * s)))(d)
    np.testing.assert_allclose(np.asarray(jax.grad(scaled_loss)(d)), np.asarray(want), rtol=1e-5)


def test_special_functions_of_several_operands():
    """igamma, igammac, polygamma, zeta, betainc: unscaled float32 values, scale 1."""
    a = make(_pos(Z[:8]) * 2.0, 2.0**-1, np.float16)
    x = make(_pos(Z2[:8]), 2.0**-3, np.float16)
    b = make(_pos(Z2[8:]), 2.0**2, np.float16)
    u = make(np.tanh(np.abs(Z[8:])) * 0.9, 2.0**-2, np.float16)
    cases = [
        (lax.igamma, (a, x)),
        (lax.igammac, (a, x)),
        (lambda m, x: lax.polygamma(m, x), (np.float16(1.0), x)),
        (lax.zeta, (make(_pos(Z[:8]) + 1.5, 1.0, np.float16), x)),
        (lax.betainc, (a, b, u)),
    ]
    for fn, args in cases:
        for jit in (False, True):
            out = run(fn, *args, jit=jit)
            assert float(out.scale) == 1.0
            check(out, oracle(fn, *args), np.float16)
