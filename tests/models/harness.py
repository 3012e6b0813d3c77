"""Compare one training step under `jax.jit(scalify(step))` with the plain float32 step.

Only the inputs and parameters are converted (`as_scaled_array`, dtype cast); the model
code, the loss and the optax optimizer are unmodified.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scalify as sfy


def to_scaled(tree: Any, dtype: Any) -> Any:
    """Float leaves as unit-scaled ScaledArrays with ``dtype`` data."""
    return sfy.as_scaled_array(tree, dtype=dtype)


def f32(tree: Any) -> Any:
    return sfy.asarray(tree, dtype=jnp.float32)


def rel_err(got: Any, want: Any) -> float:
    """Relative L2 error over a whole pytree."""
    g = jax.tree.leaves(f32(got))
    w = jax.tree.leaves(want)
    num = sum(float(jnp.sum((a.astype(jnp.float32) - b) ** 2)) for a, b in zip(g, w))
    den = sum(float(jnp.sum(b.astype(jnp.float32) ** 2)) for b in w)
    return float(np.sqrt(num / max(den, 1e-30)))


def adam_step(loss_fn: Callable, lr: float = 1e-3) -> tuple:
    """A training step ``(params, opt_state, *batch) -> (params, opt_state, loss, grads)``
    with ``loss_fn(params, *batch) -> (loss, aux)``."""
    # eps=1e-5 rather than 1e-8: parameters whose gradient is zero in exact arithmetic
    # (a conv bias before BatchNorm) would otherwise take a full step on rounding noise,
    # in float32 as much as under scalify.
    opt = optax.adam(lr, eps=1e-5)

    def step(params, opt_state, *batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        # Mixed precision as usual: the optimizer sees float32 gradients (a no-op for the
        # float32 reference). In float16, Adam's g**2 underflows whether scaled or not.
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads, aux

    return opt, step


def check_training_step(loss_fn: Callable, params: Any, batch: tuple, dtype: Any,
                        grad_tol: float, lr: float = 1e-3) -> dict:
    """Run the plain float32 step and the scalified step with ``dtype`` data; assert loss,
    gradients and updated parameters agree. Returns the scalified outputs."""
    opt, step = adam_step(loss_fn, lr)
    state = opt.init(params)
    ref = jax.jit(step)(params, state, *batch)

    # The model's parameters and inputs hold ``dtype`` data; the optax state stays
    # float32 (scaled): a float16 optax state is what `scalify.optim.scaled_state` is
    # for (plain Adam's second moment underflows float16, scaled or not).
    sparams, sstate = to_scaled(params, dtype), to_scaled(state, jnp.float32)
    sbatch = tuple(to_scaled(b, dtype) for b in batch)
    out = jax.jit(sfy.scalify(step))(sparams, sstate, *sbatch)

    new_params, new_state, loss, grads, aux = out
    # The parameters the model sees are the scaled ones, sent through the same step.
    assert isinstance(jax.tree.leaves(new_params, is_leaf=sfy.core.is_scaled_leaf)[0], sfy.ScaledArray)
    np.testing.assert_allclose(float(f32(loss)), float(ref[2]), rtol=grad_tol)
    assert rel_err(grads, ref[3]) < grad_tol, rel_err(grads, ref[3])
    # Adam's first step moves each weight by about lr * sign(g): elements whose gradient
    # is near zero may flip sign in float16, so compare the whole update in L2.
    upd = jax.tree.map(lambda a, b: a - b, f32(new_params), params)
    ref_upd = jax.tree.map(lambda a, b: a - b, ref[0], params)
    assert rel_err(upd, ref_upd) < 4 * grad_tol, rel_err(upd, ref_upd)
    for leaf in jax.tree.leaves(f32((new_params, new_state, loss, grads))):
        assert np.all(np.isfinite(np.asarray(leaf)))
    return {"params": new_params, "state": new_state, "loss": loss, "grads": grads, "aux": aux, "ref": ref}
