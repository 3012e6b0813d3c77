"""An Equinox MLP on scikit-learn's digits, trained with scalify: FP8 matmuls, float16
weights and float16 Adam state.

    python examples/equinox_digits.py [--steps 300] [--quick]

The Equinox model is unmodified. As usual with Equinox, the model is partitioned into its
float arrays (what is trained, here float16 `ScaledArray`s) and the rest (activation
functions, shapes), recombined inside the loss:

    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt = sfy.optim.scaled_state(optax.adamw(lr), dtype=jnp.float16)
    step = jax.jit(sfy.scalify(step))   # step uses sfy.fp8.autocast(loss)

The same model trains in plain float32 beside it; both test accuracies are printed.
"""
from __future__ import annotations

import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import compare_float32_fp8, digits_result, fit, load_digits_split, make_train_step  # noqa: E402


def train(scalified: bool, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_digits_split(seed)
    # jax.nn.gelu with its default tanh approximation (its x**3 is range-guarded by scalify).
    model = eqx.nn.MLP(64, 10, width_size=256, depth=2, activation=jax.nn.gelu, key=jax.random.PRNGKey(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def logits_fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()

    inner = optax.adamw(lr, weight_decay=1e-4)
    if scalified:
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
        opt = sfy.optim.scaled_state(inner, dtype=jnp.float16)
        loss = sfy.fp8.autocast(loss_fn)  # every matmul in float8 (vmapped too)
    else:
        opt, loss = inner, loss_fn

    step = make_train_step(loss, opt)
    step = jax.jit(sfy.scalify(step) if scalified else step)
    params, _, loss_value, seconds = fit(step, params, opt.init(params), xtr, ytr, steps, batch, seed,
                                         scalified)
    return digits_result(logits_fn, params, xte, yte, scalified, loss_value, seconds)


def main(argv=None):
    return compare_float32_fp8(train, argv, __doc__)


if __name__ == "__main__":
    main()
