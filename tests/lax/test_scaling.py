"""scalify.lax: get_data_scale, set_scaling, stop_scaling, rebalance — inside and outside
scalify, eagerly and under jit, on ScaledArrays and plain arrays; gradients and vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from tests.utils import assert_close, assert_finite, assert_pow2_scales, oracle, scaled

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4)).astype(np.float32)
DTYPES = [np.float32, np.float16, jnp.bfloat16]


def modes(f):
    """``f`` eagerly and under jit."""
    return [f, jax.jit(f)]


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


# --- get_data_scale ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_get_data_scale_outside_scaled(dtype):
    sa = scaled(X, 0.25, dtype)
    for f in modes(sfy.lax.get_data_scale):
        data, scale = f(sa)
        np.testing.assert_array_equal(bits(data), bits(sa.data))
        assert float(scale) == 0.25


def test_get_data_scale_outside_plain():
    x = jnp.asarray(X, jnp.float16)
    for f in modes(sfy.lax.get_data_scale):
        data, scale = f(x)
        np.testing.assert_array_equal(bits(data), bits(x))
        assert scale.shape == () and scale.dtype == np.float32 and float(scale) == 1.0


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_get_data_scale_inside(dtype):
    sa = scaled(X, 2.0**-20, dtype)
    for f in modes(sfy.scalify(sfy.lax.get_data_scale)):
        data, scale = f(sa)
        assert not isinstance(data, sfy.ScaledArray) and not isinstance(scale, sfy.ScaledArray)
        np.testing.assert_array_equal(bits(data), bits(sa.data))
        assert float(scale) == 2.0**-20
        # A plain input has scale 1.
        data, scale = f(sa.data)
        np.testing.assert_array_equal(bits(data), bits(sa.data))
        assert float(scale) == 1.0


def test_get_data_scale_inside_value_recombines():
    """data * scale computed inside scalify from get_data_scale is the value."""

    def f(x):
        d, s = sfy.lax.get_data_scale(x)
        return d.astype(jnp.float32) * s

    sa = scaled(X, 2.0**40, np.float16)
    out = sfy.scalify(f)(sa)
    assert_close(sfy.asarray(out, jnp.float32), oracle(lambda x: x, sa), np.float16)


# --- set_scaling -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_scaling_outside_scaled(dtype):
    sa = scaled(X, 4.0, dtype)
    for f in modes(sfy.lax.set_scaling):
        out = f(sa, 0.5)
        assert isinstance(out, sfy.ScaledArray) and out.dtype == np.dtype(dtype)
        assert float(out.scale) == 0.5
        # Ratio of scales is a power of two: the data is multiplied exactly.
        np.testing.assert_array_equal(np.asarray(out.data, np.float32), np.asarray(sa.data, np.float32) * 8)


def test_set_scaling_outside_plain_is_identity():
    x = jnp.asarray(X, jnp.float16)
    for f in modes(sfy.lax.set_scaling):
        out = f(x, 8.0)
        assert not isinstance(out, sfy.ScaledArray)
        np.testing.assert_array_equal(bits(out), bits(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_scaling_inside(dtype):
    sa = scaled(X, 2.0**-30, dtype)

    def f(x, y):
        return sfy.lax.set_scaling(x, 2.0**-28), sfy.lax.set_scaling(y, 16.0)

    y = jnp.asarray(X * 100, dtype)
    for g in modes(sfy.scalify(f)):
        a, b = g(sa, y)
        assert isinstance(a, sfy.ScaledArray) and float(a.scale) == 2.0**-28
        np.testing.assert_array_equal(np.asarray(a.to_array(jnp.float32)), np.asarray(sa.to_array(jnp.float32)))
        # A plain array becomes a ScaledArray inside scalify.
        assert isinstance(b, sfy.ScaledArray) and float(b.scale) == 16.0 and b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(b.to_array(jnp.float32)), np.asarray(y, np.float32))


def test_set_scaling_inside_dynamic_and_scaled_scale():
    """The scale may be a traced value, or a ScaledArray computed inside scalify."""
    sa = scaled(X, 1.0, np.float16)

    def f(x, s):
        a = sfy.lax.set_scaling(x, s)
        b = sfy.lax.set_scaling(x, s * 2)  # s * 2 is a ScaledArray here
        return a, b

    s = sfy.ScaledArray(jnp.asarray(1.0, jnp.float32), jnp.asarray(4.0, jnp.float32))
    for g in modes(sfy.scalify(f)):
        a, b = g(sa, s)
        assert float(a.scale) == 4.0 and float(b.scale) == 8.0
        assert_close(a, X, np.float16)
        assert_close(b, X, np.float16)
    a, _ = jax.jit(sfy.scalify(f))(sa, jnp.float32(0.125))
    assert float(a.scale) == 0.125
    assert_close(a, X, np.float16)


def test_set_scaling_inside_keeps_range():
    """1e30 held in float16 data: re-expressing it in another large scale stays finite."""
    sa = scaled(X, 2.0**100, np.float16)
    out = sfy.scalify(lambda x: sfy.lax.set_scaling(x, 2.0**97))(sa)
    assert_finite(out)
    assert_close(out, oracle(lambda x: x, sa), np.float16)


def test_set_scaling_int_stays_plain():
    i = jnp.arange(4)
    out = sfy.scalify(lambda i: sfy.lax.set_scaling(i, 2.0))(i)
    assert not isinstance(out, sfy.ScaledArray)
    np.testing.assert_array_equal(out, i)


@pytest.mark.parametrize("bad", [jnp.ones((2,)), np.ones((1,), np.float32)])
def test_set_scaling_non_scalar_scale(bad):
    sa = scaled(X, 1.0)
    with pytest.raises(TypeError, match="scalar"):
        sfy.lax.set_scaling(sa, bad)
    with pytest.raises(TypeError, match="scalar"):
        sfy.lax.set_scaling(sa.data, bad)
    with pytest.raises(TypeError, match="scalar"):
        sfy.scalify(lambda x, s: sfy.lax.set_scaling(x, s))(sa, jnp.ones((2,)))
    with pytest.raises(TypeError, match="scalar"):
        sfy.lax.rebalance(sa, bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, np.inf, jnp.float32(0.0)])
def test_set_scaling_non_positive_scale(bad):
    with pytest.raises(ValueError, match="positive"):
        sfy.lax.set_scaling(scaled(X, 1.0), bad)
    with pytest.raises(ValueError, match="positive"):
        sfy.scalify(lambda x: sfy.lax.set_scaling(x, -1.0))(scaled(X, 1.0))


def test_scale_must_be_float_or_int():
    with pytest.raises(TypeError):
        sfy.lax.set_scaling(scaled(X, 1.0), True)
    with pytest.raises(TypeError):
        sfy.lax.set_scaling(scaled(X, 1.0), "2")
    # Integers are accepted (converted to the scale dtype).
    out = sfy.lax.set_scaling(scaled(X, 1.0), 2)
    assert float(out.scale) == 2.0 and out.scale.dtype == np.float32


# --- rebalance ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rebalance_outside_and_inside(dtype):
    sa = scaled(X, 2.0**-5, dtype)
    outside = modes(sfy.lax.rebalance)
    inside = modes(sfy.scalify(sfy.lax.rebalance))
    for f in outside + inside:
        out = f(sa, jnp.float32(4.0))
        assert isinstance(out, sfy.ScaledArray) and out.dtype == np.dtype(dtype)
        assert float(out.scale) == 2.0**-3  # scale * 4
        np.testing.assert_array_equal(np.asarray(out.data, np.float32), np.asarray(sa.data, np.float32) / 4)
    out = sfy.scalify(lambda x: sfy.lax.rebalance(x, 0.25))(sa)
    assert float(out.scale) == 2.0**-7
    assert_pow2_scales(out)


def test_rebalance_plain_is_identity():
    x = jnp.asarray(X, jnp.float16)
    for f in modes(sfy.lax.rebalance) + modes(sfy.scalify(sfy.lax.rebalance)):
        out = f(x, jnp.float32(4.0))
        assert not isinstance(out, sfy.ScaledArray)
        np.testing.assert_array_equal(bits(out), bits(x))


# --- stop_scaling ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, np.float32, np.float16])
def test_stop_scaling(dtype, out_dtype):
    sa = scaled(X, 2.0**-3, dtype)
    want = np.asarray(sa.to_array(out_dtype))
    expected_dtype = np.dtype(out_dtype or dtype)
    f = lambda x: sfy.lax.stop_scaling(x, out_dtype)  # noqa: E731
    for g in modes(f) + modes(sfy.scalify(f)):
        out = g(sa)
        assert not isinstance(out, sfy.ScaledArray) and out.dtype == expected_dtype
        np.testing.assert_array_equal(bits(out), bits(want))
        # A plain array: only the cast.
        out = g(sa.data)
        np.testing.assert_array_equal(bits(out), bits(sa.data.astype(expected_dtype)))


def test_stop_scaling_value_beyond_data_range():
    """1e30 in float16 data: the float32 plain value is right (computed in float32)."""
    sa = scaled(X, 2.0**100, np.float16)
    out = sfy.scalify(lambda x: sfy.lax.stop_scaling(x, jnp.float32))(sa)
    assert_close(out, oracle(lambda x: x, sa), np.float16)


# --- gradients ---------------------------------------------------------------------------


def _loss(x):
    y = sfy.lax.set_scaling(x, 4.0)
    y = sfy.lax.rebalance(y, 2.0) * x
    return jnp.sum(sfy.lax.stop_scaling(y, jnp.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_grad_inside_scalify(dtype):
    sa = scaled(X, 2.0**-4, dtype)
    want = oracle(jax.grad(_loss), sa)  # 2 x
    for g in modes(sfy.scalify(jax.grad(_loss))):
        out = g(sa)
        assert isinstance(out, sfy.ScaledArray)
        assert_close(out, want, dtype)
        assert_pow2_scales(out)


def test_grad_outside_scalify_plain():
    x = jnp.asarray(X)
    for g in modes(jax.grad(_loss)):
        np.testing.assert_allclose(g(x), 2 * X, rtol=1e-6)
    for g in modes(jax.grad(lambda x: jnp.sum(sfy.lax.get_data_scale(x)[0] * 3))):
        np.testing.assert_allclose(g(x), np.full_like(X, 3.0))


def test_vjp_stop_scaling_tiny_cotangent():
    """A float32 cotangent of 1e-9 (below float16's smallest subnormal) comes back through
    stop_scaling as a ScaledArray with float16 data: nothing underflows."""
    sa = scaled(X, 1.0, np.float16)
    ct = (RNG.standard_normal(X.shape) * 1e-9).astype(np.float32)

    def g(x, ct):
        _, vjp = jax.vjp(lambda x: sfy.lax.stop_scaling(x, jnp.float32), x)
        return vjp(ct)[0]

    for h in modes(sfy.scalify(g)):
        out = h(sa, ct)
        assert isinstance(out, sfy.ScaledArray) and out.dtype == np.float16
        assert_pow2_scales(out)
        assert np.max(np.abs(np.asarray(out.data, np.float32))) < 2
        assert_close(out, ct, np.float16)
    # Plain float16 would have flushed it to zero.
    assert not np.any(np.asarray(g(sa.data, ct)))


def test_vjp_set_scaling_rebalance_pass_gradient():
    sa = scaled(X, 8.0, np.float16)
    ct = scaled(X[::-1], 2.0**-12, np.float16)

    def g(x, ct):
        _, vjp = jax.vjp(lambda x: sfy.lax.rebalance(sfy.lax.set_scaling(x, 2.0), 4.0), x)
        return vjp(ct)[0]

    for h in modes(sfy.scalify(g)):
        out = h(sa, ct)
        np.testing.assert_array_equal(np.asarray(sfy.asarray(out, jnp.float32)), np.asarray(ct.to_array(jnp.float32)))


def test_vjp_get_data_scale():
    """d data / dx = 1 / scale (the scale is held constant)."""
    sa = scaled(X, 4.0, np.float16)
    ct = jnp.asarray(X[::-1], jnp.float16)

    def g(x, ct):
        _, vjp = jax.vjp(lambda x: sfy.lax.get_data_scale(x)[0], x)
        return vjp(ct)[0]

    for h in modes(sfy.scalify(g)):
        assert_close(h(sa, ct), np.asarray(ct, np.float32) / 4, np.float16)


# --- vmap --------------------------------------------------------------------------------


def test_vmap_outside_plain():
    def f(x, s):
        d, sc = sfy.lax.get_data_scale(sfy.lax.rebalance(sfy.lax.set_scaling(x, s), s))
        return sfy.lax.stop_scaling(d, jnp.float32), sc

    x = jnp.asarray(X, jnp.float16)
    out, sc = jax.vmap(f)(x, jnp.arange(1.0, 4.0))
    np.testing.assert_array_equal(out, np.asarray(x, np.float32))
    np.testing.assert_array_equal(sc, np.ones(3))


def test_vmap_inside_scalify_shares_largest_scale():
    def f(x, s):
        return sfy.lax.set_scaling(x, s)

    sa = scaled(X, 1.0, np.float16)
    out = sfy.scalify(jax.vmap(f))(sa, jnp.asarray([2.0, 8.0, 4.0]))
    assert float(out.scale) == 8.0
    assert_close(out, X, np.float16)
