"""Reduction rules: reduce_sum measures its output scale (N >= 16 reduced elements) or
moves pow2(sqrt(N)) into the scale, max/min keep it, prod raises it to the N-th power,
argmax/argmin return plain integers."""
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import scalify as sfy
from scalify.core.config import get_config
from tests.utils import both, assert_close, assert_finite, assert_pow2_scales, oracle, rtol_of, scaled

DTYPES = [np.float32, np.float16, jnp.bfloat16]
RNG = np.random.default_rng(1)
X = RNG.standard_normal((4, 5, 6)).astype(np.float32)




def pow2_sqrt_down(n):
    return 2.0 ** np.floor(np.log2(np.sqrt(n))) if n > 1 else 1.0


def expected_scale(x, axes):
    """The rule's documented output scale for ``reduce_sum(x, axes)``."""
    n = int(np.prod([x.shape[a] for a in axes]))
    if n < get_config().measured_min_reduced:
        return float(x.scale) * pow2_sqrt_down(n)
    total = np.sum(np.asarray(x.data, np.float64), axes)
    rms = np.sqrt(np.mean(total**2))
    return float(x.scale) * (2.0 ** np.floor(np.log2(rms)) if rms > 0 else 1.0)


def values64(out):
    return np.asarray(out.data, np.float64) * float(out.scale)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_sum_values_and_scale(axes, dtype):
    f = lambda x: lax.reduce_sum(x, axes)  # noqa: E731
    x = scaled(X, 2.0**-7, dtype)
    n = int(np.prod([X.shape[a] for a in axes]))
    for fn in both(f):
        out = fn(x)
        assert out.dtype == np.dtype(dtype)
        assert float(out.scale) == expected_scale(x, axes), n
        assert_pow2_scales(out)
        # the f32 sum is rounded once to the data dtype
        assert_close(out, oracle(f, x), dtype, atol=float(out.scale) * 2.0**-14)


def test_reduce_sum_unit_axis_and_no_axis_keep_the_scale():
    x = scaled(X[:1], 2.0**-7)
    out = sfy.scalify(lambda x: lax.reduce_sum(x, (0,)))(x)
    assert float(out.scale) == 2.0**-7
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data[0]))
    out = sfy.scalify(lambda x: lax.reduce_sum(x, ()))(x)
    assert float(out.scale) == 2.0**-7 and out.shape == x.shape


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reduce_sum_keeps_unit_variance(offset):
    # Independent terms (offset 0) sum to ~sqrt(N); positive ones (a mean, a variance)
    # to ~N: the measured scale keeps the data near unit size in both cases.
    x = scaled(RNG.standard_normal((256, 64)) + offset, 1.0, np.float16)
    out = jax.jit(sfy.scalify(lambda x: lax.reduce_sum(x, (0,))))(x)
    assert float(out.scale) == expected_scale(x, (0,))
    assert (8.0 if offset == 0 else 128.0) <= float(out.scale) <= (16.0 if offset == 0 else 256.0)
    rms = float(np.sqrt(np.mean(np.asarray(out.data, np.float32) ** 2)))
    assert 1.0 <= rms < 2.0


def test_reduce_sum_of_zeros_is_the_zero_tensor():
    """An all-zero sum carries no magnitude: scale 0 (docs/design.md,
    contract item 4), data 0."""
    x = scaled(np.zeros((64, 3)), 2.0**-3, np.float16)
    out = jax.jit(sfy.scalify(lambda x: lax.reduce_sum(x, (0,))))(x)
    assert float(out.scale) == 0.0
    np.testing.assert_array_equal(np.asarray(out.data, np.float32), 0.0)


@pytest.mark.parametrize("scale", [2.0**-60, 2.0**60])
def test_reduce_sum_range(scale):
    f = lambda x: lax.reduce_sum(x, (0, 2))  # noqa: E731
    x = scaled(X, scale, np.float16)
    out = jax.jit(sfy.scalify(f))(x)
    assert_finite(out)
    want = np.sum(np.asarray(x.data, np.float64), (0, 2)) * scale
    np.testing.assert_allclose(values64(out), want, rtol=rtol_of(np.float16), atol=float(out.scale) * 2.0**-14)


def test_reduce_sum_rounding_mode_up():
    x = scaled(X, 1.0)
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        out = jax.jit(sfy.scalify(lambda x: lax.reduce_sum(x, (1,))))(x)
    assert float(out.scale) == 4.0  # pow2 up of sqrt(5)
    assert_close(out, X.sum(1), np.float16, atol=4 * 2.0**-14)


