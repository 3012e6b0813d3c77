"""The rule registry: one scaled rule per JAX primitive.

A rule is a function ``rule(*operands, **params)`` registered for one primitive. Each
operand is a `ScaledArray` or a plain array (at least one is a ScaledArray when the
interpreter calls the rule); ``params`` are the jaxpr equation's parameters, which a rule
should accept with ``**params`` and pass on when it re-binds the primitive, so that new
JAX releases adding parameters do not break it. A rule returns a ScaledArray or a plain
array (a list of them for multiple-result primitives).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from jax.extend.core import Primitive

_RULES: Dict[Primitive, Callable[..., Any]] = {}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive without a scaled rule received a ScaledArray."""


def register_scaled_op(*prims: Primitive) -> Callable[[Callable], Callable]:
    """Decorator registering ``rule`` as the scaled rule of each primitive in ``prims``::

        @register_scaled_op(lax.add_p)
        def add(x, y, **params): ...
    """
    for p in prims:
        if not isinstance(p, Primitive):
            raise TypeError(f"register_scaled_op expects JAX primitives, got {p!r}.")

    def decorator(rule: Callable) -> Callable:
        for p in prims:
            _RULES[p] = rule
        return rule

    return decorator


def get_scaled_rule(prim: Primitive) -> Optional[Callable[..., Any]]:
    """The registered rule of ``prim``, or None."""
    return _RULES.get(prim)


def registered_primitives() -> Dict[Primitive, Callable[..., Any]]:
    """A copy of the registry: primitive -> rule."""
    return dict(_RULES)
