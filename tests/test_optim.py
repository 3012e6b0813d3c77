"""scalify.optim: optimizer state in float16/float8 ScaledArrays, float16 master weights.

The oracle is the same optax optimizer run in plain float32.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import scalify as sfy
from scalify import optim
from scalify.core.pow2 import is_pow2
from tests.utils import assert_pow2_scales

F16, F8 = np.dtype(np.float16), np.dtype(ml_dtypes.float8_e4m3fn)


# --------------------------------------------------------------------------------------
# A real small model: a flax.linen MLP on scikit-learn's bundled digits.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


@functools.lru_cache(maxsize=None)
def _digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x[:512] / 16.0, jnp.float32), jnp.asarray(y[:512])


def _model_and_params():
    x, _ = _digits()
    model = MLP()
    return model, model.init(jax.random.PRNGKey(0), x[:1])


def _loss_fn(model, loss_scale=1.0):
    x, y = _digits()

    def loss(params):
        logits = model.apply(params, x)
        return loss_scale * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


# Compile time dominates these small runs: skip LLVM's expensive passes (the same XLA
# graph, compiled faster; results agree with the default to float32 rounding).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _train(opt, loss, params, steps):
    """``steps`` full-batch steps in one jitted scan; returns final params and losses."""

    def run(params):
        def body(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        (p, s), losses = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return p, s, losses

    return jax.jit(run).lower(params).compile(_FAST_COMPILE)(params)


@functools.lru_cache(maxsize=None)
def _float32_run(name, steps=150):
    """The float32 oracle run of ``OPTIMIZERS[name]`` (cached: several tests compare to it)."""
    model, params = _model_and_params()
    return _train(_plain(OPTIMIZERS[name]()), _loss_fn(model), params, steps)


def _rel_dist(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))
    return np.sqrt(num / den)


def _plain_storage(inner, dtype):
    """The control: the same float32 update, state stored as plain ``dtype`` (no scale)."""

    def cast(tree, dt):
        return jax.tree.map(
            lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x, tree
        )

    def init(params):
        return cast(inner.init(params), dtype)

    def update(g, s, p=None):
        u, s = inner.update(g, cast(s, jnp.float32), p)
        return u, cast(s, dtype)

    return optax.GradientTransformation(init, update)


_MASK = {"params": {"Dense_0": {"kernel": True, "bias": False}, "Dense_1": {"kernel": True, "bias": False}}}
_LABELS = {"params": {"Dense_0": {"kernel": "a", "bias": "s"}, "Dense_1": {"kernel": "a", "bias": "s"}}}

OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=32),  # factored
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "masked": lambda: optax.masked(optax.adam(1e-2), _MASK),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-2), "s": optax.sgd(0.1, momentum=0.9)}, _LABELS
    ),
}


def _plain(o):
    return o.gradient_transformation() if isinstance(o, optax.MultiSteps) else o


def _scaled_leaves(tree):
    leaves = jax.tree.leaves(tree, is_leaf=sfy.core.is_scaled_leaf)
    return [x for x in leaves if isinstance(x, sfy.ScaledArray)]


# --------------------------------------------------------------------------------------
# Training tracks float32


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_float16_state_tracks_float32_on_digits(name):
    model, params = _model_and_params()
    loss = _loss_fn(model)
    p32, _, l32 = _float32_run(name)
    p16, s16, l16 = _train(optim.scaled_state(OPTIMIZERS[name](), jnp.float16), loss, params, 150)
    assert float(l32[-1]) < 0.5 * float(l32[0])  # it trains
    # Every float array of the state is a float16 ScaledArray with a power-of-two scale.
    packed = _scaled_leaves(s16)
    assert packed and all(x.dtype == F16 for x in packed)
    assert_pow2_scales(s16)
    for x in jax.tree.leaves(s16):  # float arrays are float16 data; scales, counts, scalars
        assert not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0 or x.dtype == F16
    # The whole loss curve and the final weights track float32.
    np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), rtol=1e-2)
    assert _rel_dist(p16, p32) < 2e-2


@pytest.mark.parametrize("name", ["adam", "sgd_momentum"])
def test_float8_first_moment_trains_on_digits(name):
    model, params = _model_and_params()
    loss = _loss_fn(model)
    _, _, l32 = _float32_run(name)
    opt = optim.scaled_state(OPTIMIZERS[name](), jnp.float16, mu_dtype=jnp.float8_e4m3fn)
    _, s8, l8 = _train(opt, loss, params, 150)
    dtypes = {x.dtype for x in _scaled_leaves(s8)}
    assert F8 in dtypes
    first = jax.tree.leaves(s8[0].mu if name != "sgd_momentum" else s8[0].trace)
    assert {x.dtype for x in first} <= {F8, np.dtype(np.float32)}
    # Float8 (3 mantissa bits) moves the trajectory, but training reaches the same place.
    assert np.all(np.isfinite(np.asarray(l8)))
    assert float(l8[-1]) < 1.5 * float(l32[-1]) + 0.02
    assert np.max(np.abs(np.asarray(l8) - np.asarray(l32))) < 0.15


# --------------------------------------------------------------------------------------
# Tiny gradients: the second moment underflows plain float16, not the scaled state


def test_tiny_gradients_plain_float16_state_fails_scaled_state_matches():
    model, params = _model_and_params()
    loss = _loss_fn(model, loss_scale=1e-3)  # gradients ~1e-6 .. 5e-5
    grads = jax.jit(jax.grad(loss))(params)
    g = np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree.leaves(grads)])
    assert 1e-5 < g.max() < 1e-4
    nu = (1 - 0.999) * g.astype(np.float64) ** 2  # Adam's first second moment
    assert np.all(nu.astype(np.float16) == 0)  # all of it underflows float16

    steps = 60
    _, _, l32 = _train(optax.adam(1e-2), loss, params, steps)
    _, _, l_plain = _train(_plain_storage(optax.adam(1e-2), jnp.float16), loss, params, steps)
    p16, s16, l16 = _train(optim.scaled_state(optax.adam(1e-2), jnp.float16), loss, params, steps)

    l32, l_plain, l16 = (np.asarray(v, np.float64) for v in (l32, l_plain, l16))
    assert l32[-1] < 0.2 * l32[0]
    # Plain float16 state: every stored v rounds to 0, the updates are far too large.
    assert not np.all(np.isfinite(l_plain)) or l_plain[-1] > 10 * l32[-1]
    # Scaled float16 state: the scale carries the 1e-12 second moments.
    np.testing.assert_allclose(l16, l32, rtol=1e-2)
    nu16 = s16[0].nu["params"]["Dense_0"]["kernel"]
    assert float(nu16.scale) < 2.0**-30 and np.count_nonzero(np.asarray(nu16.data)) > 0


def test_adam_updates_with_tiny_gradients():
    """Gradients of 1e-5: Adam's update is ~ -lr * sign(g) in float32. Its second moment,
    (1 - b2) * g**2 = 1e-13, is below float16's smallest subnormal (6e-8)."""
    g = {"w": jnp.full((64,), 1e-5, jnp.float32)}
    p = {"w": jnp.zeros((64,), jnp.float32)}
    runs = {
        "f32": (optax.adam(1.0), g, p),
        # optax computing on float16 params and gradients: plain float16 state.
        "optax_f16": (optax.adam(1.0), *jax.tree.map(lambda x: x.astype(jnp.float16), (g, p))),
        # float32 math, state stored as plain float16: the stored v is always 0.
        "stored_f16": (_plain_storage(optax.adam(1.0), jnp.float16), g, p),
        "scaled_f16": (optim.scaled_state(optax.adam(1.0)), g, p),
    }
    last = {}
    for name, (opt, gi, pi) in runs.items():
        s, step = opt.init(pi), jax.jit(opt.update)
        for _ in range(30):
            u, s = step(gi, s, pi)
        last[name] = np.asarray(u["w"], np.float32)
    np.testing.assert_allclose(last["f32"], -1.0, rtol=2e-3)
    assert np.all(np.abs(last["optax_f16"]) > 100)  # v == 0: the update is m / eps
    assert np.all(np.abs(last["stored_f16"]) > 4)  # v without its history: too small
    np.testing.assert_allclose(last["scaled_f16"], last["f32"], rtol=4e-3)


