"""Unmodified Flax linen models: one Adam step under jax.jit(scalify(step)) vs float32."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.models.harness import check_training_step

DTYPES = [(jnp.float32, 1e-4), (jnp.float16, 3e-2)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.gelu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(16, (3, 3), strides=(2, 2))(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=False, dropout_rate=0.0)(
            nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dropout(0.1, deterministic=False)(h)
        h = nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x))))
        return x + h, None


class Transformer(nn.Module):
    vocab: int = 32
    d: int = 32
    heads: int = 2
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        length=self.layers)
        x, _ = Stack(self.d, self.heads)(x, None)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_mlp(dtype, tol):
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 20))
    y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)

    def loss_fn(p, x, y):
        return _xent(model.apply(p, x), y), None

    check_training_step(loss_fn, params, (x, y), dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_cnn_with_batchnorm_and_avg_pool(dtype, tol):
    model = CNN()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 12, 12, 3))
    y = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 10)
    variables = model.init(jax.random.PRNGKey(2), x)
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(p, stats, x, y):
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
        return _xent(logits, y), new["batch_stats"]

    out = check_training_step(loss_fn, params, (stats, x, y), dtype, tol)
    # The mutable batch statistics are updated the same way.
    ref_stats = out["ref"][4]
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, __import__("scalify").asarray(out["aux"], dtype=jnp.float32))),
                    jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(a, b, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_transformer_with_scan_attention_embed_dropout(dtype, tol):
    model = Transformer()
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 32)
    params = model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, tokens)

    def loss_fn(p, tokens, key):
        logits = model.apply(p, tokens[:, :-1], rngs={"dropout": key})
        return _xent(logits, tokens[:, 1:]), None

    check_training_step(loss_fn, params, (tokens, jax.random.PRNGKey(3)), dtype, tol)
