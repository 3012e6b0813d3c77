"""An MLP on scikit-learn's bundled digits: float32 vs scalify float16 vs scalify FP8.

    python examples/digits_mlp.py [--steps 400] [--quick]

The same plain-JAX model, data order and Adam optimizer run three times:

- ``float32``: plain JAX;
- ``scalify-fp16``: `scalify` with float16 ScaledArray weights, inputs, activations and
  gradients, and Adam state stored as float16 ScaledArrays (`scalify.optim.scaled_state`);
- ``scalify-fp8``: the same with every matmul in float8 (`scalify.fp8.autocast`: E4M3
  weights and activations, E5M2 gradients).

It prints the test accuracy of each; the scalified runs match float32 within a point.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401


def load_data(seed: int = 0):
    """(train, test) splits of the 1797 8x8 digits, standardised features, int labels."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return (x[idx[n_test:]], y[idx[n_test:]]), (x[idx[:n_test]], y[idx[:n_test]])


def init_params(key, sizes=(64, 256, 256, 10)):
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


def make_step(mode: str, lr: float):
    """(optimizer, jitted step) of one mode; the step is ``(params, state, x, y) ->
    (params, state, loss)``."""
    if mode == "float32":
        opt = optax.adam(lr)

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return opt, jax.jit(step)

    # Adam state stored as float16 ScaledArrays; every update computed in float32.
    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)
    # Every matmul (forward and both backward products) as a real float8 dot_general for
    # "scalify-fp8"; for "scalify-fp16" the same policy with float16 "casts" does only its
    # dynamic rescaling (each matmul's output gradient brought to unit RMS data).
    if mode == "scalify-fp8":
        loss = sfy.fp8.autocast(loss_fn)
    else:
        loss = sfy.fp8.autocast(loss_fn, fwd_dtype=jnp.float16, bwd_dtype=jnp.float16)

    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # Keep the weights' data at unit RMS (the norm goes into the power-of-two scale).
        params = jax.tree.map(sfy.ops.dynamic_rescale_l2, params)
        return params, state, value

    return opt, jax.jit(sfy.scalify(step))


def accuracy(mode: str, params, x, y) -> float:
    if mode == "float32":
        logits = forward(params, x)
    else:  # evaluate the way the model trained: scalified, float16 inputs
        fwd = sfy.scalify(forward if mode == "scalify-fp16" else sfy.fp8.autocast(forward))
        logits = sfy.asarray(jax.jit(fwd)(params, sfy.as_scaled_array(jnp.asarray(x), dtype=jnp.float16)),
                             dtype=jnp.float32)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def train(mode: str, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_data(seed)
    params = init_params(jax.random.PRNGKey(seed))
    if mode != "float32":
        # Float16 ScaledArrays whose data has unit RMS (as_scaled_array unit-scales).
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt, step = make_step(mode, lr)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        x = jnp.asarray(xtr[idx])
        if mode != "float32":
            x = sfy.as_scaled_array(x, dtype=jnp.float16)
        params, state, loss = step(params, state, x, ytr[idx])
    loss = float(sfy.asarray(loss, dtype=jnp.float32))
    return {"mode": mode, "final_loss": loss, "test_accuracy": accuracy(mode, params, xte, yte),
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    steps = 25 if args.quick else args.steps
    results = [train(m, steps) for m in ("float32", "scalify-fp16", "scalify-fp8")]
    print(f"{'mode':<14}{'final loss':>12}{'test acc':>10}{'time (s)':>10}")
    for r in results:
        print(f"{r['mode']:<14}{r['final_loss']:>12.4f}{r['test_accuracy']:>10.3f}{r['seconds']:>10.1f}")
    return results


if __name__ == "__main__":
    main()
