"""Twelve common optax optimizers on float16 ScaledArray params inside `jit(scalify(step))`.

Two ways a user meets them:

- *unwrapped*: ``opt.init(params)`` called eagerly on the ScaledArray params, then
  ``opt.update`` inside ``scalify`` (the optimizer computes on float16 data);
- *wrapped*: ``sfy.optim.scaled_state(opt, dtype=jnp.float16)`` (float32 math, float16
  ScaledArray state).

The oracle is "float32 math with float16 weight storage": the same three steps in plain
float32 JAX, the weights rounded to float16 after each step. The gradients are hard on
purpose: embedding rows that are exactly zero (tokens absent from the batch), a leaf of
magnitude ~1e-7 (below float16's normal range) and one of ~1e2.

Every result must be finite and track the oracle, or (unwrapped only, where the library
cannot make it right) the library must raise at trace time an error that tells the user
to use `scalify.optim.scaled_state`. A silent NaN or a silently wrong weight is a failure.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalify as sfy
from tests.utils import assert_pow2_scales

STEPS = 3
LR = 1e-2

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(LR),
    "sgd_momentum": lambda: optax.sgd(LR, momentum=0.9),
    "nesterov": lambda: optax.sgd(LR, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(LR),
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=1e-2)),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(LR),
    "adabelief": lambda: optax.adabelief(LR),
    "lamb": lambda: optax.lamb(LR),
    "rmsprop": lambda: optax.rmsprop(LR),
    "adagrad": lambda: optax.adagrad(LR),
    # Warmup from a learning rate of exactly 0: the first update is all zeros.
    "warmup_adam": lambda: optax.adam(
        optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=LR, warmup_steps=2, decay_steps=10)
    ),
}

# Unwrapped optimizers that cannot be right under scalify on float16 ScaledArrays, and
# why: scalify refuses them at trace time with an error naming `scaled_state`.
_EPS = (
    "unwrapped, the update is traced on float16 data: JAX rounds the Python constant eps "
    "(1e-8, 1e-16, 1e-30) to a float16 literal 0 before scalify sees the jaxpr, so an "
    "exactly-zero gradient row would give 0/0 = NaN (and tiny gradients lose eps)"
)
UNWRAPPED_REFUSED = {
    "adam": _EPS,
    "clip_adamw": _EPS,
    "adabelief": _EPS,
    "rmsprop": _EPS + " (eps sits inside the sqrt)",
    "warmup_adam": _EPS,
    "lamb": _EPS + " (its eps=1e-6 survives as a float16 subnormal, but its state class is Adam's)",
    "adafactor": _EPS + "; and eager init maps over the ScaledArray's children",
    "adagrad": "eager init maps full_like(0.1) over data and scale: the accumulator would "
    "be ScaledArray(data=0.1, scale=0.1) = 0.01, silently 10x too small",
}


# --------------------------------------------------------------------------------------
# Params, gradients and the oracle


def _f16(tree):
    """Values rounded to float16, held in float32."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float16).astype(jnp.float32), tree)


@functools.lru_cache(maxsize=None)
def _problem():
    rng = np.random.default_rng(0)
    params = _f16(
        {
            "embedding": rng.normal(size=(16, 8)),
            "dense": {
                "kernel": rng.normal(size=(8, 4)) / np.sqrt(8),
                "bias": np.zeros((4,)),  # a zero-initialised bias, as Flax makes them
            },
        }
    )
    grads = []
    for _ in range(STEPS):
        emb = rng.normal(size=(16, 8)) * 1e-2
        emb[[1, 5, 6, 11]] = 0.0  # tokens absent from the batch: exactly-zero rows
        grads.append(
            {
                "embedding": jnp.asarray(emb, jnp.float32),
                "dense": {
                    "kernel": jnp.asarray(rng.normal(size=(8, 4)) * 1e2, jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)) * 1e-7, jnp.float32),
                },
            }
        )
    return params, grads


class Oracle(NamedTuple):
    params: Any  # final weights, float32 math with float16 storage
    moved: Any  # per weight, the sum over steps of the float32 updates' magnitudes
    updates: Any  # the last step's float32 updates
    params32: Any  # final weights of float32 math with float32 storage