def test_second_moment_spanning_1e8_in_one_leaf():
    """Gradients spanning 1e-1..1e-5 in one leaf: second moments span 1e-2..1e-10 (1e8,
    more than float16 holds below a max-abs near 1). The storage scale puts the max-abs
    at the top of float16 so every entry keeps its precision."""
    g = {"w": jnp.asarray(np.geomspace(1e-1, 1e-5, 256) * np.resize([1, -1], 256), jnp.float32)}
    p = {"w": jnp.zeros((256,), jnp.float32)}
    assert np.float16(1e-10 / 1e-2) == 0  # what a unit max-abs storage would flush
    ref, opt = optax.adam(1e-3), optim.scaled_state(optax.adam(1e-3))
    s32, s16 = ref.init(p), opt.init(p)
    step32, step16 = jax.jit(ref.update), jax.jit(opt.update)
    for i in range(5):
        gi = jax.tree.map(lambda x: x * (1 + 0.1 * i), g)
        u32, s32 = step32(gi, s32, p)
        u16, s16 = step16(gi, s16, p)
        np.testing.assert_allclose(u16["w"], u32["w"], rtol=2e-3)
    np.testing.assert_allclose(sfy.asarray(s16[0].nu["w"], jnp.float32), s32[0].nu["w"], rtol=2e-3)


