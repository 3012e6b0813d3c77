"""Scaled rules of reduction primitives.

- ``reduce_sum`` moves ``pow2(sqrt(N))`` (N reduced elements) from data to scale: the
  sum of N independent unit-variance terms has variance N (unit scaling).
- ``reduce_max`` / ``reduce_min`` keep the scale (the scale is positive, so the extreme
  element of ``data`` is the extreme element of the value).
- ``reduce_prod`` multiplies the scale by itself N times.
- ``argmax`` / ``argmin`` run on the data and return plain integers.
- ``reduce_and`` / ``reduce_or`` / ``reduce_xor`` act on booleans and integers, never on
  a ScaledArray: they need no rule.

Every rule computes in float32 (or wider) and rounds once to the output dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.datatype import ScaledArray
from scalify.core.operands import as_jax, compute_dtype, scale_dtype
from scalify.core.pow2 import pow2_round
from scalify.core.registry import register_scaled_op


def _num_reduced(shape: Sequence[int], axes: Sequence[int]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def _cast(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``, saturating to the format's largest finite value for float8
    formats (E4M3FN has no infinity: an overflowing cast would give NaN)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1:
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -big, big)
    return x.astype(dtype)


@register_scaled_op(lax.reduce_sum_p)
def reduce_sum(x: ScaledArray, *, axes: Sequence[int], **params: Any) -> ScaledArray:
    """Sum over ``axes``; ``pow2(sqrt(N))`` moves from the data into the scale.

    ``data = sum(x.data) / pow2(sqrt(N))`` (summed in float32, then rounded once to the
    data dtype) and ``scale = x.scale * pow2(sqrt(N))``, N being the number of reduced
    elements. For N independent unit-variance terms the sum has standard deviation
    sqrt(N), so the data stays near unit variance; a sum of N equal terms (a mean's
    numerator) has data sqrt(N) times larger than its input, still far inside the range
    of float16 for any realistic N. pow2 rounding keeps the rescaling exact. N <= 1
    (a reduction over no or unit axes) leaves the scale unchanged.
    """
    n = _num_reduced(x.shape, axes)
    factor = pow2_round(np.sqrt(np.asarray(max(n, 1), scale_dtype())))
    cd = compute_dtype(x.dtype)
    total = lax.reduce_sum_p.bind(as_jax(x.data).astype(cd), axes=tuple(axes), **params)
    if factor != 1:
        total = total * np.asarray(1 / factor, cd)
    return ScaledArray(_cast(total, x.dtype), x.scale * factor)


@register_scaled_op(lax.reduce_max_p)
def reduce_max(x: ScaledArray, **params: Any) -> ScaledArray:
    """Max over the equation's axes of the data, same scale: exact, since the scale is
    positive (``max(d * s) == max(d) * s``)."""
    return ScaledArray(lax.reduce_max_p.bind(as_jax(x.data), **params), x.scale)


@register_scaled_op(lax.reduce_min_p)
def reduce_min(x: ScaledArray, **params: Any) -> ScaledArray:
    """Min over the equation's axes of the data, same scale (exact, see `reduce_max`)."""
    return ScaledArray(lax.reduce_min_p.bind(as_jax(x.data), **params), x.scale)


@register_scaled_op(lax.reduce_prod_p)
def reduce_prod(x: ScaledArray, *, axes: Sequence[int], **params: Any) -> ScaledArray:
    """Product over ``axes``: ``data = prod(x.data)`` (in float32, rounded once),
    ``scale = x.scale ** N`` (N reduced elements; exact for a power-of-two scale).

    The choice keeps the rule a pure rescaling with no data-dependent scale. Its limits:
    the output scale must be a float32 number, so ``N * |log2(x.scale)|`` must stay
    below about 126 (a product of 3 values at scale 2^60 is out of range of any float32
    scale); and the product of the data must fit the data format (unit-variance data:
    the product's magnitude drifts like a random walk in log space, so long products of
    float16 data may underflow or overflow). Rescale the input (e.g. to data near 1)
    before long products.
    """
    n = _num_reduced(x.shape, axes)
    cd = compute_dtype(x.dtype)
    prod = lax.reduce_prod_p.bind(as_jax(x.data).astype(cd), axes=tuple(axes), **params)
    scale = x.scale**n if n != 1 else x.scale
    return ScaledArray(_cast(prod, x.dtype), scale)


@register_scaled_op(lax.argmax_p)
def argmax(x: ScaledArray, **params: Any) -> Any:
    """Index of the largest element, found on the data: the scale is positive, so the
    order of the data is the order of the values. Returns a plain integer array."""
    return lax.argmax_p.bind(as_jax(x.data), **params)


@register_scaled_op(lax.argmin_p)
def argmin(x: ScaledArray, **params: Any) -> Any:
    """Index of the smallest element, found on the data (see `argmax`). Plain integers."""
    return lax.argmin_p.bind(as_jax(x.data), **params)