@functools.lru_cache(maxsize=None)
def _oracle(name):
    """The same steps in plain float32 JAX, the weights rounded to float16 after each
    step ("float32 math with float16 weight storage"); and without the rounding."""
    params, grads = _problem()
    opt = OPTIMIZERS[name]()
    state = opt.init(params)
    moved = jax.tree.map(jnp.zeros_like, params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        moved = jax.tree.map(lambda m, u: m + jnp.abs(u), moved, updates)
        params = _f16(optax.apply_updates(params, updates))
    p32, state = _problem()[0], opt.init(_problem()[0])
    for g in grads:
        u, state = opt.update(g, state, p32)
        p32 = optax.apply_updates(p32, u)
    return Oracle(params, moved, updates, p32)


# Compile time dominates these small steps: skip LLVM's expensive passes (the same XLA
# graph, compiled faster).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _scalified_run(opt, init_state):
    """``STEPS`` steps of ``jit(scalify(step))`` on float16 ScaledArray params and grads.
    Returns the final params, state and updates, and how many programs were compiled
    (one per distinct layout of the arguments, as `jax.jit`'s cache would)."""
    params, grads = _problem()
    p = sfy.as_scaled_array(params, dtype=jnp.float16)
    state = init_state(p)

    @jax.jit
    @sfy.scalify
    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, updates

    compiled = {}
    for g in grads:
        args = (p, state, sfy.as_scaled_array(g, dtype=jnp.float16))
        layout = jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
        if layout not in compiled:
            compiled[layout] = step.lower(*args).compile(_FAST_COMPILE)
        p, state, updates = compiled[layout](*args)
    return p, state, updates, len(compiled)


def _ulp16(x):
    """Spacing of float16 at ``|x|`` (subnormal spacing near 0), in float64."""
    a = np.abs(np.asarray(x, np.float64)).astype(np.float16)
    return np.spacing(a).astype(np.float64)


# Tolerances, relative to the size of the updates (`rtol`: on each weight, of the sum of
# its updates' magnitudes; `change_rtol`: on the norm of a leaf's change, over weights
# that moved by many ulps). Wrapped, the update is float32 math cast once to float16
# data: measured worst 4e-4 and 4e-3. Unwrapped, the update is float16 math: every
# rule rounds its data, and JAX rounds the optimizer's Python constants to float16 when
# it traces (lamb's eps 1e-6 becomes 1.013e-6, a 1.3% shift of the updates of a leaf
# whose gradients are far below eps).
WRAPPED_TOL = dict(rtol=2e-3, change_rtol=1e-2)
UNWRAPPED_TOL = dict(rtol=2e-2, change_rtol=4e-2)


def _assert_tracks_oracle(name, p, rtol, change_rtol):
    """``p`` (ScaledArrays) is finite and equals the oracle's weights up to the float16
    rounding of each step (one ulp of the weight per step: an update near a rounding
    boundary rounds either way) plus ``rtol`` of the updates' total size; where the
    oracle's weights moved by many ulps, the change matches to ``change_rtol``."""
    ref, moved = _oracle(name)[:2]
    params, _ = _problem()
    got = sfy.asarray(p, jnp.float32)
    paths = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, g), r, m, p0 in zip(
        paths, jax.tree.leaves(ref), jax.tree.leaves(moved), jax.tree.leaves(params)
    ):
        where = f"{name}{jax.tree_util.keystr(path)}"
        g, r, m, p0 = (np.asarray(v, np.float64) for v in (g, r, m, p0))
        assert np.all(np.isfinite(g)), f"{where}: non-finite weights {g[~np.isfinite(g)][:4]}"
        tol = STEPS * _ulp16(r) + rtol * m
        err = np.abs(g - r)
        worst = np.argmax(err - tol)
        assert np.all(err <= tol), (
            f"{where}: {np.count_nonzero(err > tol)} weights off the float32 oracle, worst "
            f"{g.ravel()[worst]:.6g} vs {r.ravel()[worst]:.6g} (start {p0.ravel()[worst]:.6g}, "
            f"tolerance {tol.ravel()[worst]:.3g})"
        )
        # Where the float32 change is many ulps, the change itself matches to ~RTOL.
        big = np.abs(r - p0) > 32 * STEPS * _ulp16(r)
        if np.any(big):
            change, want = (g - p0)[big], (r - p0)[big]
            rel = np.linalg.norm(change - want) / np.linalg.norm(want)
            assert rel < change_rtol, f"{where}: the weights' change is off by {rel:.3g} (relative)"
    # The zero-initialised bias holds the sum of its updates, down to 1e-9 (sgd), which
    # float16 storage flushes to 0 but a scale carries: it matches float32 storage.
    got_b = np.asarray(got["dense"]["bias"], np.float64)
    want_b = np.asarray(_oracle(name).params32["dense"]["bias"], np.float64)
    np.testing.assert_allclose(got_b, want_b, rtol=change_rtol, err_msg=f"{name}: zero-initialised bias")