def test_measured_scale_rounding_modes():
    """The measured scale is pow2(rms(sum)) in the active rounding mode: DOWN from the
    mean square's exponent bits, UP through the square root; both exact at and next to a
    power of two (rms exactly 4, and just below and above it)."""
    for rms in (4.0, 4.0 * (1 - 2.0**-20), 4.0 * (1 + 2.0**-20), 3.0, 0.75):
        x = scaled(np.full((16, 4), rms / 16, np.float32), 1.0, np.float32)  # each sum: rms
        f = jax.jit(sfy.scalify(lambda x: lax.reduce_sum(x, (0,))))
        total = float(np.sum(np.full(16, np.float32(rms / 16), np.float32)))
        down = 2.0 ** np.floor(np.log2(total))
        assert float(f(x).scale) == down, rms
        with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
            up = jax.jit(sfy.scalify(lambda x: lax.reduce_sum(x, (0,))))(x)
        assert float(up.scale) == (down if down == total else 2 * down), rms
        assert_close(up, np.asarray(x.data).sum(0), np.float32)


def test_jnp_sum_keepdims_float32_data():
    x = scaled(X, 2.0**50, np.float32)
    for f in (lambda x: jnp.sum(x, axis=(0, 2), keepdims=True), lambda x: x.sum(axis=-1, keepdims=True)):
        for fn in both(f):
            out = fn(x)
            assert out.shape == f(X).shape
            assert_close(out, oracle(f, x), np.float32, atol=float(out.scale) * 1e-6)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_jnp_sum_narrow_data(dtype):
    x = scaled(X, 2.0**-50, dtype)
    f = lambda x: jnp.sum(x, axis=(1, 2), keepdims=True)  # noqa: E731
    out = jax.jit(sfy.scalify(f))(x)
    assert out.dtype == np.dtype(dtype) and out.shape == (4, 1, 1)
    assert_close(out, oracle(f, x), dtype)


def test_jnp_mean_float32_data():
    x = scaled(X, 2.0**-50, np.float32)
    for f in (lambda x: jnp.mean(x, axis=(0, 1)), lambda x: jnp.mean(x, axis=1, keepdims=True)):
        out = jax.jit(sfy.scalify(f))(x)
        assert_close(out, oracle(f, x), np.float32, atol=2.0**-50 * 1e-6)


@pytest.mark.parametrize("prim", ["max", "min"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_max_min_exact_same_scale(prim, dtype):
    jfn = {"max": jnp.max, "min": jnp.min}[prim]
    fs = [lambda x: jfn(x, axis=(0, 2)), lambda x: jfn(x, axis=1, keepdims=True), lambda x: jfn(x)]
    x = scaled(X, 2.0**60, dtype)
    for f in fs:
        for fn in both(f):
            out = fn(x)
            assert float(out.scale) == 2.0**60 and out.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(out.data, np.float32), np.asarray(f(x.data), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_prod_values_and_scale(dtype):
    f = lambda x: lax.reduce_prod(x, (1,))  # noqa: E731
    data = 1 + 0.25 * X  # product of 5 values near 1: stays in range
    x = scaled(data, 2.0**-4, dtype)
    for fn in both(f):
        out = fn(x)
        assert float(out.scale) == 2.0**-20  # (2^-4)^5
        want = np.prod(np.asarray(x.data, np.float64), 1) * 2.0**-20
        np.testing.assert_allclose(values64(out), want, rtol=rtol_of(dtype), atol=2.0**-20 * 2.0**-14)


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_argmin_are_plain(op, dtype):
    jfn = {"argmax": jnp.argmax, "argmin": jnp.argmin}[op]
    x = scaled(X, 2.0**-60, dtype)
    for f in (lambda x: jfn(x, axis=1), lambda x: jfn(x, axis=-1, keepdims=True), lambda x: jfn(x)):
        for fn in both(f):
            out = fn(x)
            assert not isinstance(out, sfy.ScaledArray)
            assert jnp.issubdtype(out.dtype, jnp.integer)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(f(x.data)))


# --- property test -----------------------------------------------------------------

PROP_DTYPES = [np.float32, np.float16, jnp.bfloat16]


@st.composite
def reduce_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))
    axes = draw(st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1, max_size=len(shape)))
    dtype = draw(st.sampled_from(PROP_DTYPES))
    exponent = draw(st.integers(-60, 60))
    seed = draw(st.integers(0, 2**16))
    return shape, tuple(sorted(axes)), dtype, exponent, seed


