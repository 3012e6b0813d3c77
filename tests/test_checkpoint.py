"""scalify.checkpoint: trees of params and scaled optimizer state round-trip bit for bit."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import scalify as sfy
from scalify import checkpoint, optim

HAS_ORBAX = importlib.util.find_spec("orbax") is not None and (
    importlib.util.find_spec("orbax.checkpoint") is not None
)


def _bits(x):
    a = np.asarray(x)
    return a.dtype, a.shape, a.reshape(-1).view(np.uint8).tobytes()


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert _bits(x) == _bits(y)


@pytest.fixture(scope="module")
def train_state():
    """Float16 ScaledArray params and a scaled Adam state (float8 mu) after a few steps."""
    rng = np.random.default_rng(0)
    p32 = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "bias": jnp.zeros((8,))},
        "emb": jnp.asarray(rng.normal(size=(10, 16)) * 1e-3, jnp.float32),
    }
    params = sfy.as_scaled_array(jax.tree.map(lambda x: x.astype(jnp.float16), p32))
    opt = optim.scaled_state(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
        ),
        mu_dtype=jnp.float8_e4m3fn,
    )
    state = opt.init(params)
    step = jax.jit(opt.update)
    for i in range(3):
        grads = jax.tree.map(lambda x: 1e-6 * jnp.cos(x + i), p32)
        updates, state = step(grads, state, params)
        params = optim.apply_updates(params, updates)
    # A NaN with a payload and a negative zero must survive too.
    bias = params["dense"]["bias"]
    odd = jnp.asarray(np.array([0x7E01, 0x8000], np.uint16).view(np.float16))
    params["dense"]["bias"] = sfy.ScaledArray(bias.data.at[:2].set(odd), bias.scale)
    return {"params": params, "opt_state": state, "step": jnp.asarray(3, jnp.int32)}, opt


def test_tree_has_scaled_leaves_of_narrow_dtypes(train_state):
    tree, _ = train_state
    leaves = jax.tree.leaves(tree, is_leaf=sfy.core.is_scaled_leaf)
    dtypes = {x.dtype for x in leaves if isinstance(x, sfy.ScaledArray)}
    assert {np.dtype(np.float16), np.dtype(ml_dtypes.float8_e4m3fn)} <= dtypes


def test_npz_roundtrip_is_bitwise(train_state, tmp_path):
    tree, opt = train_state
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save_npz(path, tree)
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # written atomically, no temporary left
    # Restore into concrete arrays, and into shapes only (no allocation needed for `like`).
    assert_bitwise_equal(checkpoint.load_npz(path, like=tree), tree)
    restored = checkpoint.load_npz(path, like=jax.eval_shape(lambda: tree))
    assert_bitwise_equal(restored, tree)
    assert isinstance(restored["params"]["emb"], sfy.ScaledArray)
    # The restored state drives the optimizer exactly like the original.
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-6, jnp.float32), sfy.asarray(tree["params"]))
    step = jax.jit(opt.update)
    assert_bitwise_equal(
        step(grads, restored["opt_state"], restored["params"]), step(grads, tree["opt_state"], tree["params"])
    )


def test_npz_restores_shardings(train_state, tmp_path):
    if len(jax.devices()) < 2:
        pytest.skip("needs several (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    tree, _ = train_state
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save_npz(path, tree)

    def spec(x):
        s = P("x") if x.ndim >= 1 and x.shape[0] % 2 == 0 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))

    like = jax.tree.map(spec, tree)
    restored = checkpoint.load_npz(path, like=like)
    assert_bitwise_equal(restored, tree)
    kernel = restored["params"]["dense"]["kernel"].data
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), kernel.ndim)


def test_npz_mismatch_is_a_clear_error(train_state, tmp_path):
    tree, _ = train_state
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save_npz(path, tree)
    # A different shape.
    bad = jax.eval_shape(lambda: tree)
    bad["params"]["dense"]["kernel"] = sfy.ScaledArray(
        jax.ShapeDtypeStruct((16, 9), jnp.float16), jax.ShapeDtypeStruct((), jnp.float32)
    )
    expected = r"params/dense/kernel/data: checkpoint float16\[16, 8\], expected float16\[16, 9\]"
    with pytest.raises(checkpoint.CheckpointMismatchError, match=expected):
        checkpoint.load_npz(path, like=bad)
    # A different dtype (would silently cast in other tools).
    bad = jax.eval_shape(lambda: tree)
    bad["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="step: checkpoint int32"):
        checkpoint.load_npz(path, like=bad)
    # Plain params where the checkpoint holds ScaledArrays; a missing entry.
    bad = jax.eval_shape(lambda: {**tree, "params": sfy.asarray(tree["params"]), "extra": jnp.zeros(2)})
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.load_npz(path, like=bad)
    missing, unexpected = str(err.value).splitlines()[1:3]
    assert missing.strip() == (
        "missing from the checkpoint: extra, params/dense/bias, params/dense/kernel, params/emb"
    )
    assert unexpected.strip().startswith("in the checkpoint but not in `like`: params/dense/bias/data, ")
    # Not a scalify checkpoint.
    other = str(tmp_path / "other.npz")
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not written by scalify"):
        checkpoint.load_npz(other, like={"a": np.zeros(3)})


def test_npz_dtypes_and_leaf_kinds(tmp_path):
    tree = {
        "bf16": jnp.asarray([1.5, -2.0], jnp.bfloat16),
        "f8": sfy.ScaledArray(jnp.asarray([448.0, -0.001953125], jnp.float8_e5m2), jnp.float32(2.0**-70)),
        "i8": jnp.asarray([-3, 7], jnp.int8),
        "bool": jnp.asarray([True, False]),
        "scalar": jnp.float32(3.25),
        "list": [jnp.zeros((0, 3)), None, optax.EmptyState()],
    }
    path = str(tmp_path / "t.npz")
    checkpoint.save_npz(path, tree)
    assert_bitwise_equal(checkpoint.load_npz(path, like=tree), tree)
    with pytest.raises(TypeError, match="must be an array"):
        checkpoint.save_npz(str(tmp_path / "bad.npz"), {"s": "text"})


@pytest.mark.skipif(not HAS_ORBAX, reason="orbax-checkpoint is not installed (pip install orbax-checkpoint)")
def test_orbax_roundtrip_is_bitwise_and_mismatch_is_clear(train_state, tmp_path):
    tree, _ = train_state
    path = str(tmp_path / "orbax_ckpt")
    checkpoint.save_orbax(path, tree)
    assert_bitwise_equal(checkpoint.load_orbax(path, like=jax.eval_shape(lambda: tree)), tree)
    assert_bitwise_equal(checkpoint.load_orbax(path, like=tree), tree)
    bad = jax.eval_shape(lambda: tree)
    bad["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="step: checkpoint int32"):
        checkpoint.load_orbax(path, like=bad)
    bad = jax.eval_shape(lambda: {**tree, "params": sfy.asarray(tree["params"])})
    expected = "missing from the checkpoint: params/dense/bias"
    with pytest.raises(checkpoint.CheckpointMismatchError, match=expected):
        checkpoint.load_orbax(path, like=bad)
