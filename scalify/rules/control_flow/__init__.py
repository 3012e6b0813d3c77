"""Scaled rules of control-flow and call primitives.

These rules interpret a primitive's sub-jaxpr(s) with the scaled rules and rebuild the
same control flow around the result with public JAX API (``jax.jit``, ``lax.scan``,
``lax.while_loop``, ``lax.switch``, ``jax.custom_vjp``/``custom_jvp``) or by binding the
primitive again on the scalified jaxpr (``remat``). One module per family:

- `leaves`: how a ScaledArray crosses a JAX transform (its ``data`` and ``scale``
  leaves; static leaves closed over so that they stay static);
- `fixpoint`: which loop carries and branch outputs are scaled;
- `loops`: ``scan`` and ``while`` carry ``(data, scale)``; per-step scales of stacked
  outputs (`PerStepScaled`);
- `cond`: ``cond``/``switch`` over scalified branches;
- `calls`: nested ``jit`` (cached), ``closed_call``, ``remat``, ``checkpoint_name``;
- `custom_derivatives`: ``custom_jvp``/``custom_vjp`` keep the user's rule.

Importing the package registers every rule.
"""
from scalify.rules.control_flow.calls import checkpoint_name, closed_call, core_call, jit, remat
from scalify.rules.control_flow.cond import cond
from scalify.rules.control_flow.custom_derivatives import custom_jvp_call, custom_vjp_call
from scalify.rules.control_flow.loops import PerStepScaled, scan, while_loop

__all__ = [
    "PerStepScaled",
    "checkpoint_name",
    "closed_call",
    "cond",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "jit",
    "remat",
    "scan",
    "while_loop",
]
