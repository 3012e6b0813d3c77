"""`scalify.fp8.rewrite`: `autocast` on whole programs -- transformers, control flow,
Equinox, sharding -- and a short float8 training run."""
import inspect
import json as _json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import scalify as sfy
from scalify import fp8
from tests.fp8.common import CFG, E4M3, E5M2, gpt, gpt_loss, init_gpt, normal, rel_err, tree_rel_errs
from tests.utils import count_eqns


# --- a transformer training step: every product float8 in the lowered program ---------


def test_gpt_step_all_products_float8():
    """A transformer training step (scan over layers, attention, embeddings) under
    scalify: every product of the forward and backward passes is a float8 product."""
    params = init_gpt(CFG)
    tok = np.zeros((2, CFG.seq_len), np.int32)
    n_fwd = count_eqns(jax.make_jaxpr(gpt_loss)(params, tok, tok).jaxpr, "dot_general")
    step = jax.jit(sfy.scalify(jax.value_and_grad(fp8.autocast(gpt_loss, keep_output=False))))
    lowered = step.lower(sfy.as_scaled_array(params), tok, tok)
    assert n_fwd == 7  # head + (qkv, logits, probs @ v, out, mlp in, mlp out) in the scan
    report = fp8.matmul_report(lowered, expect_fp8="all", raise_on_fallback=True)
    fwd = [e for e in report.entries if (e.lhs_dtype, e.rhs_dtype) == (E4M3, E4M3)]
    bwd = [e for e in report.entries if E5M2 in (e.lhs_dtype, e.rhs_dtype)]
    assert len(fwd) == n_fwd, str(report)
    assert len(bwd) == 2 * n_fwd, str(report)  # d(lhs) and d(rhs) of every product
    assert len(report.entries) == 3 * n_fwd
    # Gradients are E5M2 x E4M3 (one operand of each), as cuBLASLt's FP8 GEMM wants.
    assert all({e.lhs_dtype, e.rhs_dtype} == {E4M3, E5M2} for e in bwd)
    assert all(e.out_dtype == "float32" for e in report.entries)


# --- composition: jit, grad, remat, cond, vmap, Python arguments, Equinox, sharding ------


def test_composes_with_jit_remat_cond_and_vmap():
    def layer(x, w):
        return jnp.tanh(x @ w)

    @jax.jit
    def inner(x, w):
        return jax.checkpoint(layer)(x, w)

    def loss(x, w, flag):
        h = inner(x, w)
        h = lax.cond(flag, lambda h: h @ w, lambda h: -h @ w, h)
        return jnp.sum(jax.vmap(lambda r: r @ w)(h) ** 2)

    x = normal((8, 32), 1)
    w = normal((32, 32), 2, 1 / 6)
    grad = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss, keep_output=False), argnums=(0, 1))))
    args = (sfy.as_scaled_array(x), sfy.as_scaled_array(w), True)
    report = fp8.matmul_report(grad.lower(*args), expect_fp8="all", raise_on_fallback=True)
    assert report.fp8_count >= 8, str(report)  # 3 forward (+ cond's other branch) + 6 backward
    g = grad(*args)
    g0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, True)
    for a, b in zip(g, g0):
        assert 1e-3 < rel_err(a, b) < 0.3


def test_python_numbers_stay_static_and_errors_name_the_user_line():
    """A Python bool or float argument is not traced (as under `scalify`): Python code
    can branch on it. Rebound equations keep their source lines, so that scalify's
    error for an unsupported primitive still names the user's code."""

    def loss(x, w, train, k):
        h = x @ w
        if train:
            h = h * k
        return jnp.sum(h**2)

    x, w = normal((8, 16), 1), normal((16, 4), 2, 1 / 4)
    g = jax.grad(fp8.autocast(loss, keep_output=False), argnums=1)(x, w, True, 2.0)
    g0 = jax.grad(loss, argnums=1)(x, w, True, 2.0)
    assert 1e-3 < rel_err(g, g0) < 0.3

    prim = jax.extend.core.Primitive("my_custom_op")
    prim.def_abstract_eval(lambda a: a)

    def f(x, w):
        return prim.bind(x) @ w

    with pytest.raises(sfy.UnsupportedPrimitiveError) as info:
        sfy.scalify(fp8.autocast(f))(sfy.as_scaled_array(x), w)
    msg = str(info.value)
    assert "my_custom_op" in msg and os.path.basename(__file__) in msg, msg


