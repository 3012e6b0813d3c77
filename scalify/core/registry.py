"""The rule registry: one scaled rule per JAX primitive.

A rule is a function ``rule(*operands, **params)`` registered for one primitive. Each
operand is a `ScaledArray` or a plain array (at least one is a ScaledArray when the
interpreter calls the rule); ``params`` are the jaxpr equation's parameters, which a rule
should accept with ``**params`` and pass on when it re-binds the primitive, so that new
JAX releases adding parameters do not break it. A rule returns a ScaledArray or a plain
array (a list of them for multiple-result primitives), or a `Deferred` value
(`scalify.core.deferred`) that the interpreter materialises as a ScaledArray for every
rule not registered ``takes_deferred`` for its kind.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

from jax.extend.core import Primitive

from scalify.core.deferred import Deferred  # re-exported: rules imported it from here

__all__ = [
    "Deferred", "UnsupportedPrimitiveError", "argument_checks", "deferred_kinds",
    "get_scaled_rule", "get_static_impl", "is_always_scaled", "register_argument_check",
    "register_scaled_op", "register_static_impl", "registered_primitives", "takes_deferred",
]

_RULES: Dict[Primitive, Callable[..., Any]] = {}
# Primitives whose rule runs even when no operand is a ScaledArray (e.g. `set_scaling`,
# which turns a plain array into a ScaledArray inside scalify).
_ALWAYS_SCALED: set = set()
# Primitives whose rule takes `Deferred` operands as they are, with the kinds it takes
# (see `register_scaled_op`).
_TAKES_DEFERRED: Dict[Primitive, Tuple[type, ...]] = {}
# NumPy evaluators used to fold equations whose operands are all static (see
# `register_static_impl`).
_STATIC_IMPLS: Dict[Primitive, Callable[..., Any]] = {}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive without a scaled rule received a ScaledArray."""


def register_scaled_op(
    *prims: Primitive, always_scaled: bool = False,
    takes_deferred: Union[bool, Tuple[type, ...]] = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``rule`` as the scaled rule of each primitive in ``prims``::

        @register_scaled_op(lax.add_p)
        def add(x, y, **params): ...

    With ``always_scaled=True`` the interpreter calls the rule even when every operand
    is plain (the rule then decides whether its output is a ScaledArray). With
    ``takes_deferred=True`` it hands the rule `Deferred` operands of every kind as they
    are (the rule reads them through the protocol of `scalify.core.deferred`, so a kind
    added later needs no edit to it), and with a tuple of `Deferred` subclasses those
    kinds only (for a rule whose arithmetic is specific to them); every other rule (and
    kind) gets them materialised.
    """
    kinds = (Deferred,) if takes_deferred is True else tuple(takes_deferred or ())
    for p in prims:
        if not isinstance(p, Primitive):
            raise TypeError(f"register_scaled_op expects JAX primitives, got {p!r}.")

    def decorator(rule: Callable) -> Callable:
        for p in prims:
            _RULES[p] = rule
            if always_scaled:
                _ALWAYS_SCALED.add(p)
            else:
                _ALWAYS_SCALED.discard(p)
            if kinds:
                _TAKES_DEFERRED[p] = kinds
            else:
                _TAKES_DEFERRED.pop(p, None)
        return rule

    return decorator


def get_scaled_rule(prim: Primitive) -> Optional[Callable[..., Any]]:
    """The registered rule of ``prim``, or None. Called directly, a rule may return a
    `Deferred` value: its ``materialise()`` is the ScaledArray."""
    return _RULES.get(prim)


def is_always_scaled(prim: Primitive) -> bool:
    """True when ``prim``'s rule runs even on plain operands (``always_scaled=True``)."""
    return prim in _ALWAYS_SCALED


def takes_deferred(prim: Primitive) -> bool:
    """True when ``prim``'s rule takes `Deferred` operands of some kind
    (``takes_deferred``)."""
    return prim in _TAKES_DEFERRED


def deferred_kinds(prim: Primitive) -> Tuple[type, ...]:
    """The `Deferred` kinds ``prim``'s rule takes as they are (empty: none)."""
    return _TAKES_DEFERRED.get(prim, ())


def registered_primitives() -> Dict[Primitive, Callable[..., Any]]:
    """A copy of the registry: primitive -> rule."""
    return dict(_RULES)


def register_static_impl(*prims: Primitive) -> Callable[[Callable], Callable]:
    """Decorator registering ``impl(*operands, **params)`` as the trace-time evaluator of
    each primitive in ``prims``: when every operand of an equation is a static NumPy
    value, the interpreter calls it instead of running the primitive through XLA (which
    compiles a small program per primitive and shape: tens of milliseconds each). It
    returns NumPy value(s) of the equation's result, or ``NotImplemented`` to fall back to
    XLA for operands it does not handle."""

    def decorator(impl: Callable) -> Callable:
        for p in prims:
            _STATIC_IMPLS[p] = impl
        return impl

    return decorator


def get_static_impl(prim: Primitive) -> Optional[Callable[..., Any]]:
    """The registered trace-time evaluator of ``prim``, or None."""
    return _STATIC_IMPLS.get(prim)


_ARGUMENT_CHECKS: list = []


def register_argument_check(check: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Register ``check(args, kwargs)``, called by `scalify` on the arguments of every
    scalified call before tracing, to refuse inputs that no rule can handle correctly
    with a clear error (e.g. `scalify.optim` refuses optax state whose update would be
    computed in float16). Returns ``check``."""
    _ARGUMENT_CHECKS.append(check)
    return check


def argument_checks() -> list:
    """The registered argument checks (see `register_argument_check`)."""
    return list(_ARGUMENT_CHECKS)
