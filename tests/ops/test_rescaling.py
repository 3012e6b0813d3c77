"""scalify.ops dynamic rescaling: the data's norm moves into the scale, the value stays."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from tests.utils import assert_close, assert_finite, assert_pow2_scales, scaled

RNG = np.random.default_rng(0)
X = (RNG.standard_normal((4, 8)) * 37.0).astype(np.float32)
NORMS = {
    "l1": lambda d: np.mean(np.abs(d)),
    "l2": lambda d: np.sqrt(np.mean(d.astype(np.float64) ** 2)),
    "max": lambda d: np.max(np.abs(d)),
}
FWD = {"l1": sfy.ops.dynamic_rescale_l1, "l2": sfy.ops.dynamic_rescale_l2, "max": sfy.ops.dynamic_rescale_max}
GRAD = {
    "l1": sfy.ops.dynamic_rescale_l1_grad,
    "l2": sfy.ops.dynamic_rescale_l2_grad,
    "max": sfy.ops.dynamic_rescale_max_grad,
}


def check_rescaled(out, before, norm):
    """Same value (bit-exact: power-of-two factor), pow2 scale, data norm in [1, 2)."""
    assert isinstance(out, sfy.ScaledArray) and out.dtype == before.dtype
    assert_pow2_scales(out)
    np.testing.assert_array_equal(
        np.asarray(out.to_array(jnp.float32)), np.asarray(before.to_array(jnp.float32))
    )
    n = NORMS[norm](np.asarray(out.data, np.float32))
    assert 1.0 <= n < 2.0, n


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_rescale_inside_and_outside(norm, dtype):
    sa = scaled(X, 2.0**-20, dtype)
    fn = FWD[norm]
    for f in [fn, jax.jit(fn), sfy.scalify(fn), jax.jit(sfy.scalify(fn))]:
        check_rescaled(f(sa), sa, norm)


@pytest.mark.parametrize("norm", list(NORMS))
def test_plain_is_identity(norm):
    x = jnp.asarray(X, jnp.float16)
    for f in [FWD[norm], jax.jit(FWD[norm]), sfy.scalify(FWD[norm]), GRAD[norm]]:
        out = f(x)
        assert not isinstance(out, sfy.ScaledArray)
        np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("data", [np.zeros((3, 2)), np.full((3, 2), np.nan), np.full((3, 2), np.inf), np.zeros((0,))])
def test_degenerate_data_keeps_scale(norm, data):
    """All zeros (or NaN/inf, or empty): the scale stays as it was — never 0 or inf."""
    sa = scaled(data, 0.5, np.float16)
    for f in [FWD[norm], sfy.scalify(FWD[norm])]:
        out = f(sa)
        assert float(out.scale) == 0.5
        np.testing.assert_array_equal(np.asarray(out.data), np.asarray(sa.data))


@pytest.mark.parametrize("norm", list(NORMS))
def test_extreme_values(norm):
    """Values beyond float32 range (held as data * scale) keep a finite scale; tiny
    values in float32 data get a tiny scale and unit data."""
    huge = scaled(X, 2.0**125, np.float32)  # values ~2**131: beyond float32
    out = sfy.scalify(FWD[norm])(huge)
    assert np.isfinite(float(out.scale)) and float(out.scale) <= 2.0**127
    assert_finite(out.data)
    np.testing.assert_array_equal(
        np.asarray(out.data, np.float64) * float(out.scale), np.asarray(huge.data, np.float64) * 2.0**125
    )
    tiny = scaled(X * 1e-30, 1.0, np.float32)
    out = sfy.scalify(FWD[norm])(tiny)
    assert 1.0 <= NORMS[norm](np.asarray(out.data)) < 2.0
    assert_close(out, X * np.float32(1e-30), np.float32)


def test_rounding_mode_up():
    sa = scaled(X, 1.0, np.float32)
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        out = sfy.scalify(sfy.ops.dynamic_rescale_max)(sa)
    assert_pow2_scales(out)
    assert 0.5 < np.max(np.abs(np.asarray(out.data))) <= 1.0


def _vjp(f, x, ct):
    _, vjp = jax.vjp(f, x)
    return vjp(ct)[0]


@pytest.mark.parametrize("norm", list(NORMS))
def test_grad_variant(norm):
    g = GRAD[norm]
    sa = scaled(X, 2.0**-3, np.float16)
    # Forward: identity, inside and outside scalify.
    for f in [g, sfy.scalify(g)]:
        out = f(sa)
        np.testing.assert_array_equal(out.data, sa.data)
        assert float(out.scale) == float(sa.scale)
    # Backward inside scalify: the cotangent is rescaled (same value).
    ct = scaled(X[::-1] * 1e-3, 2.0**-30, np.float16)
    for f in [sfy.scalify(functools.partial(_vjp, g)), jax.jit(sfy.scalify(functools.partial(_vjp, g)))]:
        check_rescaled(f(sa, ct), ct, norm)
    # The forward rescaling leaves the gradient untouched.
    out = sfy.scalify(functools.partial(_vjp, FWD[norm]))(sa, ct)
    assert float(out.scale) == float(ct.scale)
    np.testing.assert_array_equal(out.data, ct.data)
    # Outside scalify, plain: identity gradient.
    x = jnp.asarray(X)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(g(x) * 2))(x), np.full(X.shape, 2.0))


def test_grad_inside_scalify_end_to_end():
    """jax.grad inside scalify through forward and gradient rescaling: same gradient as
    the float32 oracle; the gradient's data has unit scale."""

    def loss(x):
        y = sfy.ops.dynamic_rescale_l2(x * x)
        y = sfy.ops.dynamic_rescale_l2_grad(y)
        return jnp.sum(sfy.lax.stop_scaling(y, jnp.float32)) * 1e-6

    sa = scaled(X, 2.0**-10, np.float16)
    got = sfy.scalify(jax.grad(loss))(sa)
    want = jax.grad(lambda x: jnp.sum(x * x) * 1e-6)(np.asarray(sa.to_array(jnp.float32)))
    assert_close(got, want, np.float16)
    assert_pow2_scales(got)


def test_vmap_plain_and_inside():
    x = jnp.asarray(X, jnp.float32)
    np.testing.assert_array_equal(jax.vmap(sfy.ops.dynamic_rescale_l2)(x), x)
    sa = scaled(X, 1.0, np.float32)
    out = sfy.scalify(jax.vmap(sfy.ops.dynamic_rescale_max))(sa)
    check_rescaled(out, sa, "max")  # one shared scale for the batch
