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

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (batch, 8, 8, 1)
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.LayerNorm()(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(10)(x)


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x = (x - x.mean()) / x.std()
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return (x[idx[n_test:]], y[idx[n_test:]]), (x[idx[:n_test]], y[idx[:n_test]])


MODEL = CNN()


def loss_fn(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(scalified: bool, lr: float):
    if not scalified:
        opt = optax.adam(lr)

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return opt, jax.jit(step)

    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)
    loss = sfy.fp8.autocast(loss_fn, conv=True)

    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        params = jax.tree.map(sfy.ops.dynamic_rescale_l2, params)  # unit-RMS weight data
        return params, state, value

    return opt, jax.jit(sfy.scalify(step))


def train(scalified: bool, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_data(seed)
    params = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    if scalified:
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt, step = make_step(scalified, lr)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        x = jnp.asarray(xtr[idx])
        if scalified:
            x = sfy.as_scaled_array(x, dtype=jnp.float16)
        params, state, loss = step(params, state, x, ytr[idx])
    seconds = time.perf_counter() - t0
    # Test accuracy, evaluated the way the model trained.
    apply = lambda p, x: MODEL.apply({"params": p}, x)
    x = jnp.asarray(xte)
    if scalified:
        apply = sfy.scalify(sfy.fp8.autocast(apply, conv=True))
        x = sfy.as_scaled_array(x, dtype=jnp.float16)
    logits = sfy.asarray(jax.jit(apply)(params, x), dtype=jnp.float32)
    return {"mode": "scalify-fp8" if scalified else "float32",
            "final_loss": float(sfy.asarray(loss, dtype=jnp.float32)),
            "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == yte)), "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    steps = 15 if args.quick else args.steps
    results = [train(False, steps), train(True, steps)]
    print(f"{'mode':<14}{'final loss':>12}{'test acc':>10}{'time (s)':>10}")
    for r in results:
        print(f"{r['mode']:<14}{r['final_loss']:>12.4f}{r['test_accuracy']:>10.3f}{r['seconds']:>10.1f}")
    return results


if __name__ == "__main__":
    main()
