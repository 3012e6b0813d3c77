"""An unmodified Flax NNX transformer under jax.jit(scalify(step)) vs float32."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from tests.models.harness import check_training_step


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.drop = nnx.Dropout(0.1)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, key):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.drop(self.attn(self.ln1(x), mask=mask), rngs=nnx.Rngs(dropout=key))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, vocab=32, d=32, heads=2, layers=2, rngs=None):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens, key):
        x = self.embed(tokens)
        for blk, k in zip(self.blocks, jax.random.split(key, len(self.blocks))):
            x = blk(x, k)
        return self.head(self.ln(x))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.float16, 3e-2)])
def test_nnx_transformer(dtype, tol):
    model = Transformer(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 32)

    def loss_fn(params, tokens, key):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens[:, :-1], key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), None

    check_training_step(loss_fn, params, (tokens, jax.random.PRNGKey(1)), dtype, tol)