# --------------------------------------------------------------------------------------
# State layout, dtypes, pytree behaviour


def test_state_layout_and_storage_scale():
    params = {"w": jnp.linspace(-1, 1, 48).reshape(6, 8), "b": jnp.ones((8,))}
    opt = optim.scaled_state(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    state = opt.init(params)
    assert state.count.dtype == np.int32
    assert all(v.dtype == np.float32 and v.ndim == 0 for v in state.hyperparams.values())
    grads = jax.tree.map(lambda x: 3e-7 * (x + 0.5), params)
    _, state = opt.update(grads, state, params)
    inner = state.inner_state[0]
    assert inner.count.dtype == np.int32 and int(inner.count) == 1
    for leaf in jax.tree.leaves([inner.mu, inner.nu], is_leaf=sfy.core.is_scaled_leaf):
        assert isinstance(leaf, sfy.ScaledArray) and leaf.dtype == F16
        assert leaf.scale.dtype == np.float32 and bool(is_pow2(np.asarray(leaf.scale)))
        amax = float(np.max(np.abs(np.asarray(leaf.data, np.float32))))
        assert 16384 < amax <= 32768  # max-abs in the top binade of float16


def test_zero_state_and_saturating_float8():
    params = {"w": jnp.zeros((4, 4))}
    opt = optim.scaled_state(optax.adam(1.0), mu_dtype=jnp.float8_e4m3fn)
    state = opt.init(params)
    mu = state[0].mu["w"]
    # All-zero state is the zero tensor: scale 0.
    assert mu.dtype == F8 and float(mu.scale) == 0.0 and not np.any(np.asarray(mu.data, np.float32))
    # Huge gradients: the storage scale carries them, nothing overflows float8 or float16.
    grads = {"w": jnp.full((4, 4), 1e30).at[0, 0].set(-3e33)}
    _, state = opt.update(grads, state, params)
    np.testing.assert_allclose(sfy.asarray(state[0].mu["w"], jnp.float32), 0.1 * grads["w"], rtol=0.07)
    np.testing.assert_allclose(sfy.asarray(state[0].nu["w"], jnp.float32), 1e-3 * grads["w"] ** 2, rtol=1e-3)
    # A plain saturating cast to float8 E4M3FN clips instead of returning NaN.
    out = optim.storage_cast(jnp.asarray([1000.0, -1e6, 3.0]), jnp.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(out, np.float32), [448.0, -448.0, 3.0])


def test_storage_cast_plain_jit_vmap_grad():
    x = jnp.asarray([[1e-3, 70000.0], [-2.0, 0.5]], jnp.float32)
    out = jax.jit(lambda v: optim.storage_cast(v, jnp.float16))(x)
    np.testing.assert_array_equal(out, np.asarray([[1e-3, 65504.0], [-2.0, 0.5]], np.float16))
    np.testing.assert_array_equal(jax.vmap(lambda v: optim.storage_cast(v, jnp.float16))(x), out)
    g = jax.grad(lambda v: jnp.sum(optim.storage_cast(v, jnp.float16).astype(jnp.float32) * 3.0))(x)
    np.testing.assert_array_equal(g, np.full((2, 2), 3.0, np.float32))
    packed = optim.storage_cast(sfy.ScaledArray(x, jnp.float32(2.0**-40)), jnp.float16)
    assert packed.dtype == F16 and float(jnp.max(jnp.abs(packed.data))) == float(np.float16(70000.0 / 4))
    np.testing.assert_allclose(sfy.asarray(packed, jnp.float32), x * 2.0**-40, rtol=1e-3)


def test_non_finite_state_stays_visible():
    opt = optim.scaled_state(optax.sgd(1.0, momentum=0.9))
    params = {"w": jnp.ones((3,))}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.asarray([1.0, jnp.nan, 2.0])}, state, params)
    trace = np.asarray(sfy.asarray(state[0].trace["w"], jnp.float32))
    assert np.isnan(trace[1]) and np.isfinite(np.asarray(state[0].trace["w"].scale))


