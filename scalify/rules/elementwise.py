"""Scaled rules of elementwise primitives.

Arithmetic combines scales exactly (add/sub: ``pow2(sqrt(sx**2 + sy**2))``, mul:
``sx * sy``, div: ``sx / sy``); non-linear functions compute on the unscaled value in
float32 and return data at a fresh scale. Every rule computes in float32 (or wider) and
rounds once to the output dtype.
"""
from __future__ import annotations

from typing import Any

from jax import lax

from scalify.core.datatype import ScaledArray
from scalify.core.operands import hypot_scale, in_scale, out_dtype, scale_of
from scalify.core.registry import register_scaled_op


@register_scaled_op(lax.add_p)
def add(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``x + y`` at scale ``pow2(sqrt(sx**2 + sy**2))``: the sum of two independent
    unit-variance terms has variance 2, so data stays near unit variance. A scale-free
    constant (``x + 0``) keeps the other operand's scale."""
    s = hypot_scale(scale_of(x), scale_of(y))
    return ScaledArray((in_scale(x, s) + in_scale(y, s)).astype(out_dtype(x, y)), s)


@register_scaled_op(lax.sub_p)
def sub(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``x - y``, scaled as `add`."""
    s = hypot_scale(scale_of(x), scale_of(y))
    return ScaledArray((in_scale(x, s) - in_scale(y, s)).astype(out_dtype(x, y)), s)