def _assert_finite(tree, what):
    for leaf in jax.tree.leaves(sfy.asarray(tree, jnp.float32)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf))), f"non-finite {what}"


# --------------------------------------------------------------------------------------
# The tests


def test_oracle_is_meaningful():
    """The problem exercises what it claims: zero rows, float16 storage losing small
    sgd updates, and optimizers whose weights really move."""
    params, grads = _problem()
    assert np.all(np.asarray(grads[0]["embedding"][1]) == 0)
    ref, moved = _oracle("sgd")[:2]
    # sgd's embedding updates (~1e-4) are mostly below half a float16 ulp of the weights:
    # lost in float16 storage.
    unchanged = np.asarray(ref["embedding"]) == np.asarray(params["embedding"])
    lost = unchanged & (np.asarray(moved["embedding"]) > 0)
    assert np.count_nonzero(lost) > 64
    ref, moved = _oracle("adam")[:2]
    assert float(jnp.max(jnp.abs(ref["dense"]["bias"]))) > 1e-2  # ~lr per step from 1e-7 grads
    np.testing.assert_array_equal(ref["embedding"][1], params["embedding"][1])  # zero rows: no move


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrapped_optimizer_tracks_float32(name):
    opt = sfy.optim.scaled_state(OPTIMIZERS[name](), dtype=jnp.float16)
    p, state, updates, programs = _scalified_run(opt, opt.init)
    _assert_tracks_oracle(name, p, **WRAPPED_TOL)
    _assert_finite(state, "optimizer state")
    _assert_finite(updates, "updates")
    # The state comes back with the layout it went in with: the jitted step compiles once.
    assert programs == 1
    params, _ = _problem()
    init = opt.init(sfy.as_scaled_array(params, dtype=jnp.float16))
    assert jax.tree.structure(state) == jax.tree.structure(init)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(init)):
        assert a.dtype == b.dtype and a.shape == b.shape
    for leaf in jax.tree.leaves(p, is_leaf=sfy.core.is_scaled_leaf):
        assert isinstance(leaf, sfy.ScaledArray) and leaf.dtype == jnp.float16
    assert_pow2_scales((p, state, updates))
    # Updates and weights carry their size in the scale: data near unit size (not the
    # learning rate folded into the data at scale 1), so ``p + u`` keeps the weights'
    # data near unit size too.
    for leaf in jax.tree.leaves((updates, p), is_leaf=sfy.core.is_scaled_leaf):
        data = np.abs(np.asarray(leaf.data, np.float32))
        if data.any() and float(leaf.scale) != 0.0:
            assert 0.25 <= data.max() <= 16.0, f"data max-abs {data.max()} at scale {leaf.scale}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unwrapped_optimizer_is_right_or_refused(name):
    """``opt.init`` on the ScaledArray params, eagerly, exactly as a user would write it:
    either the three steps track the oracle, or scalify refuses at trace time and points
    to `scaled_state`. Never a silent NaN or a silently wrong weight."""
    opt = OPTIMIZERS[name]()
    if name in UNWRAPPED_REFUSED:
        with pytest.raises(TypeError, match="scaled_state"):
            _scalified_run(opt, opt.init)
        return
    p, state, updates, _ = _scalified_run(opt, opt.init)
    _assert_tracks_oracle(name, p, **UNWRAPPED_TOL)
    _assert_finite(state, "optimizer state")
    _assert_finite(updates, "updates")


def test_unwrapped_optimizer_with_float32_state_is_right():
    """The error's other remedy: state initialised on float32 params computes the update
    in float32 (the float16 gradients promote), so unwrapped Adam is right."""
    opt = OPTIMIZERS["adam"]()
    p, state, updates, _ = _scalified_run(opt, lambda params: opt.init(sfy.asarray(params, jnp.float32)))
    _assert_tracks_oracle("adam", p, **UNWRAPPED_TOL)
    _assert_finite(updates, "updates")
