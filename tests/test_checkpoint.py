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


# --------------------------------------------------------------------------------------
# CheckpointManager: asynchronous, crash-safe, fingerprinted orbax checkpoints.

needs_orbax = pytest.mark.skipif(
    not HAS_ORBAX, reason="orbax-checkpoint is not installed (pip install orbax-checkpoint)"
)


def _needs_8_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _shard_like(tree, mesh, rows, cols):
    """ShapeDtypeStructs of ``tree`` on ``mesh``: ScaledArray data split over the mesh axes
    ``rows``/``cols`` where the dimension divides, scales and other leaves replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def data_spec(x):
        axes = []
        for dim, name in zip(x.shape, (rows, cols)):
            axes.append(name if name is not None and dim % mesh.shape[name] == 0 else None)
        return P(*axes)

    def place(x):
        if isinstance(x, sfy.ScaledArray):
            return sfy.ScaledArray(
                jax.ShapeDtypeStruct(x.data.shape, x.data.dtype, sharding=NamedSharding(mesh, data_spec(x.data))),
                jax.ShapeDtypeStruct(x.scale.shape, x.scale.dtype, sharding=NamedSharding(mesh, P())),
            )
        return jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=NamedSharding(mesh, P()))

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, sfy.ScaledArray))


def _assert_shardings(restored, like):
    for x, l in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
        if l.sharding is None:
            assert x.sharding.device_set == {jax.devices()[0]}
        else:
            assert x.sharding.is_equivalent_to(l.sharding, x.ndim), (x.sharding, l.sharding)


@needs_orbax
def test_manager_sharded_save_restores_on_other_meshes_bit_exact(train_state, tmp_path):
    _needs_8_devices()
    from jax.sharding import Mesh, PartitionSpec as P

    tree, opt = train_state
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    sharded = jax.device_put(tree, jax.tree.map(lambda s: s.sharding, _shard_like(tree, mesh, "data", "model")))
    kernel = sharded["params"]["dense"]["kernel"]
    assert kernel.data.sharding.spec == P("data", "model") and kernel.scale.sharding.spec == P()
    mu = [x for x in jax.tree.leaves(sharded["opt_state"], is_leaf=sfy.core.is_scaled_leaf)
          if isinstance(x, sfy.ScaledArray) and x.dtype == ml_dtypes.float8_e4m3fn]
    assert mu and all(len(x.data.sharding.device_set) == 8 for x in mu)

    directory = str(tmp_path / "ckpts")
    with checkpoint.CheckpointManager(directory, max_to_keep=2) as mgr:
        assert mgr.latest_step() is None and mgr.all_steps() == []
        mgr.save(10, sharded)
        with pytest.raises(ValueError, match="step 10 already has a checkpoint"):
            mgr.save(10, sharded)  # waits for step 10, then refuses to overwrite it
        mgr.save(20, sharded)
        mgr.save(30, sharded)
        mgr.wait()
        assert mgr.all_steps() == [20, 30] and mgr.latest_step() == 30  # max_to_keep=2
    assert sorted(os.listdir(directory)) == [".scalify-trash", "20", "30"]
    assert os.listdir(os.path.join(directory, ".scalify-trash")) == []  # step 10 deleted

    mgr = checkpoint.CheckpointManager(directory)  # a fresh process would do the same
    targets = {
        "mesh (2, 4)": _shard_like(tree, Mesh(devices.reshape(2, 4), ("data", "model")), "data", "model"),
        "mesh (8,)": _shard_like(tree, Mesh(devices, ("x",)), "x", None),
        "single device": jax.eval_shape(lambda: tree),  # no shardings: the default device
    }
    for name, like in targets.items():
        restored = mgr.restore(like)  # the latest step, 30
        assert_bitwise_equal(restored, tree)
        _assert_shardings(restored, like)
        assert isinstance(restored["params"]["emb"], sfy.ScaledArray), name
    assert_bitwise_equal(mgr.restore(sharded, step=20), tree)  # `like` given as arrays
    # The restored state drives the optimizer exactly like the original.
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-6, jnp.float32), sfy.asarray(tree["params"]))
    step = jax.jit(opt.update)
    assert_bitwise_equal(
        step(grads, restored["opt_state"], restored["params"]), step(grads, tree["opt_state"], tree["params"])
    )
    # Structure, shape and dtype are still checked against `like`.
    bad = jax.eval_shape(lambda: tree)
    bad["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="step: checkpoint int32"):
        mgr.restore(bad)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 10"):
        mgr.restore(targets["single device"], step=10)
    mgr.close()


_KILLED_CHILD = r"""
import os, signal, sys, time
import jax.numpy as jnp, numpy as np
import scalify as sfy
from scalify import checkpoint