def test_eval_shape_jit_and_tree_functions():
    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    opt = optim.scaled_state(optax.adamw(1e-3), mu_dtype=jnp.float8_e4m3fn)
    shapes = jax.eval_shape(opt.init, params)
    state = opt.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
    grads = jax.tree.map(lambda x: 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    eager = opt.update(grads, state, params)
    jitted = jax.jit(opt.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
    doubled = jax.tree.map(lambda x: x, state)  # tree functions see data and scale leaves
    assert jax.tree.structure(doubled) == jax.tree.structure(state)
    n = len(jax.tree.leaves(state))
    assert n == 1 + 2 * 2 * 2  # count, {mu, nu} x {w, b} x {data, scale}


def test_mu_dtype_applies_to_first_moment_fields_only():
    params = {"mu": jnp.ones((3,)), "trace": {"x": jnp.ones((2, 2))}}  # model names, not state fields
    for inner, first, other in [
        (optax.adam(1e-3), lambda s: s[0].mu, lambda s: s[0].nu),
        (optax.sgd(1e-3, momentum=0.9), lambda s: s[0].trace, lambda s: None),
        (optax.MultiSteps(optax.lion(1e-3), 2), lambda s: s.inner_opt_state[0].mu, lambda s: s.acc_grads),
    ]:
        state = optim.scaled_state(inner, mu_dtype=jnp.float8_e4m3fn).init(params)
        assert {x.dtype for x in _scaled_leaves(first(state))} == {F8}
        assert {x.dtype for x in _scaled_leaves(other(state))} <= {F16}


def test_vmap_over_stacked_states():
    opt = optim.scaled_state(optax.adam(1e-2))
    params = {"w": jnp.stack([jnp.ones((4,)), 1e-3 * jnp.ones((4,))])}
    grads = {"w": jnp.stack([jnp.full((4,), 1e-2), jnp.full((4,), 1e-7)])}
    state = jax.vmap(opt.init)(params)
    assert state[0].nu["w"].scale.shape == (2,)  # one scale per member of the batch
    ref = optax.adam(1e-2)
    ref_state = jax.vmap(ref.init)(params)
    for _ in range(2):
        u, state = jax.jit(jax.vmap(opt.update))(grads, state, params)
        ur, ref_state = jax.vmap(ref.update)(grads, ref_state, params)
    np.testing.assert_allclose(u["w"], ur["w"], rtol=2e-3)


def test_sharded_state():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    params = {"w": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 1000}
    grads = jax.tree.map(lambda x: 1e-6 * jnp.sin(x), params)
    opt = optim.scaled_state(optax.adam(1e-3))
    ref_u, ref_s = opt.update(grads, opt.init(params), params)

    def spec(x):
        return NamedSharding(mesh, P("x") if x.ndim == 2 else P())

    shardings = jax.tree.map(spec, jax.eval_shape(opt.init, params))
    sharded_params = jax.device_put(params, jax.tree.map(spec, params))
    state = jax.jit(opt.init, out_shardings=shardings)(sharded_params)
    assert state[0].mu["w"].data.sharding.is_equivalent_to(spec(params["w"]), 2)
    u, s = jax.jit(opt.update)(jax.device_put(grads, jax.tree.map(spec, grads)), state, sharded_params)
    for a, b in zip(jax.tree.leaves((u, s)), jax.tree.leaves((ref_u, ref_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scaled_params_and_gradients():
    rng = np.random.default_rng(0)
    p32 = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    g32 = {"w": jnp.asarray(1e-6 * rng.normal(size=(8, 8)), jnp.float32)}
    p16 = sfy.as_scaled_array(jax.tree.map(lambda x: x.astype(jnp.float16), p32))
    g16 = {"w": optim._unit_pack(g32["w"], jnp.float16)}  # float16 data, scale ~1e-6
    ref = optax.adamw(1e-3, weight_decay=0.1)
    opt = optim.scaled_state(optax.adamw(1e-3, weight_decay=0.1))
    s32, s16 = ref.init(p32), opt.init(p16)
    step32, step16 = jax.jit(ref.update), jax.jit(opt.update)
    for _ in range(3):
        u32, s32 = step32(sfy.asarray(g16, jnp.float32), s32, sfy.asarray(p16, jnp.float32))
        u16, s16 = step16(g16, s16, p16)
        assert isinstance(u16["w"], sfy.ScaledArray) and u16["w"].dtype == F16
        np.testing.assert_allclose(sfy.asarray(u16, jnp.float32)["w"], u32["w"], rtol=5e-3, atol=1e-7)
    assert_pow2_scales((u16, s16))


def test_extra_args_are_forwarded():
    params = {"w": jnp.ones((4,))}
    inner = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    opt = optim.scaled_state(inner)
    state, step = opt.init(params), jax.jit(opt.update)
    for _ in range(4):  # a loss that never improves: the plateau halves the scale
        u, state = step({"w": jnp.ones((4,))}, state, params, value=jnp.asarray(1.0))
    ref, ref_step = inner.init(params), jax.jit(inner.update)
    for _ in range(4):
        ur, ref = ref_step({"w": jnp.ones((4,))}, ref, params, value=jnp.asarray(1.0))
    assert float(state[1].scale) == float(ref[1].scale) < 1.0
    np.testing.assert_allclose(u["w"], ur["w"], rtol=1e-3)


def test_composes_inside_optax_transformations():
    params = {"w": jnp.linspace(-1.0, 1.0, 16)}
    grads = {"w": jnp.linspace(1.0, -0.5, 16) * 1e-4}
    for outer, ref in [
        (optax.chain(optax.clip_by_global_norm(1e-4), optim.scaled_state(optax.adam(1e-2))),
         optax.chain(optax.clip_by_global_norm(1e-4), optax.adam(1e-2))),
        (optax.MultiSteps(optim.scaled_state(optax.adam(1e-2)), 2).gradient_transformation(),
         optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation()),
    ]:
        s, sr = outer.init(params), ref.init(params)
        step, ref_step = jax.jit(outer.update), jax.jit(ref.update)
        for _ in range(4):
            u, s = step(grads, s, params)
            ur, sr = ref_step(grads, sr, params)
            np.testing.assert_allclose(u["w"], ur["w"], rtol=2e-3, atol=1e-9)


def test_bad_inputs():
    with pytest.raises(TypeError, match="Did you pass the factory `adam`"):
        optim.scaled_state(optax.adam)
    with pytest.raises(TypeError, match="GradientTransformation"):
        optim.scaled_state("adam")
    with pytest.raises(TypeError, match="GradientTransformation"):
        optim.scaled_state((lambda p: p, lambda u, s, p=None: (u, s)))
    with pytest.raises(TypeError, match="floating dtype"):
        optim.scaled_state(optax.adam(1e-3), jnp.int8)
    with pytest.raises(TypeError, match="floating dtype"):
        optim.scaled_state(optax.adam(1e-3), "not-a-dtype")
    with pytest.raises(TypeError, match="mu_dtype must be a floating dtype"):
        optim.scaled_state(optax.adam(1e-3), mu_dtype=jnp.bool_)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        optim.apply_updates({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, stochastic_rounding=True)
    with pytest.raises(ValueError, match="structure of params"):
        optim.apply_updates({"w": jnp.ones(2)}, {"v": jnp.ones(2)})


# --------------------------------------------------------------------------------------
# Inside scalify: the update's operations go through the scaled rules


def _scalified_adam_run(opt, steps, grads, params):
    @jax.jit
    @sfy.scalify
    def step(g, s, p):
        return opt.update(g, s, p)

    s = opt.init(params)
    out = []
    for i in range(steps):
        gi = jax.tree.map(lambda x: x * (1.0 + 0.25 * np.sin(i)), grads)
        u, s = step(gi, s, params)
        out.append(u)
    return out, s


@pytest.mark.parametrize("mu_dtype", [None, jnp.float8_e4m3fn])
def test_update_inside_scalify_matches_outside(mu_dtype):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "b": jnp.zeros((8,))}
    grads = {"w": jnp.asarray(1e-5 * rng.normal(size=(16, 8)), jnp.float32), "b": jnp.full((8,), 1e-6)}
    opt = optim.scaled_state(optax.adam(1e-3), mu_dtype=mu_dtype)
    inside, s_in = _scalified_adam_run(opt, 20, grads, params)
    ref = optax.adam(1e-3)
    sr, ref_step = ref.init(params), jax.jit(ref.update)
    rtol = 2e-2 if mu_dtype is None else 0.25
    for i, u in enumerate(inside):
        gi = jax.tree.map(lambda x: x * (1.0 + 0.25 * np.sin(i)), grads)
        ur, sr = ref_step(gi, sr, params)
        for k in ("w", "b"):
            np.testing.assert_allclose(np.asarray(u[k], np.float32), ur[k], rtol=rtol, atol=1e-6)
    # The state that comes out of scalify has the layout of the one that went in.
    s0 = opt.init(params)
    assert jax.tree.structure(s_in) == jax.tree.structure(s0)
    for a, b in zip(jax.tree.leaves(s_in), jax.tree.leaves(s0)):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert_pow2_scales(s_in)
    nu = s_in[0].nu["w"]
    assert 16384 < float(jnp.max(jnp.abs(nu.data.astype(jnp.float32)))) <= 32768
    np.testing.assert_allclose(sfy.asarray(nu, jnp.float32), sr[0].nu["w"], rtol=2e-2)


def test_training_step_inside_scalify_on_digits():
    """A whole training step (forward, grad, scaled-state Adam, apply) inside scalify."""
    model, params = _model_and_params()
    loss = _loss_fn(model)
    opt = optim.scaled_state(OPTIMIZERS["adam"]())

    @jax.jit
    @sfy.scalify
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    # Scaled float32 params: the step returns them scaled, so it compiles once.
    p, s = sfy.as_scaled_array(params), opt.init(params)
    losses = []
    for _ in range(12):
        p, s, value = step(p, s)
        losses.append(float(sfy.asarray(value, jnp.float32)))
    assert step._cache_size() == 1
    _, _, l32 = _float32_run("adam")
    np.testing.assert_allclose(losses, np.asarray(l32[:12]), rtol=2e-2)
    assert jax.tree.structure(s) == jax.tree.structure(opt.init(params))
    assert_pow2_scales(s)


# --------------------------------------------------------------------------------------
# Master weights: apply_updates and stochastic rounding


def test_stochastic_round_is_unbiased_and_picks_neighbours():
    x = jnp.asarray(np.float32(1.0) + np.float32(2.0**-12) * np.arange(8, dtype=np.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.jit(jax.vmap(lambda k: optim.stochastic_round(x, jnp.float16, k)))(keys)
    d = np.asarray(draws, np.float32)
    lo = np.asarray(x, np.float32).astype(np.float16)
    # each draw is one of the two float16 neighbours of x ...
    ulp = np.float32(2.0**-10)
    floor = np.floor(np.asarray(x) / ulp) * ulp
    assert np.all((d == floor) | (d == floor + ulp))
    # ... and the mean is x (std of the mean < 2**-10 / 2 / sqrt(4000))
    np.testing.assert_allclose(d.mean(axis=0), np.asarray(x), atol=4 * 2.0**-11 / np.sqrt(4000))
    exact = np.asarray([1.0, -2.5, 0.0, 65504.0], np.float32)
    out = optim.stochastic_round(exact, jnp.float16, keys[0])
    np.testing.assert_array_equal(out, exact.astype(np.float16))
    assert lo.dtype == np.float16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float16])
def test_stochastic_round_other_formats_and_edges(dtype):
    keys = jax.random.split(jax.random.PRNGKey(1), 2000)
    x = jnp.asarray([0.3, -1.7, 3e-8, 1e-3], jnp.float32)
    d = np.asarray(jax.jit(jax.vmap(lambda k: optim.stochastic_round(x, dtype, k)))(keys), np.float32)
    spread = np.abs(np.asarray(x)) * float(jnp.finfo(dtype).eps) + float(jnp.finfo(dtype).smallest_subnormal)
    np.testing.assert_allclose(d.mean(axis=0), np.asarray(x), atol=float(np.max(spread)) / 8)
    fmax = float(ml_dtypes.finfo(dtype).max)
    big = min(2 * fmax, 3.4e38)  # beyond bfloat16's range only as far as float32 goes
    edges = optim.stochastic_round(jnp.asarray([np.nan, big, -big], jnp.float32), dtype, keys[0])
    e = np.asarray(edges, np.float32)
    assert np.isnan(e[0]) and e[1] == fmax and e[2] == -fmax


@pytest.mark.parametrize("scaled_params", [False, True])
def test_float16_master_weights_stagnate_without_stochastic_rounding(scaled_params):
    n, steps, delta = 4096, 200, 1e-4  # delta < half a float16 ulp of 1.0 (2**-11 = 4.9e-4)
    p0 = jnp.ones((n,), jnp.float16)
    params = {"w": sfy.as_scaled_array(p0) if scaled_params else p0}
    updates = {"w": jnp.full((n,), delta, jnp.float32)}

    @functools.partial(jax.jit, static_argnames="sr")
    def run(params, key, sr):
        def body(carry, k):
            return optim.apply_updates(carry, updates, stochastic_rounding=sr, key=k if sr else None), None

        out, _ = jax.lax.scan(body, params, jax.random.split(key, steps))
        return out

    target = 1.0 + steps * delta  # the float32 result
    nearest = np.asarray(sfy.asarray(run(params, jax.random.PRNGKey(0), False), jnp.float32)["w"])
    np.testing.assert_array_equal(nearest, 1.0)  # every update vanished
    sr = run(params, jax.random.PRNGKey(0), True)
    values = np.asarray(sfy.asarray(sr, jnp.float32)["w"])
    assert abs(values.mean() - target) < 5e-4  # tracks float32 on average
    assert values.std() > 0
    leaf = sr["w"]
    if scaled_params:
        assert isinstance(leaf, sfy.ScaledArray) and leaf.dtype == F16
        assert_pow2_scales(sr)
    else:
        assert leaf.dtype == F16


def test_apply_updates_scaled_params():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(32, 16)).astype(np.float32) * 1e-3
    params = {"w": optim._unit_pack(jnp.asarray(w), jnp.float16), "n": None, "f": jnp.ones((3,), jnp.float32)}
    u = {"w": jnp.asarray(rng.normal(size=(32, 16)) * 1e-4, jnp.float32), "n": None, "f": jnp.full((3,), 0.5)}
    out = jax.jit(optim.apply_updates)(params, u)
    assert isinstance(out["w"], sfy.ScaledArray) and out["w"].dtype == F16
    amax = float(jnp.max(jnp.abs(out["w"].data.astype(jnp.float32))))
    assert 1.0 <= amax < 2.0
    want = sfy.asarray(params["w"], jnp.float32) + u["w"]
    np.testing.assert_allclose(sfy.asarray(out["w"], jnp.float32), want, rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(out["f"], np.full((3,), 1.5, np.float32))
    assert out["n"] is None
    scaled_u = {"w": optim._unit_pack(u["w"], jnp.float16), "n": None, "f": u["f"]}
    out2 = optim.apply_updates(params, scaled_u)
    got, want = sfy.asarray(out2["w"], jnp.float32), sfy.asarray(out["w"], jnp.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)
    assert_pow2_scales(out)


def test_update_inside_scalify_is_one_float32_island():
    """Inside `scalify` the inner update's arithmetic is one float32 call evaluated as
    plain JAX (no scale arithmetic per elementwise operation): the traced update stays
    within a small multiple of the plain update's equations (the repacking of each
    state leaf and update), where running it through the scaled rules took about 25x."""
    params = {f"w{i}": jnp.full((8, 4), 0.1 * (i + 1)) for i in range(10)}
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt = optim.scaled_state(inner)
    sp = sfy.as_scaled_array(params, dtype=jnp.float16)
    sg = sfy.as_scaled_array(grads, dtype=jnp.float16)
    state = opt.init(sp)
    plain = jax.make_jaxpr(lambda g, s, p: inner.update(g, s, p))(grads, inner.init(params), params)
    scaled = jax.make_jaxpr(sfy.scalify(lambda g, s, p: opt.update(g, s, p)))(sg, state, sp)
    calls = [e for e in scaled.eqns if e.primitive is optim.float32_call_p]
    assert calls == [] and len(scaled.eqns) <= 6 * len(plain.eqns), (len(scaled.eqns), len(plain.eqns))
    # The island is evaluated inline: its equations are the plain update's.
    assert sum(e.primitive.name == "sqrt" for e in scaled.eqns) == sum(e.primitive.name == "sqrt" for e in plain.eqns)
    # Same values as the update outside scalify.
    want = opt.update(sg, state, sp)
    got = sfy.scalify(lambda g, s, p: opt.update(g, s, p))(sg, state, sp)
    for a, b in zip(jax.tree.leaves(got, is_leaf=sfy.core.is_scaled_leaf), jax.tree.leaves(want, is_leaf=sfy.core.is_scaled_leaf)):
        np.testing.assert_array_equal(np.asarray(sfy.asarray(a, jnp.float32)), np.asarray(sfy.asarray(b, jnp.float32)))
