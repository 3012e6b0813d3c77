"""Train a small MLP on scikit-learn's bundled digits: float32 vs scalify float16.

    python examples/digits_mlp.py [--steps 300] [--quick]

The same model, data order and optimizer run twice: once in plain float32 JAX, once under
`scalify` with float16 parameters, activations and gradients (ScaledArrays). It prints
the test accuracy of both; scalify float16 should match float32 within a point or so.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import scalify as sfy


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return (x[idx[n_test:]], y[idx[n_test:]]), (x[idx[:n_test]], y[idx[:n_test]])


def init_params(key, sizes=(64, 128, 128, 10)):
    params = []
    for k, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
        params.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return params


def forward(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(forward(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def sgd_step(params, x, y, lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params, loss


def accuracy(params, x, y):
    logits = sfy.asarray(forward(sfy.asarray(params, dtype=jnp.float32), x))
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def train(mode: str, steps: int, batch: int = 128, lr: float = 0.1, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_data(seed)
    params = init_params(jax.random.PRNGKey(seed))
    if mode == "float32":
        step = jax.jit(sgd_step)
    else:  # scalify float16: parameters and inputs as float16 ScaledArrays
        params = sfy.as_scaled_array(jax.tree.map(lambda p: p.astype(jnp.float16), params))
        step = jax.jit(sfy.scalify(sgd_step))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        x = xtr[idx]
        if mode != "float32":
            x = sfy.as_scaled_array(jnp.asarray(x, jnp.float16))
        params, loss = step(params, x, ytr[idx], lr)
    loss = float(sfy.asarray(loss, dtype=jnp.float32))
    return {"mode": mode, "final_loss": loss, "test_accuracy": accuracy(params, xte, yte),
            "seconds": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a few steps, for tests")
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    results = [train("float32", steps), train("scalify-float16", steps)]
    print(f"{'mode':<18}{'final loss':>12}{'test acc':>10}{'time (s)':>10}")
    for r in results:
        print(f"{r['mode']:<18}{r['final_loss']:>12.4f}{r['test_accuracy']:>10.3f}{r['seconds']:>10.1f}")
    return results


if __name__ == "__main__":
    main()
