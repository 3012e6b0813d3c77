"""What the examples share: scikit-learn's digits split, the training step, the loop over
random batches and the printed results table. Each example keeps its model and its
scalify setup in its own file."""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.ops  # noqa: F401


def load_digits_split(seed: int = 0, images: bool = False):
    """``(train, test)`` splits (4/5, 1/5) of the 1797 digits with int32 labels: 64
    features standardised one by one, or with ``images`` 8x8x1 images standardised as a
    whole."""
    digits = load_digits()
    if images:
        x = (digits.images / 16.0).astype(np.float32)[..., None]
        x = (x - x.mean()) / x.std()
    else:
        x = (digits.data / 16.0).astype(np.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return (x[idx[n_test:]], y[idx[n_test:]]), (x[idx[:n_test]], y[idx[:n_test]])


def make_train_step(loss: Callable, opt: optax.GradientTransformation) -> Callable:
    """``(params, state, *batch) -> (params, state, loss)``: value_and_grad and the optax
    update, the same step for float32 and for scalify (no rescaling recipe). Not jitted."""

    def step(params, state, *batch):
        value, grads = jax.value_and_grad(loss)(params, *batch)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, value

    return step


def fit(step: Callable, params: Any, state: Any, x: np.ndarray, y: np.ndarray, steps: int,
        batch: int, seed: int, scalified: bool):
    """Run ``steps`` steps on random batches of ``(x, y)`` (float16 ScaledArray inputs
    when ``scalified``). Returns ``(params, state, last loss as a float, seconds)``."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        xb = jnp.asarray(x[idx])
        if scalified:
            xb = sfy.as_scaled_array(xb, dtype=jnp.float16)
        params, state, loss = step(params, state, xb, y[idx])
    seconds = time.perf_counter() - t0
    return params, state, float(sfy.asarray(loss, dtype=jnp.float32)), seconds


def accuracy(logits: Any, y: np.ndarray) -> float:
    """Fraction of argmax hits; ``logits`` may be a ScaledArray."""
    logits = sfy.asarray(logits, dtype=jnp.float32)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def parse_steps(argv: Optional[Sequence[str]], doc: str, default: int) -> argparse.Namespace:
    """The examples' command line: ``--steps N`` and ``--quick`` (a few steps, for tests)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default)
    parser.add_argument("--quick", action="store_true", help="a few steps, for tests")
    return parser.parse_args(argv)


def print_results(results: List[Dict[str, Any]], metric: str, label: str) -> None:
    """One line per run: mode, final loss, ``metric`` (headed ``label``), seconds."""
    print(f"{'mode':<14}{'final loss':>12}{label:>10}{'time (s)':>10}")
    for r in results:
        value = f"{r[metric]:>10.3f}" if metric == "test_accuracy" else f"{r[metric]:>10.4f}"
        print(f"{r['mode']:<14}{r['final_loss']:>12.4f}{value}{r['seconds']:>10.1f}")


def digits_result(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, scalified: bool,
                  loss: float, seconds: float, **autocast: Any) -> Dict[str, Any]:
    """A digits run's results row, with the test accuracy of ``apply(params, x)``
    evaluated the way the model trained: for scalified runs under
    ``scalify(fp8.autocast(apply, **autocast))`` on float16 ScaledArray inputs."""
    x = jnp.asarray(x)
    if scalified:
        apply = sfy.scalify(sfy.fp8.autocast(apply, **autocast))
        x = sfy.as_scaled_array(x, dtype=jnp.float16)
    return {"mode": "scalify-fp8" if scalified else "float32", "final_loss": loss,
            "test_accuracy": accuracy(jax.jit(apply)(params, x), y), "seconds": seconds}


def compare_float32_fp8(train: Callable, argv: Optional[Sequence[str]], doc: str,
                        default_steps: int = 300, quick_steps: int = 15) -> List[Dict[str, Any]]:
    """The digits examples' ``main``: ``train(scalified, steps)`` in float32 and with
    scalify, then the results table."""
    args = parse_steps(argv, doc, default=default_steps)
    steps = quick_steps if args.quick else args.steps
    results = [train(False, steps), train(True, steps)]
    print_results(results, "test_accuracy", "test acc")
    return results
