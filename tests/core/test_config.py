import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy


def test_config_is_a_nested_context_manager():
    assert sfy.core.get_config().rounding_mode == sfy.Pow2RoundMode.DOWN
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP) as cfg:
        assert sfy.core.get_config() is cfg
        with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.NONE):
            assert sfy.core.get_config().rounding_mode == sfy.Pow2RoundMode.NONE
        assert sfy.core.get_config() is cfg
    assert sfy.core.get_config().rounding_mode == sfy.Pow2RoundMode.DOWN


def test_config_is_read_at_trace_time():
    x = sfy.ScaledArray(jnp.ones((4,), jnp.float16), jnp.float32(1.0))
    f = jax.jit(sfy.scalify(lambda a, b: a + b))
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        up = f(x, x)  # traced here: sqrt(2) rounds up to 2
    assert float(up.scale) == 2.0
    assert float(f(x, x).scale) == 2.0  # cached trace: the config at trace time stays
    down = jax.jit(sfy.scalify(lambda a, b: a + b))(x, x)
    assert float(down.scale) == 1.0
    np.testing.assert_array_equal(sfy.asarray(up, jnp.float32), sfy.asarray(down, jnp.float32))


def test_none_rounding_gives_exact_hypot():
    x = sfy.ScaledArray(jnp.ones((4,), jnp.float32), jnp.float32(1.0))
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.NONE):
        out = sfy.scalify(lambda a, b: a + b)(x, x)
    np.testing.assert_allclose(float(out.scale), np.sqrt(2), rtol=1e-6)


def test_bad_config_values():
    with pytest.raises(TypeError, match="rounding_mode"):
        sfy.ScalifyConfig(rounding_mode="down")
    with pytest.raises(TypeError, match="scale_dtype"):
        sfy.ScalifyConfig(scale_dtype=np.int32)
    with pytest.raises(TypeError, match="scales_computed_once"):
        sfy.ScalifyConfig(scales_computed_once=1)
    for bad in (0, 2.5, True):
        with pytest.raises(TypeError, match="measured_min_reduced"):
            sfy.ScalifyConfig(measured_min_reduced=bad)


def test_measured_min_reduced_chooses_the_sum_rule():
    """A sum of 64 equal terms measures its scale by default (pow2(64) = 64); above the
    threshold it takes the static pow2(sqrt(64)) = 8."""
    x = sfy.scaled_array(np.ones((64,), np.float32), np.float32(1.0))
    f = sfy.scalify(lambda a: jnp.sum(a))
    assert float(f(x).scale) == 64.0
    with sfy.ScalifyConfig(measured_min_reduced=65):
        static = f(x)
    assert float(static.scale) == 8.0
    assert float(sfy.asarray(static)) == 64.0
    assert sfy.ScalifyConfig(measured_min_reduced=np.int64(4)).measured_min_reduced == 4
