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

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import accuracy, fit, load_digits_split, make_train_step, parse_steps, print_results  # noqa: E402


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
        return opt, jax.jit(make_train_step(loss_fn, opt))

    # Adam state stored as float16 ScaledArrays; every update computed in float32.
    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)
    # Every matmul (forward and both backward products) as a real float8 dot_general for
    # "scalify-fp8"; "scalify-fp16" is the plain loss, scalified.
    loss = sfy.fp8.autocast(loss_fn) if mode == "scalify-fp8" else loss_fn
    step = make_train_step(loss, opt)
    return opt, jax.jit(sfy.scalify(step))


def evaluate(mode: str, params, x, y) -> float:
    if mode == "float32":
        return accuracy(forward(params, x), y)
    # Evaluated the way the model trained: scalified, float16 inputs.
    fwd = sfy.scalify(forward if mode == "scalify-fp16" else sfy.fp8.autocast(forward))
    return accuracy(jax.jit(fwd)(params, sfy.as_scaled_array(jnp.asarray(x), dtype=jnp.float16)), y)


def train(mode: str, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_digits_split(seed)
    params = init_params(jax.random.PRNGKey(seed))
    if mode != "float32":
        # Float16 ScaledArrays whose data has unit RMS (as_scaled_array unit-scales).
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt, step = make_step(mode, lr)
    params, _, loss, seconds = fit(step, params, opt.init(params), xtr, ytr, steps, batch, seed,
                                   scalified=mode != "float32")
    return {"mode": mode, "final_loss": loss, "test_accuracy": evaluate(mode, params, xte, yte),
            "seconds": seconds}


def main(argv=None):
    args = parse_steps(argv, __doc__, default=400)
    steps = 25 if args.quick else args.steps
    results = [train(m, steps) for m in ("float32", "scalify-fp16", "scalify-fp8")]
    print_results(results, "test_accuracy", "test acc")
    return results


if __name__ == "__main__":
    main()