def make(seed, rows):
    rng = np.random.default_rng(seed)
    return {f"w{i}": sfy.ScaledArray(jnp.asarray(rng.standard_normal((rows, 256)), jnp.float16),
                                     jnp.float32(2.0 ** -i)) for i in range(4)}

directory, rows = sys.argv[1], int(sys.argv[2])
mgr = checkpoint.CheckpointManager(directory)
mgr.save(1, make(1, rows))
mgr.wait()
mgr.save(2, make(2, rows))  # returns once the arrays are off the device, then orbax
# creates the temporary directory and writes the files in the background (~0.1 s here)
deadline = time.time() + 5
while not os.path.exists(os.path.join(directory, "2.orbax-checkpoint-tmp")) and time.time() < deadline:
    time.sleep(0.0005)
os.kill(os.getpid(), signal.SIGKILL)  # the process dies while orbax is writing
"""


def _killed_child_tree(seed, rows):
    rng = np.random.default_rng(seed)
    return {
        f"w{i}": sfy.ScaledArray(jnp.asarray(rng.standard_normal((rows, 256)), jnp.float16), jnp.float32(2.0**-i))
        for i in range(4)
    }


@needs_orbax
def test_manager_save_killed_midway_is_ignored(tmp_path):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
    rows = 4096  # 8 MiB of float16: orbax needs ~0.1 s to write it after save() returns
    for attempt in range(2):  # a second, larger try if the write ever won the race
        directory = str(tmp_path / f"ckpts{attempt}")
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_CHILD, directory, str(rows)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        if "2" not in os.listdir(directory):
            break
        rows *= 4
    # On disk: step 1 complete, step 2 only as orbax's temporary directory.
    listing = sorted(os.listdir(directory))
    assert listing == ["1", "2.orbax-checkpoint-tmp"], listing
    with checkpoint.CheckpointManager(directory) as mgr:
        assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
        expected = _killed_child_tree(1, rows)
        assert_bitwise_equal(mgr.restore(jax.eval_shape(lambda: expected)), expected)
        # The run resumes and saves step 2 again: the leftover does not get in the way.
        mgr.save(2, _killed_child_tree(2, 8))
    assert sorted(os.listdir(directory)) == ["1", "2"]
    with checkpoint.CheckpointManager(directory) as mgr:
        assert mgr.latest_step() == 2


@needs_orbax
# orbax leaves the reads of the other chunks of a failed array as coroutines that raise
# when they are garbage collected ("Exception ignored in ..."): collected below.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_manager_detects_corruption(tmp_path):
    _needs_8_devices()
    import gc
    import glob
    import shutil

    from jax.sharding import Mesh

    rng = np.random.default_rng(0)
    tree = {
        # 64 KiB of float16: its bytes fill the largest data file of the checkpoint.
        "params": {
            "w": sfy.ScaledArray(jnp.asarray(rng.standard_normal((256, 128)), jnp.float16), jnp.float32(0.25)),
            "b": sfy.ScaledArray(jnp.asarray(rng.standard_normal(8), jnp.float16), jnp.float32(2.0)),
        },
        "step": jnp.int32(7),
    }
    saved = str(tmp_path / "saved")
    with checkpoint.CheckpointManager(saved) as mgr:
        mgr.save(7, tree)
    like = _shard_like(tree, Mesh(np.array(jax.devices()[:8]), ("x",)), "x", None)
    data_files = glob.glob(os.path.join(saved, "7", "state", "**", "d", "*"), recursive=True)
    largest = os.path.relpath(max(data_files, key=os.path.getsize), saved)
    size = os.path.getsize(os.path.join(saved, largest))
    assert size > 60_000  # it holds the (zstd-compressed, incompressible) bytes of w

    def corrupted(name, damage):
        directory = str(tmp_path / name)
        shutil.copytree(saved, directory)
        path = os.path.join(directory, largest)
        damage(path)
        with checkpoint.CheckpointManager(directory) as mgr:
            assert mgr.latest_step() == 7  # complete on disk: only restore can tell
            with pytest.raises(checkpoint.CheckpointCorruptError) as err:
                mgr.restore(like)
        message = str(err.value)
        del err
        gc.collect()  # within this test's warning filter (see above)
        assert message.startswith(
            f"CheckpointManager.restore: the checkpoint of step 7 in {os.path.join(directory, '7')} is corrupt: "
        ), message
        assert path in message and "leaves: params/w/data" in message, message
        return message

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    def overwrite(path):
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xab" * 8)

    message = corrupted("truncated", truncate)
    assert "reading its 'state' item failed" in message
    assert f"{size // 2} bytes, {size} when saved: truncated or overwritten" in message
    assert "error: ValueError: OUT_OF_RANGE" in message  # TensorStore's own diagnosis
    # Same size, other bytes: orbax reads garbage without noticing; the fingerprint does.
    message = corrupted("overwritten", overwrite)
    assert "the restored values differ from the saved ones (fingerprint mismatch)" in message
    assert "leaves: params/w/data (saved 0x" in message and "params/b" not in message
    assert "files: not identified; the step's array data files are: " in message
    message = corrupted("deleted", os.remove)
    assert f"{largest.split(os.sep)[-1]} (missing; {size} bytes when saved)" in message
    # The untouched checkpoint still restores, bit for bit.
    with checkpoint.CheckpointManager(saved) as mgr:
        assert_bitwise_equal(mgr.restore(like), tree)


def _reference_fingerprint(a):
    """The fingerprint of `checkpoint._leaf_fingerprint`, in NumPy on the host."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        words = a.astype(np.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
        words = a.view(unsigned).astype(np.uint32)
    words = words.reshape(-1)

    def fmix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    pos = np.arange(words.size, dtype=np.uint32)
    mult = fmix(pos * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15)) | np.uint32(1)
    return int(np.sum(fmix(words) * mult, dtype=np.uint32))


