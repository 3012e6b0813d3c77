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

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return (x[idx[n_test:]], y[idx[n_test:]]), (x[idx[:n_test]], y[idx[:n_test]])


def train(scalified: bool, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_data(seed)
    # SiLU rather than jax.nn.gelu: gelu's default tanh approximation computes x**3, and
    # scalify's integer_pow rule cubes the data (data**3 at scale**3) without rescaling, so
    # float16 data overflows once pre-activations' data drift past ~40 (README, "Limitations").
    model = eqx.nn.MLP(64, 10, width_size=256, depth=2, activation=jax.nn.silu, key=jax.random.PRNGKey(seed))
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

    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if scalified:  # unit-RMS weight data
            params = jax.tree.map(sfy.ops.dynamic_rescale_l2, params)
        return params, state, value

    step = jax.jit(sfy.scalify(step) if scalified else step)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        x = jnp.asarray(xtr[idx])
        if scalified:
            x = sfy.as_scaled_array(x, dtype=jnp.float16)
        params, state, value = step(params, state, x, ytr[idx])
    seconds = time.perf_counter() - t0
    x = jnp.asarray(xte)
    apply = logits_fn
    if scalified:
        apply = sfy.scalify(sfy.fp8.autocast(logits_fn))
        x = sfy.as_scaled_array(x, dtype=jnp.float16)
    logits = sfy.asarray(jax.jit(apply)(params, x), dtype=jnp.float32)
    return {"mode": "scalify-fp8" if scalified else "float32",
            "final_loss": float(sfy.asarray(value, dtype=jnp.float32)),
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
