"""The main job (benchmarks/train_gpt.py) over a device mesh, over processes, and resumed
from its checkpoints after a crash.

Tolerance held against the single-device run: float32 losses agree to 1e-5 relative (a
sharded matmul or reduction sums its terms in another order, float32 rounding); scalify's
losses are float16 ScaledArrays, so they may differ by one float16 rounding of the loss
(2^-8 relative at most). In practice the quick runs agree exactly.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import scalify as sfy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_gpt.py")

QUICK = ["--quick", "--no-plots", "--no-telemetry", "--eval-every", "2"]

needs_8 = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def _train(tmp_path, name, *extra, expect_rc=0):
    """benchmarks/train_gpt.py in a child process (its own devices, its own
    `jax.distributed`), sharing one persistent compilation cache with the other runs of
    the test; returns its JSON results."""
    out = tmp_path / f"{name}.json"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
    run = subprocess.run([sys.executable, SCRIPT, *QUICK, "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == expect_rc, run.stdout[-2000:] + run.stderr[-3000:]
    if expect_rc:
        return None
    with open(out) as f:
        return json.load(f)


def _curves(results):
    return {c: r["train_curve"] for c, r in results["runs"].items()}


def _assert_same_losses(a, b):
    for config in a:
        x, y = np.asarray(a[config]), np.asarray(b[config])
        rtol = 1e-5 if config == "float32" else 2.0 ** -8
        np.testing.assert_allclose(x, y, rtol=rtol, err_msg=config)


@needs_8
def test_trainer_shards_params_and_state():
    """FSDP over data, Megatron tensor parallel over model, scales replicated; the step
    hands params and state back with the shardings they came in with."""
    import mesh as mesh_lib
    import models
    import optax
    import train_gpt
    from gpt import GPTConfig

    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh("data=4,model=2"))
    model = models.build("gpt", GPTConfig(vocab=97, seq_len=8, d_model=32, n_heads=2, n_layers=1))
    t = train_gpt.make_trainer("scalify-fp8", model, optax.adam(1e-3), mesh)
    blocks = t.params["blocks"]
    assert blocks["wqkv"].data.sharding.spec == P(None, "data", "model")  # column-parallel
    assert blocks["wo"].data.sharding.spec == P(None, "model", "data")  # row-parallel
    assert t.params["head"].data.sharding.spec == P("data", None)  # vocab 97: model dropped
    for leaf in jax.tree.leaves(t.params, is_leaf=sfy.core.is_scaled_leaf):
        assert leaf.scale.sharding.is_fully_replicated
    mu = [x for x in jax.tree.leaves(t.state, is_leaf=sfy.core.is_scaled_leaf)
          if isinstance(x, sfy.ScaledArray) and x.shape == blocks["w1"].shape]
    assert mu and all(x.data.sharding.spec == P(None, "data", "model") for x in mu)
    tokens = mesh_lib.place(np.zeros((4, 9), np.int32), mesh_lib.batch_sharding(mesh))
    params, state = t.step(t.params, t.state, tokens)[:2]
    same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim)  # noqa: E731
    assert all(jax.tree.leaves(jax.tree.map(same, params, t.params)))
    assert all(jax.tree.leaves(jax.tree.map(same, state, t.state)))


@needs_8
@pytest.mark.slow
def test_mesh_processes_and_crash_resume(tmp_path):
    """One test, so that the runs share their compilations (a persistent cache):

    - the same losses on 1 device, on a 4x2 mesh of 8 devices (FSDP x tensor parallel)
      and (scalify-fp8) as 2 processes x 4 devices (jax.distributed with CPU collectives);
    - the sharded run SIGKILLed while its step-4 checkpoint is being written resumes from
      step 2, and its losses from there equal the uninterrupted run's bit for bit.
    """
    args = ["--configs", "float32", "scalify-fp8", "--steps", "6", "--ckpt-every", "2"]
    mesh = ["--mesh", "data=4,model=2"]
    single = _curves(_train(tmp_path, "single", *args[:3], "--steps", "6"))
    whole = _curves(_train(tmp_path, "whole", *args, *mesh, "--ckpt-dir", str(tmp_path / "ck_whole")))
    # The crash and the resume train the scaled configuration only: its ScaledArray state
    # is what the checkpoint must restore bit for bit.
    ck, fp8 = tmp_path / "ck", ["--configs", "scalify-fp8", *args[3:]]
    _train(tmp_path, "killed", *fp8, *mesh, "--ckpt-dir", str(ck), "--crash-during-save", "4", expect_rc=-9)
    assert sfy.checkpoint.CheckpointManager(str(ck)).latest_step() == 2
    resumed = _curves(_train(tmp_path, "resumed", *fp8, *mesh, "--ckpt-dir", str(ck), "--resume"))
    # Two processes compile their own programs side by side: one configuration, the
    # scaled one (float32's sharded losses are checked by the single-process runs).
    procs = _curves(_train(tmp_path, "procs", "--configs", "scalify-fp8", "--steps", "6", *mesh, "--processes", "2"))
    assert all(np.isfinite(c).all() for c in single.values())
    _assert_same_losses(single, whole)
    _assert_same_losses(procs, single)
    # steps 0-1 from the checkpoint's record, 2-5 recomputed
    assert resumed == {"scalify-fp8": whole["scalify-fp8"]}

def test_import_leaves_the_backend_to_jax_distributed():
    """`import scalify` starts no backend: `jax.distributed.initialize` still runs after it."""
    code = (
        "import socket, scalify, jax\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=1, process_id=0)\n"
        "print(jax.process_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("1")
