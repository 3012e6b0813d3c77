"""scalify.tree: jax.tree functions where a ScaledArray is a leaf."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from tests.utils import scaled


def make_tree():
    return {
        "w": scaled(np.arange(6.0).reshape(2, 3), 0.5, np.float32),
        "b": jnp.ones(3, jnp.float32),
        "step": jnp.asarray(3, jnp.int32),
        "mask": jnp.asarray([True, False]),
        "lr": 0.1,
        "name": None,
        "nested": [scaled([1.0, 2.0], 4.0, np.float32), (np.float32(2.5),)],
    }


def test_astype_casts_float_leaves_and_scaled_data():
    out = sfy.tree.astype(make_tree(), jnp.float16)
    assert isinstance(out["w"], sfy.ScaledArray)
    assert out["w"].dtype == np.float16 and out["w"].scale.dtype == np.float32
    assert float(out["w"].scale) == 0.5
    np.testing.assert_array_equal(out["w"].data, np.arange(6.0).reshape(2, 3))
    assert out["b"].dtype == np.float16
    assert out["nested"][0].dtype == np.float16 and float(out["nested"][0].scale) == 4.0
    assert out["nested"][1][0].dtype == np.float16
    assert out["lr"].dtype == np.float16
    # Integer, boolean and None leaves are kept.
    assert out["step"].dtype == np.int32 and out["mask"].dtype == np.bool_ and out["name"] is None
    # Same structure, with ScaledArrays as leaves.
    assert sfy.tree.structure(out) == sfy.tree.structure(make_tree())


def test_astype_floating_only_false():
    out = sfy.tree.astype({"i": jnp.arange(3), "x": jnp.ones(2)}, jnp.float32, floating_only=False)
    assert out["i"].dtype == np.float32
    with pytest.raises(TypeError, match="floating"):
        sfy.tree.astype({"w": scaled([1.0], 1.0)}, jnp.int32, floating_only=False)


def test_astype_under_jit_and_scalify():
    tree = {"w": scaled([1.0, 3.0], 2.0, np.float32), "b": jnp.ones(2)}
    out = jax.jit(lambda t: sfy.tree.astype(t, jnp.bfloat16))(tree)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16
    out = sfy.scalify(lambda t: sfy.tree.astype(t, jnp.float16))(tree)
    assert isinstance(out["w"], sfy.ScaledArray) and out["w"].dtype == np.float16
    np.testing.assert_array_equal(sfy.asarray(out["w"], jnp.float32), [2.0, 6.0])


def test_map_sees_scaled_arrays_whole():
    tree = make_tree()
    kinds = sfy.tree.map(lambda x: type(x).__name__, tree)
    assert kinds["w"] == "ScaledArray" and kinds["nested"][0] == "ScaledArray"
    # Several trees.
    a = {"w": scaled([1.0, 2.0], 2.0), "b": jnp.ones(2)}
    b = {"w": scaled([3.0, 4.0], 1.0), "b": jnp.ones(2) * 5}
    out = sfy.tree.map(lambda x, y: sfy.asarray(x, jnp.float32) + sfy.asarray(y, jnp.float32), a, b)
    np.testing.assert_array_equal(out["w"], [5.0, 8.0])
    np.testing.assert_array_equal(out["b"], [6.0, 6.0])
    # Plain jax.tree.map would visit data and scale separately.
    assert len(jax.tree.leaves(a)) == 3 and len(sfy.tree.leaves(a)) == 2


def test_leaves_flatten_unflatten_structure():
    tree = make_tree()
    leaves = sfy.tree.leaves(tree)
    assert sum(isinstance(x, sfy.ScaledArray) for x in leaves) == 2
    flat, treedef = sfy.tree.flatten(tree)
    assert len(flat) == len(leaves) and treedef == sfy.tree.structure(tree)
    assert treedef.num_leaves == len(flat)
    rebuilt = sfy.tree.unflatten(treedef, flat)
    assert rebuilt["w"] is tree["w"] and rebuilt["nested"][0] is tree["nested"][0]
    assert rebuilt["name"] is None


def test_all():
    assert sfy.tree.all({"a": True, "b": [jnp.asarray(True), np.bool_(True)]})
    assert not sfy.tree.all({"a": True, "b": [jnp.asarray(False)]})
    assert sfy.tree.all([])
    assert sfy.tree.all({"s": scaled(2.0, 0.5)})
    assert not sfy.tree.all({"s": scaled(0.0, 0.5)})  # judged by its value
    plain = {"a": [True, jnp.asarray(True)], "b": (np.bool_(False),)}
    assert sfy.tree.all(plain) == jax.tree.all(plain)
    with pytest.raises(ValueError):
        sfy.tree.all({"x": jnp.ones(3)})
