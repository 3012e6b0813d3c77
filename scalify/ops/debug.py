"""Debug callbacks that see data and scale inside `scalify`.

``debug_callback(f, *args)`` calls ``f(*args)`` at run time through `jax.debug.callback`
and returns ``args``. Inside `scalify` the function is traced with plain tracers, so the
callback's equation meets the ScaledArrays only when scalify interprets it: the scaled
rule registered here for JAX's ``debug_callback`` primitive passes ScaledArray operands
to the callback whole, so ``f`` receives ``ScaledArray(data, scale)`` and sees both.
(The same rule makes a user's own `jax.debug.callback` inside `scalify` receive
ScaledArrays.) `jax.debug.print` inside `scalify` prints values (``data * scale``), as
its format specs expect numbers; `debug_print` prints the ScaledArray.

The ``_grad`` variants call ``f`` on the gradients of ``args`` (identity on the forward
pass); under `jax.grad` inside `scalify` these gradients are ScaledArrays too.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from scalify.core.datatype import ScaledArray
from scalify.core.operands import as_jax
from scalify.core.registry import register_scaled_op
from scalify.ops._backward import map_on_backward_p

__all__ = ["debug_callback", "debug_callback_grad", "debug_print", "debug_print_grad"]


def _primitive_of(fn: Callable[[Any], None]) -> Any:
    """The primitive a JAX debug function binds, found by tracing it (public API only).
    Traced on an abstract value: importing scalify must not start a backend (a later
    ``jax.distributed.initialize`` would refuse to run)."""
    jaxpr = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((), jnp.float32)).jaxpr
    return jaxpr.eqns[0].primitive


_DEBUG_CALLBACK_P = _primitive_of(lambda x: jax.debug.callback(lambda v: None, x))
_DEBUG_PRINT_P = _primitive_of(lambda x: jax.debug.print("{}", x))


class _Unflattened:
    """A flat callback given ScaledArray operands back as ScaledArrays (hashable)."""


    def __init__(self, callback: Callable, tree: Any):
        self.callback = callback
        self.tree = tree

    def __call__(self, *leaves: Any) -> Any:
        return self.callback(*jax.tree.unflatten(self.tree, leaves))

    def __hash__(self) -> int:
        return hash((self.callback, self.tree))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Unflattened) and (other.callback, other.tree) == (self.callback, self.tree)


@register_scaled_op(_DEBUG_CALLBACK_P)
def _debug_callback_rule(*operands: Any, callback: Callable, **params: Any) -> Any:
    """The callback receives each ScaledArray operand whole (data and scale, unchanged:
    no scaling choice here). The primitive is re-bound on the flattened data and
    scales, with its effect and other parameters kept."""
    leaves, tree = jax.tree.flatten(list(operands))
    leaves = [as_jax(x) for x in leaves]
    return _DEBUG_CALLBACK_P.bind(*leaves, callback=_Unflattened(callback, tree), **params)


if _DEBUG_PRINT_P is not _DEBUG_CALLBACK_P:

    @register_scaled_op(_DEBUG_PRINT_P)
    def _debug_print_rule(*operands: Any, **params: Any) -> Any:
        """`jax.debug.print` of a ScaledArray prints its value ``data * scale`` (in the
        data dtype, computed in float32): format specs such as ``{x:.3f}`` need numbers."""
        values = [x.to_array() if isinstance(x, ScaledArray) else as_jax(x) for x in operands]
        return _DEBUG_PRINT_P.bind(*values, **params)


def debug_callback(callback: Callable[..., Any], *args: Any) -> tuple:
    """Call ``callback(*args)`` at run time (eagerly, under `jit`, inside `scalify`) and
    return ``args``. ScaledArrays reach the callback as ScaledArrays, inside `scalify`
    too (with concrete ``data`` and ``scale``)."""
    jax.debug.callback(callback, *args)
    return args


class _Print:

    def __init__(self, fmt: str):
        self.fmt = fmt

    def __call__(self, *args: Any) -> None:
        print(self.fmt.format(*args))

    def __hash__(self) -> int:
        return hash(self.fmt)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Print) and other.fmt == self.fmt


def debug_print(fmt: str, *args: Any) -> tuple:
    """Print ``fmt.format(*args)`` at run time and return ``args``; a ScaledArray prints
    as ``ScaledArray(data=..., scale=...)``."""
    return debug_callback(_Print(fmt), *args)


class _CallbackOnCotangents:
    """Backward function of `debug_callback_grad`: call back on the cotangents."""


    def __init__(self, callback: Callable, tree: Any):
        self.callback = callback
        self.tree = tree

    def __call__(self, cts: Sequence[Any]) -> list:
        jax.debug.callback(self.callback, *jax.tree.unflatten(self.tree, list(cts)))
        return list(cts)

    def __hash__(self) -> int:
        return hash((self.callback, self.tree))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _CallbackOnCotangents) and (other.callback, other.tree) == (
            self.callback,
            self.tree,
        )


def debug_callback_grad(callback: Callable[..., Any], *args: Any) -> tuple:
    """Return ``args``; on the backward pass call ``callback`` on their gradients (one
    per argument, in order; ScaledArrays inside `scalify`)."""
    leaves, tree = jax.tree.flatten(list(args))
    if not leaves:
        return args
    leaves = [x if hasattr(x, "dtype") else jnp.asarray(x) for x in leaves]
    out = map_on_backward_p.bind(*leaves, fn=_CallbackOnCotangents(callback, tree))
    return tuple(jax.tree.unflatten(tree, out))


def debug_print_grad(fmt: str, *args: Any) -> tuple:
    """Return ``args``; on the backward pass print ``fmt.format(*gradients)``."""
    return debug_callback_grad(_Print(fmt), *args)

