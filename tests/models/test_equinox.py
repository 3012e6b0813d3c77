"""Unmodified Equinox models with eqx.filter_jit / eqx.filter_value_and_grad under scalify."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalify as sfy
from tests.models.harness import f32, rel_err, to_scaled


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    attn: list
    ln: list
    mlp: list
    head: eqx.nn.Linear

    def __init__(self, key, vocab=32, d=32, heads=2, layers=2):
        ks = jax.random.split(key, 3 * layers + 2)
        self.embed = eqx.nn.Embedding(vocab, d, key=ks[0])
        self.attn = [eqx.nn.MultiheadAttention(heads, d, key=ks[1 + i]) for i in range(layers)]
        self.ln = [eqx.nn.LayerNorm(d) for _ in range(2 * layers + 1)]
        self.mlp = [eqx.nn.MLP(d, d, 4 * d, 1, activation=jax.nn.gelu, key=ks[1 + layers + i]) for i in range(layers)]
        self.head = eqx.nn.Linear(d, vocab, key=ks[-1])

    def __call__(self, tokens):
        T = tokens.shape[0]
        x = jax.vmap(self.embed)(tokens)
        mask = jnp.tril(jnp.ones((T, T), bool))
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            h = jax.vmap(self.ln[2 * i])(x)
            x = x + attn(h, h, h, mask=mask)
            x = x + jax.vmap(mlp)(jax.vmap(self.ln[2 * i + 1])(x))
        return jax.vmap(self.head)(jax.vmap(self.ln[-1])(x))


def _run(model, loss, batch, dtype, tol):
    opt = optax.adam(1e-3)

    def step(model, opt_state, *batch):
        l, grads = eqx.filter_value_and_grad(loss)(model, *batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # float32 optimizer math
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, l, grads

    state = opt.init(eqx.filter(model, eqx.is_array))
    ref = eqx.filter_jit(step)(model, state, *batch)
    smodel = jax.tree.map(lambda x: to_scaled(x, dtype) if eqx.is_inexact_array(x) else x, model)
    out = eqx.filter_jit(sfy.scalify(step))(smodel, to_scaled(state, jnp.float32), *batch)
    new_model, _, l, grads = out
    np.testing.assert_allclose(float(f32(l)), float(ref[2]), rtol=tol)
    g_ref = eqx.filter(ref[3], eqx.is_array)
    g = eqx.filter(grads, lambda x: isinstance(x, (sfy.ScaledArray, jax.Array)))
    assert rel_err(jax.tree.leaves(g, is_leaf=sfy.core.is_scaled_leaf), jax.tree.leaves(g_ref)) < tol
    # Compare the whole Adam update in L2 (near-zero gradients may flip sign in float16).
    old = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    upd = [a - o for a, o in zip(jax.tree.leaves(eqx.filter(f32(new_model), eqx.is_array)), old)]
    ref_upd = [a - o for a, o in zip(jax.tree.leaves(eqx.filter(ref[0], eqx.is_array)), old)]
    assert rel_err(upd, ref_upd) < 4 * tol


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.float16, 3e-2)])
def test_equinox_mlp(dtype, tol):
    model = eqx.nn.MLP(20, 10, 64, 2, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 20))
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 10)

    def loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()

    _run(model, loss, (x, y), dtype, tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.float16, 3e-2)])
def test_equinox_transformer(dtype, tol):
    model = Transformer(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 32)

    def loss(model, tokens):
        logits = jax.vmap(model)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    _run(model, loss, (tokens,), dtype, tol)
