"""The power of two of a tensor's RMS (scalify/core/rms.py), and the three places that
measure a scale with it."""
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core.datatype import unit_scale
from scalify.core.rms import pow2_rms
from scalify.lax.scaling import rescale_by_norm

RNG = np.random.default_rng(0)


def rms_pow2(x, mode="down"):
    r = np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))
    return 2.0 ** (np.floor(np.log2(r)) if mode == "down" else np.ceil(np.log2(r)))


@pytest.mark.parametrize("k", [-40, -3, 0, 5, 40])
@pytest.mark.parametrize("normalise", [True, False])
def test_power_of_two_of_the_rms(k, normalise):
    x = (RNG.standard_normal((64,)) * 2.0**k).astype(np.float32)
    m, inv = pow2_rms(jnp.asarray(x), normalise=normalise)
    if normalise or abs(k) < 30:  # without normalising, squares of 2**+-40 leave float32
        assert float(m) == rms_pow2(x) and float(m) * float(inv) == 1.0


def test_rounding_mode():
    x = jnp.asarray(RNG.standard_normal((64,)).astype(np.float32) * 3)
    m, inv = pow2_rms(x, mode=sfy.Pow2RoundMode.UP)
    assert float(m) == rms_pow2(x, "up") and float(m) * float(inv) == 1.0


@pytest.mark.parametrize("normalise", [True, False])
def test_zeros_give_zero_and_non_finite_gives_one(normalise):
    assert tuple(map(float, pow2_rms(jnp.zeros((8,)), normalise=normalise))) == (0.0, 1.0)
    for bad in (np.inf, np.nan):
        x = jnp.asarray(np.array([1.0, bad], np.float32))
        assert tuple(map(float, pow2_rms(x, normalise=normalise))) == (1.0, 1.0)


def test_measured_scales_agree():
    """unit_scale, rescale_by_norm('l2') and a measured reduce_sum use the same RMS."""
    x = (RNG.standard_normal((32, 64)) * 2.0**-20).astype(np.float32)
    m = float(pow2_rms(jnp.asarray(x))[0])
    assert float(unit_scale(x)) == m
    _, s = rescale_by_norm(jnp.asarray(x), np.float32(1), "l2")
    assert float(s) == m
    out = sfy.scalify(lambda a: jnp.sum(a, axis=0))(sfy.scaled_array(x, np.float32(1)))
    assert float(out.scale) == float(pow2_rms(jnp.sum(jnp.asarray(x), axis=0))[0])