def test_fingerprint_is_exact_sharding_invariant_and_sensitive():
    _needs_8_devices()
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(0)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    arrays = [
        jnp.asarray(rng.standard_normal((8, 6)), dtype)
        for dtype in (jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float32, jnp.int8)
    ] + [jnp.asarray(rng.standard_normal((8, 6)) > 0), jnp.float32(-0.0)]
    sharded = [
        jax.device_put(x, NamedSharding(mesh, P("data", "model") if x.ndim else P())) for x in arrays
    ]
    expected = [_reference_fingerprint(x) for x in arrays]
    assert checkpoint._fingerprints(arrays) == expected
    assert checkpoint._fingerprints(sharded) == expected  # computed shard by shard
    assert len(set(expected)) == len(expected)
    # Any single changed element changes it (here: one flipped bit, a swap of two values).
    for x, fp in zip(arrays[:-1], expected):
        bits = np.asarray(x).copy().reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
        flipped = bits.copy()
        flipped[17] ^= 1
        swapped = bits.copy()
        swapped[[3, 40]] = swapped[[40, 3]]
        for other in (flipped, swapped):
            if not np.array_equal(other, bits):
                y = jnp.asarray(other.view(np.asarray(x).dtype).reshape(x.shape))
                assert checkpoint._fingerprints([y]) != [fp]