@given(reduce_cases())
def test_property_reduce_sum(case):
    shape, axes, dtype, exponent, seed = case
    data = np.random.default_rng(seed).standard_normal(shape)
    x = scaled(data, 2.0**exponent, dtype)
    out = sfy.scalify(lambda x: lax.reduce_sum(x, axes))(x)
    assert float(out.scale) == expected_scale(x, axes)
    assert out.dtype == np.dtype(dtype)
    want = np.sum(np.asarray(x.data, np.float64), axes) * 2.0**exponent
    np.testing.assert_allclose(values64(out), want, rtol=rtol_of(dtype), atol=float(out.scale) * 2.0**-13)


@given(reduce_cases())
def test_property_reduce_max(case):
    shape, axes, dtype, exponent, seed = case
    data = np.random.default_rng(seed).standard_normal(shape)
    x = scaled(data, 2.0**exponent, dtype)
    out = sfy.scalify(lambda x: lax.reduce_max(x, axes))(x)
    assert float(out.scale) == 2.0**exponent
    np.testing.assert_array_equal(values64(out), np.max(np.asarray(x.data, np.float64), axes) * 2.0**exponent)


def test_float8_reduce_sum_saturates_instead_of_nan():
    # 8 equal terms of 200 sum to 1600; /2 gives 800 > 448 = max of E4M3FN.
    x = scaled(np.full((8,), 200.0), 1.0, ml_dtypes.float8_e4m3fn)
    out = sfy.scalify(lambda x: lax.reduce_sum(x, (0,)))(x)
    assert float(out.scale) == 2.0
    assert float(np.asarray(out.data, np.float32)) == 448.0


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
@pytest.mark.parametrize("narrow", [True, False])
def test_measured_sum_of_16bit_data_leaves_in_16_bits(dtype, narrow):
    """With `narrow_contractions` (by default: several devices) a measured sum of 16-bit
    data is a contraction with a constant vector whose output is 16-bit, so a sum over a
    sharded batch is reduced across devices in 16 bits; its partial sums never overflow:
    here 4096 products of 2**12 sum to 2**24, far beyond float16, and the value is exact."""
    x = scaled(np.full((4096, 3), 2.0**12), 2.0**-30, dtype)
    f = lambda x: lax.reduce_sum(x, (0,))  # as a broadcast's transpose sums a gradient  # noqa: E731
    config = sfy.ScalifyConfig(narrow_contractions=narrow)
    with config:
        text = jax.jit(sfy.scalify(f)).lower(x).as_text()
        outs = [fn(x) for fn in both(f)]
    narrow_dt = "f16" if np.dtype(dtype) == np.float16 else "bf16"
    assert bool(re.search(rf"dot_general.*->\s*tensor<3x{narrow_dt}>", text)) == narrow, text
    for out in outs:
        assert_finite(out)
        assert_pow2_scales([out])
        np.testing.assert_array_equal(values64(out), 2.0**24 * 2.0**-30)
    # A sum of an unguarded float16 elementwise chain's result (float32 inside scalify
    # until rounded) too; a guarded one (a product: 2**24 per element here, beyond
    # float16 at its static scale) is summed in float32 in device groups whose sums
    # are rounded, guarded, and summed in 16 bits. Both exact (powers of two).
    for g, want in ((lambda x: f(x + 1.0), 4096 * (2.0**-18 + 1)), (lambda x: f(x * x), 2.0**36 * 2.0**-60)):
        with config:
            text = jax.jit(sfy.scalify(g)).lower(x).as_text()
            out = jax.jit(sfy.scalify(g))(x)
        assert bool(re.search(rf"dot_general.*->\s*tensor<3x{narrow_dt}>", text)) == narrow, text
        assert_finite(out)
        np.testing.assert_allclose(values64(out), want, rtol=rtol_of(dtype))
    # Zero-mean data: the sum's one rounding, against float64.
    y = scaled(RNG.standard_normal((512, 7)), 2.0**5, dtype)
    with config:
        out = jax.jit(sfy.scalify(f))(y)
    want = np.sum(np.asarray(y.data, np.float64), 0) * 2.0**5
    np.testing.assert_allclose(values64(out), want, rtol=rtol_of(dtype), atol=rtol_of(dtype) * np.abs(want).max())
