"""Scaling primitives a user can call: get_data_scale, set_scaling, stop_scaling, rebalance.

They work inside `scalify` (as JAX primitives with scaled rules) and outside it, on
ScaledArrays and on plain arrays, eagerly and under `jax.jit`, `jax.grad`, `jax.vmap`.
"""
from scalify.lax.scaling import (  # noqa: F401
    get_data_scale,
    get_data_scale_p,
    rebalance,
    rebalance_p,
    set_scaling,
    set_scaling_p,
    stop_scaling,
    stop_scaling_p,
)

__all__ = [
    "get_data_scale",
    "set_scaling",
    "stop_scaling",
    "rebalance",
    "get_data_scale_p",
    "set_scaling_p",
    "stop_scaling_p",
    "rebalance_p",
]