def test_equinox_mlp():
    import equinox as eqx

    model = eqx.filter_jit(lambda k: eqx.nn.MLP(16, 4, 32, depth=2, key=k))(jax.random.key(0))
    x = normal((8, 16), 1)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, x):
        m = eqx.combine(params, static)
        return jnp.mean(jax.vmap(m)(x) ** 2)

    grad = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss, keep_output=False))))
    sparams = sfy.as_scaled_array(params)
    report = fp8.matmul_report(grad.lower(sparams, x), expect_fp8="all", raise_on_fallback=True)
    assert report.fp8_count == 3 + 5, str(report)  # 3 forward; d(first layer input) unused
    g = grad(sparams, x)
    g0 = jax.jit(jax.grad(loss))(params, x)
    errs = tree_rel_errs(g, g0)
    assert max(errs.values()) < 0.3, errs


def test_sharded_data_parallel_and_shard_map():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",))
    x = jax.device_put(normal((8, 16), 7), NamedSharding(mesh, P("d", None)))
    w = jax.device_put(normal((16, 16), 8, 1 / 4), NamedSharding(mesh, P()))

    def loss(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    # Batch-sharded data: d(w) contracts the sharded batch, its sharding is w's.
    lowered = jax.jit(jax.grad(fp8.autocast(loss))).lower(w, x)
    assert fp8.matmul_report(lowered, expect_fp8="all", raise_on_fallback=True).fp8_count == 2

    def step(w, x):
        return lax.pmean(jax.grad(fp8.autocast(loss))(w, x), "d")

    in_shard_map = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d", None)), out_specs=P())
    assert fp8.matmul_report(jax.jit(in_shard_map).lower(w, x), expect_fp8="all", raise_on_fallback=True)
    # Around a shard_map (whose body needs its mesh axes) the body is left as it is,
    # with a warning.
    sm = jax.shard_map(lambda x, w: lax.psum(x @ w, "d"), mesh=mesh,
                       in_specs=(P(None, "d"), P("d", None)), out_specs=P())
    xs = jax.device_put(normal((8, 16), 9), NamedSharding(mesh, P(None, "d")))
    ws = jax.device_put(normal((16, 16), 10), NamedSharding(mesh, P("d", None)))
    with pytest.warns(UserWarning, match="could not rewrite the body of 'shard_map'"):
        report = fp8.matmul_report(jax.jit(fp8.autocast(sm)).lower(xs, ws))
    assert report.fp8_count == 0 and len(report.entries) == 1


# --- training: 200 steps of a small transformer in float8 under scalify ----------------


@pytest.mark.slow
def test_training_200_steps_fp8_within_3_percent_of_float32():
    cfg = gpt.GPTConfig(vocab=96, seq_len=16, d_model=32, n_heads=2, n_layers=1)
    text = inspect.getsource(_json.decoder) + inspect.getsource(_json.encoder)
    data = np.array([min(max(ord(c) - 32, 0), 95) for c in text], np.int32)
    steps, batch = 200, 16
    starts = np.random.default_rng(0).integers(0, len(data) - cfg.seq_len - 1, size=(steps, batch))
    batches = jnp.asarray(np.stack([[data[s : s + cfg.seq_len + 1] for s in row] for row in starts]))

    def loss(p, t, y):
        return gpt.loss_fn(p, t, y, cfg)

    def fp8_value_and_grad(p, t, y):
        v, g = sfy.scalify(jax.value_and_grad(fp8.autocast(loss)))(sfy.as_scaled_array(p), t, y)
        return sfy.asarray(v), sfy.asarray(g)

    opt = optax.adam(1e-2)

    def train(value_and_grad, params):
        def step(carry, b):
            p, s = carry
            v, g = value_and_grad(p, b[:, :-1], b[:, 1:])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        _, losses = lax.scan(step, (params, opt.init(params)), batches)
        return losses

    params = init_gpt(cfg)
    l32 = np.asarray(jax.jit(lambda p: train(jax.value_and_grad(loss), p))(params))
    l8 = np.asarray(jax.jit(lambda p: train(fp8_value_and_grad, p))(params))
    assert abs(l8[0] - l32[0]) < 0.02 * l32[0]  # same parameters, same batch
    final32, final8 = l32[-20:].mean(), l8[-20:].mean()
    assert final32 < 0.7 * l32[0]  # it learned
    assert abs(final8 - final32) < 0.03 * final32, (final8, final32)
    assert not np.allclose(l8, l32, rtol=1e-4)  # and it really ran in float8
