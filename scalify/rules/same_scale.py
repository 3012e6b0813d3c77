"""Rules that keep the scale: the primitive acts on the data alone.

Many primitives do not change the magnitude of any element: they move, copy, repeat or
select elements (``reshape``, ``transpose``, ``slice``...), pick an extreme one
(``reduce_max``), or flip its sign (``neg``, ``abs``). Since a scale is a positive
scalar, such a primitive commutes with it: ``f(data * scale) == f(data) * scale``, so
its rule applies the primitive to the data and keeps the scale, and the result is
bit-exact. `keep_scale` is that rule's body, shared by every family.
"""
from __future__ import annotations

from typing import Any

from scalify.core.datatype import ScaledArray
from scalify.core.deferred import Deferred
from scalify.core.operands import as_jax


def keep_scale(prim: Any, x: Any, /, *rest: Any, **params: Any) -> Any:
    """``prim`` applied to ``x.data`` (extra operands, e.g. dynamic shapes, passed on),
    at ``x.scale``.

    A `Deferred` operand (one of the kinds the rule is registered to take) stays
    deferred where its kind carries the primitive (`Deferred.map_layout`: an elementwise
    chain's float32 result keeps its pending rounding, a contraction its pending
    division), and is materialised where it does not."""
    if isinstance(x, Deferred):
        moved = x.map_layout(lambda d: prim.bind(d, *rest, **params))
        if moved is not None:
            return moved
        x = x.materialise()
    return ScaledArray(prim.bind(as_jax(x.data), *rest, **params), x.scale)
