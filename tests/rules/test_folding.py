"""Trace-time folding in NumPy gives the values (and dtypes) XLA computes."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from scalify.core import interpreter
from scalify.core.registry import get_static_impl

F16 = np.float16
BF16 = ml_dtypes.bfloat16

CASES = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "max": lambda a, b: lax.max(a, b),
    "min": lambda a, b: lax.min(a, b),
    "neg_abs_sqrt": lambda a, b: jnp.sqrt(jnp.abs(-a)) + b,
    "compare_select": lambda a, b: lax.select(a < b, a, b) + lax.select(a >= b, a, b),
    "logic": lambda a, b: ((a == b) | (a != b)) & ~(a > b),
    "convert": lambda a, b: a.astype(jnp.float32) * b.astype(jnp.float16).astype(jnp.float32),
    "broadcast_reshape_transpose": lambda a, b: jnp.transpose(
        jnp.broadcast_to(a.reshape(2, 3), (4, 2, 3)), (2, 0, 1)).squeeze() + b.reshape(1, 2, 3).T.reshape(3, 1, 2),
    "tril_mask": lambda a, b: jnp.where(jnp.tril(jnp.ones((6, 6), bool)), a[:, None], -jnp.inf),
}


def _values(dtype):
    a = np.array([1.5, -2.0, 0.0, np.inf, 3.25e-3, 7.0], dtype)
    b = np.array([0.5, -2.0, 3.0, 2.0, -0.0, np.nan], dtype)
    return a, b


# Integer division and sqrt have float-only evaluators (see the fallback tests below).
PARAMS = [(n, d) for n in sorted(CASES) for d in (np.float32, F16, BF16, np.int32)
          if not (d == np.int32 and n in ("div", "neg_abs_sqrt"))]


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_folded_values_equal_xla(name, dtype, monkeypatch):
    fn = CASES[name]
    a, b = _values(np.float32)
    if dtype == np.int32:
        a, b = np.array([1, -2, 0, 5, 3, 7], dtype), np.array([4, -2, 3, 2, 0, -9], dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    closed = jax.make_jaxpr(fn)(a, b)

    def no_xla(eqn, invals):
        raise AssertionError(f"{eqn.primitive} was folded through XLA, not NumPy")

    monkeypatch.setattr(interpreter, "bind", no_xla)
    # The operands as static NumPy values: every equation folds at trace time.
    folded = interpreter.eval_closed_jaxpr(closed, a, b)
    monkeypatch.undo()
    want = jax.jit(fn)(a, b)
    assert all(isinstance(o, np.ndarray) for o in folded), [type(o) for o in folded]
    got = folded[0]
    assert got.dtype == np.asarray(want).dtype
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))


def test_integer_division_falls_back_to_xla_truncation():
    a, b = np.array([-7, 7], np.int32), np.array([2, -2], np.int32)
    assert get_static_impl(lax.div_p)(a, b) is NotImplemented
    folded = interpreter.eval_closed_jaxpr(jax.make_jaxpr(lax.div)(a, b), a, b)[0]
    np.testing.assert_array_equal(folded, [-3, -3])  # NumPy's // would give -4


def test_float_to_int_conversion_falls_back():
    assert get_static_impl(lax.convert_element_type_p)(
        np.array([1e10], np.float32), new_dtype=np.int32) is NotImplemented


def test_uniform_folds_stay_zero_copy_views():
    closed = jax.make_jaxpr(lambda: jnp.full((1024, 1024), -1.0) / 128.0)()
    out = interpreter.eval_closed_jaxpr(closed)[0]
    assert out.strides == (0, 0)
    assert out[0, 0] == -1.0 / 128


def test_large_iota_is_not_embedded():
    closed = jax.make_jaxpr(lambda: lax.iota(np.int32, 1 << 20))()
    out = interpreter.eval_closed_jaxpr(closed)[0]
    assert not isinstance(out, np.ndarray)  # left as an iota in the program
    small = interpreter.eval_closed_jaxpr(jax.make_jaxpr(lambda: lax.iota(np.int32, 8))())[0]
    np.testing.assert_array_equal(small, np.arange(8))


def test_constant_its_narrow_dtype_flushes_is_read_at_its_scale():
    """A float32 constant cast to float16 (``tol**2 * |b|**2`` in
    ``jax.scipy.sparse.linalg.cg``) flushes to 0 there; a scaled operation reading it
    gets the float32 value at its own scale, while a plain float16 computation still
    computes what JAX computes. A constant that overflows stays infinite (a mask fill:
    a selection against it must not take its scale)."""
    import scalify as sfy

    def fn(x, c):
        return x * jnp.square(jnp.float32(np.sqrt(c))).astype(x.dtype)

    xv = np.array([1.0, -0.75, 0.5], np.float32)
    x = sfy.ScaledArray(jnp.asarray(xv, F16), jnp.float32(2.0**30))
    got = np.asarray(sfy.asarray(jax.jit(sfy.scalify(lambda x: fn(x, 1e-12)))(x), dtype=jnp.float32))
    want = xv.astype(np.float64) * 2.0**30 * np.float32(1e-6) ** 2
    np.testing.assert_allclose(got, want, rtol=2e-3)
    plain = sfy.scalify(lambda x: fn(x, 1e-12))(jnp.asarray(xv, F16))
    np.testing.assert_array_equal(np.asarray(plain), np.zeros(3, F16))  # as JAX

    def masked(x):
        fill = jnp.negative(jnp.float32(1e9)).astype(x.dtype)  # -inf in float16
        return jnp.where(jnp.arange(3) < 2, x, fill)

    x = sfy.ScaledArray(jnp.asarray(xv, F16), jnp.float32(1.0))
    got = np.asarray(sfy.asarray(jax.jit(sfy.scalify(masked))(x), dtype=jnp.float32))
    np.testing.assert_array_equal(got, [1.0, -0.75, -np.inf])
