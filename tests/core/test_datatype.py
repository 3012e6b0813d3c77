import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import scalify as sfy


def test_scaled_array_properties_and_value():
    x = sfy.ScaledArray(jnp.arange(6, dtype=jnp.float16).reshape(2, 3), jnp.float32(0.5))
    assert x.shape == (2, 3) and x.dtype == np.float16 and x.size == 6 and x.ndim == 2
    assert x.aval.shape == (2, 3) and x.aval.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(x), np.arange(6).reshape(2, 3) * 0.5)
    assert x.to_array(jnp.float32).dtype == np.float32
    y = x.astype(jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and y.scale is x.scale


def test_to_array_keeps_range_in_float32():
    x = sfy.ScaledArray(jnp.full((3,), 1.5, jnp.float16), jnp.float32(2.0**-60))
    np.testing.assert_array_equal(x.to_array(jnp.float32), np.full(3, 1.5 * 2.0**-60, np.float32))
    # In float16 the value underflows, as any float16 would.
    assert np.all(np.asarray(x.to_array()) == 0)


def test_pytree_roundtrip_and_jit():
    x = sfy.scaled_array([1.0, 2.0], 4.0, dtype=jnp.float16)
    leaves, tree = jax.tree.flatten(x)
    assert len(leaves) == 2
    y = jax.tree.unflatten(tree, leaves)
    assert isinstance(y, sfy.ScaledArray)
    out = jax.jit(lambda a: a)(x)
    assert isinstance(out, sfy.ScaledArray) and out.dtype == np.float16
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(x)[0]]
    assert paths == [".data", ".scale"]
    shapes = jax.eval_shape(lambda a: a, x)
    assert shapes.shape == (2,) and shapes.scale.shape == ()


def test_as_scaled_array_and_asarray_roundtrip():
    tree = {"w": jnp.ones((2, 2), jnp.float16), "step": jnp.int32(3), "b": np.float32(2.0)}
    s = sfy.as_scaled_array(tree, scale=0.25)
    assert isinstance(s["w"], sfy.ScaledArray) and s["step"] is tree["step"]
    np.testing.assert_array_equal(s["w"].data, np.full((2, 2), 4.0, np.float16))
    back = sfy.asarray(s)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["b"] == 2.0 and back["step"] == 3
    assert sfy.asarray(s, dtype=jnp.float32)["w"].dtype == np.float32


@pytest.mark.parametrize(
    "data, scale, err, match",
    [
        (jnp.arange(3), 1.0, TypeError, "floating"),
        (jnp.ones(3), jnp.ones(2), TypeError, "scalar"),
        (jnp.ones(3), np.float32(np.inf), ValueError, "finite"),
        (jnp.ones(3), np.float32(-1.0), ValueError, ">= 0"),
        (jnp.ones(3), np.int32(2), TypeError, "floating"),
    ],
)
def test_bad_scaled_arrays_are_rejected(data, scale, err, match):
    with pytest.raises(err, match=match):
        sfy.ScaledArray(data, scale)


def test_factory_checks_concrete_jax_scales():
    with pytest.raises(ValueError, match="finite"):
        sfy.scaled_array([1.0], jnp.float32(np.nan))
    with pytest.raises(TypeError, match="scalar"):
        sfy.as_scaled_array(jnp.ones(2), scale=jnp.ones(2))


def test_float8_data_is_accepted():
    x = sfy.ScaledArray(jnp.ones(4, ml_dtypes.float8_e4m3fn), np.float32(8.0))
    np.testing.assert_array_equal(np.asarray(x.to_array(jnp.float32)), np.full(4, 8.0))
