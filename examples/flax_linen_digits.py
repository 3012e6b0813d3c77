"""A Flax linen CNN on scikit-learn's digits, trained with scalify: FP8 matmuls and
convolutions, float16 weights and float16 Adam state.

    python examples/flax_linen_digits.py [--steps 300] [--quick]

The linen model and its `apply` are unmodified; only the training step changes:

    params = sfy.as_scaled_array(params, dtype=jnp.float16)        # float16 ScaledArrays
    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)  # float16 Adam state
    loss = sfy.fp8.autocast(loss_fn, conv=True)                    # float8 dots and convs
    step = jax.jit(sfy.scalify(step))

It trains the same model in plain float32 beside it and prints both test accuracies.
"""
from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import compare_float32_fp8, digits_result, fit, load_digits_split, make_train_step  # noqa: E402


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (batch, 8, 8, 1)
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.LayerNorm()(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(10)(x)


MODEL = CNN()


def loss_fn(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(scalified: bool, lr: float):
    if not scalified:
        opt = optax.adam(lr)
        return opt, jax.jit(make_train_step(loss_fn, opt))
    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)
    loss = sfy.fp8.autocast(loss_fn, conv=True)
    return opt, jax.jit(sfy.scalify(make_train_step(loss, opt)))


def train(scalified: bool, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_digits_split(seed, images=True)
    params = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    if scalified:
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt, step = make_step(scalified, lr)
    params, _, loss, seconds = fit(step, params, opt.init(params), xtr, ytr, steps, batch, seed, scalified)
    apply = lambda p, x: MODEL.apply({"params": p}, x)
    return digits_result(apply, params, xte, yte, scalified, loss, seconds, conv=True)


def main(argv=None):
    return compare_float32_fp8(train, argv, __doc__)


if __name__ == "__main__":
    main()
