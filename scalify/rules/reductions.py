"""Scaled rules of reduction primitives.

- ``reduce_sum`` measures its output's scale (the power of two of the sum's RMS) when
  N >= 16 elements are reduced, since a sum of correlated or positive terms grows like
  N, not sqrt(N); smaller reductions move ``pow2(sqrt(N))`` from data to scale (the
  sum of N independent unit-variance terms has variance N).
- ``reduce_max`` / ``reduce_min`` keep the scale (the scale is positive, so the extreme
  element of ``data`` is the extreme element of the value).
- ``reduce_prod`` multiplies the scale by itself N times.
- ``argmax`` / ``argmin`` run on the data and return plain integers.
- ``reduce_and`` / ``reduce_or`` / ``reduce_xor`` act on booleans and integers, never on
  a ScaledArray: they need no rule.

Every rule computes in float32 (or wider) and rounds once to the output dtype.
``reduce_sum``, ``reduce_max`` and ``reduce_min`` read an elementwise chain's float32
result (`scalify.core.wide.Wide`) unrounded: a measured sum of a product (a variance,
a gradient's sum over the batch) never measures the product's range.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.datatype import ScaledArray
from scalify.core.operands import (
    Wide, as_jax, cast, compute_dtype, deferring, format_bounds, needs_guard, saturating_cast, scale_dtype,
    scale_mul, wide_result,
)
from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.pow2 import pow2_floor_and_reciprocal, pow2_round, pow2_sqrt_down
from scalify.core.registry import register_scaled_op


def _num_reduced(shape: Sequence[int], axes: Sequence[int]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


# Reductions over at least this many elements measure their output scale (see
# `reduce_sum`); smaller ones, whose output is nearly as large as the input, keep the
# static rule so that measuring never costs a pass over a large tensor.
MEASURED_MIN_REDUCED = 16


@register_scaled_op(lax.reduce_sum_p, takes_deferred=(Wide,))
def reduce_sum(x: Any, *, axes: Sequence[int], **params: Any) -> Any:
    """Sum over ``axes`` (in float32, rounded once to the data dtype), with an output
    scale measured from the sum itself when N >= `MEASURED_MIN_REDUCED` elements are
    reduced, and ``x.scale * pow2(sqrt(N))`` otherwise.

    Why measured: the static rule is right for N independent zero-mean terms (standard
    deviation sqrt(N)), but the sums that models take are often of correlated or
    positive terms (a mean, a variance, a softmax denominator), whose size is up to N,
    not sqrt(N). Layer norm's statistics then carry data sqrt(N) too large, and their
    backward (``rsqrt(var)**3``) data N**1.5 too small: gradients drift below unit size
    block after block until float16 loses them. Measuring costs one reduction over the
    output, which is N times smaller than the input: ``m = pow2(rms(sum))``, data
    ``sum / m``, scale ``x.scale * m`` (``m`` is 0 when the sum is all zeros: the zero
    tensor; 1 when it is not finite, so that the output never gets an infinite scale). The data of a measured sum are
    independent of the input scale, so scale invariance holds.

    Deferred rounding: a `Wide` operand (an elementwise chain's float32 result, a
    product or a square say) is summed from its float32 data, unrounded and unguarded:
    a measured sum needs no range guard (its data are at most ``sqrt(size)`` times
    their RMS), so the operand's guard is never computed. A float16/float8 result is
    handed on in float32 (`Wide`). When the operand's data bounds could over- or
    underflow the float32 mean square of the sums, the sums are first divided by the
    power of two of their max-abs (exact: the same ``m``; one more reduction over the
    output only).
    """
    n = _num_reduced(x.shape, axes)
    measured = n >= MEASURED_MIN_REDUCED
    wide = isinstance(x, Wide)
    if wide and not (_fits_sum(x, n) and (measured or deferring(x.dtype))):
        x, wide = x.materialise(), False
    cd = compute_dtype(x.dtype)
    total = lax.reduce_sum_p.bind(cast(as_jax(x.data), cd), axes=tuple(axes), **params)
    if measured:
        normalised = wide and not _fits_mean_square(x, n, total.size)
        m, inv_m = _pow2_rms_normalised(total) if normalised else _pow2_rms(total)
        data = lax.mul(total, inv_m)
        if deferring(x.dtype):
            hi = int(np.ceil(np.log2(max(total.size, 1)) / 2)) + 1
            scale = scale_mul(x.scale, cast(m, scale_dtype()))
            return Wide(data, scale, x.dtype, False, hi, format_bounds(x.dtype)[1])
        return ScaledArray(saturating_cast(data, x.dtype), scale_mul(x.scale, cast(m, scale_dtype())))
    factor = pow2_round(np.sqrt(np.asarray(max(n, 1), scale_dtype())))
    if factor != 1:
        total = lax.mul(total, np.asarray(1 / factor, cd))
    if deferring(x.dtype):
        hi, lo = (x.hi, x.lo) if isinstance(x, Wide) else format_bounds(x.dtype)
        bounds = (hi + int(np.ceil(np.log2(max(n, 1)))), lo - int(np.log2(float(factor))))
        scale = scale_mul(x.scale, factor) if factor != 1 else x.scale
        return wide_result(total, scale, x.dtype, needs_guard(x), bounds)
    if factor != 1:
        return ScaledArray(saturating_cast(total, x.dtype), scale_mul(x.scale, factor))
    return ScaledArray(saturating_cast(total, x.dtype), x.scale)


def _fits_sum(x: Wide, n: int) -> bool:
    """Whether the float32 sums of ``n`` data of a `Wide` operand stay finite."""
    return x.hi + int(np.ceil(np.log2(max(n, 1)))) <= 120


def _fits_mean_square(x: Wide, n: int, size: int) -> bool:
    """Whether the mean square of ``size`` sums of ``n`` data of a `Wide` operand stays
    inside float32's normal range by its data bounds (see `Wide`)."""
    top = x.hi + int(np.ceil(np.log2(max(n, 1))))
    k = int(np.ceil(np.log2(max(size, 1))))
    return 2 * top + k <= 120 and 2 * x.lo - k >= -120


def _pow2_rms_normalised(total: Any) -> Tuple[Any, Any]:
    """`_pow2_rms` of ``total`` divided first by ``f``, the power of two of its max-abs
    (then multiplied back into ``m``): the same ``(m, 1 / m)`` for every ``total`` whose
    mean square is a normal float32, and the right one for totals whose squares would
    overflow or flush to zero. ``f = 1`` for an all-zero or non-finite ``total``."""
    t = lax.stop_gradient(total)
    a = lax.reduce_max(lax.abs(t), tuple(range(t.ndim)))
    f, inv_f = _max_pow2(a)
    m, inv = _pow2_rms(lax.mul(t, inv_f))
    return lax.mul(m, f), lax.mul(inv, inv_f)


@jax.jit
def _max_pow2(a: Any) -> Tuple[Any, Any]:
    """``(pow2_floor(a), its reciprocal)`` of a max-abs ``a`` (subnormal ``a`` read as
    the smallest normal), ``(1, 1)`` for 0, inf or NaN. One `jit` equation."""
    fi = jnp.finfo(a.dtype)
    ok = lax.bitwise_and(lax.gt(a, np.zeros((), a.dtype)), lax.le(a, np.asarray(fi.max, a.dtype)))
    f, inv = pow2_floor_and_reciprocal(lax.max(a, np.asarray(fi.tiny, a.dtype)))
    one_ = np.ones((), a.dtype)
    return lax.select(ok, f, one_), lax.select(ok, inv, one_)


def _pow2_rms(total: Any) -> Tuple[Any, Any]:
    """``(m, 1 / m)`` with ``m = pow2(rms(total))``, traced scalars of ``total``'s dtype
    (gradient stopped); ``m = 1`` when the mean square is zero, below the smallest
    normal number (an RMS under about 2**-63 in float32: pure cancellation noise, since
    the summed data are near unit size) or not finite.

    With the default DOWN rounding both are built from the exponent bits of the mean
    square ``v``: ``pow2_down(sqrt(v)) = 2**floor(floor(log2 v) / 2)``, exactly. Integer
    operations only, which XLA fuses into the consumers (a square root or a division
    would each be a kernel of their own). Other rounding modes take the square root."""
    t = lax.stop_gradient(total)
    v = lax.reduce_sum(lax.square(t), tuple(range(t.ndim)))
    v = lax.mul(v, np.asarray(1 / max(t.size, 1), v.dtype))  # the mean square
    if get_config().rounding_mode == Pow2RoundMode.DOWN:
        m, inv = _traced_rms_down(v)
    else:
        m = pow2_round(lax.sqrt(_normal_or_one(v)))
        inv = lax.div(np.ones((), v.dtype), m)
    # An all-zero sum is the zero tensor: scale 0, so that it never sets the scale of
    # what it is added to (its data, 0, is kept as it is: ``inv`` stays finite).
    return lax.select(lax.eq(v, np.zeros((), v.dtype)), np.zeros((), v.dtype), m), inv


def _normal_or_one(v: Any) -> Any:
    fi = jnp.finfo(v.dtype)
    ok = lax.bitwise_and(lax.ge(v, np.asarray(fi.tiny, v.dtype)), lax.le(v, np.asarray(fi.max, v.dtype)))
    return lax.select(ok, v, np.ones((), v.dtype))


@jax.jit
def _traced_rms_down(v: Any) -> Tuple[Any, Any]:
    """``(pow2_down(sqrt(v)), its reciprocal)`` of a mean square ``v`` from exponent
    bits; one `jit` equation whose ~20 scalar primitives are traced once per dtype."""
    return pow2_sqrt_down(_normal_or_one(v))


@register_scaled_op(lax.reduce_max_p, takes_deferred=(Wide,))
def reduce_max(x: Any, **params: Any) -> Any:
    """Max over the equation's axes of the data, same scale: exact, since the scale is
    positive (``max(d * s) == max(d) * s``). A `Wide` operand stays Wide (its float32
    data's max)."""
    if isinstance(x, Wide):
        return x.with_data(lax.reduce_max_p.bind(x.data, **params))
    return ScaledArray(lax.reduce_max_p.bind(as_jax(x.data), **params), x.scale)


@register_scaled_op(lax.reduce_min_p, takes_deferred=(Wide,))
def reduce_min(x: Any, **params: Any) -> Any:
    """Min over the equation's axes of the data, same scale (exact, see `reduce_max`;
    a `Wide` operand stays Wide)."""
    if isinstance(x, Wide):
        return x.with_data(lax.reduce_min_p.bind(x.data, **params))
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
    return ScaledArray(saturating_cast(prod, x.dtype), scale)


@register_scaled_op(lax.argmax_p)
def argmax(x: ScaledArray, **params: Any) -> Any:
    """Index of the largest element, found on the data: the scale is positive, so the
    order of the data is the order of the values. Returns a plain integer array."""
    return lax.argmax_p.bind(as_jax(x.data), **params)


@register_scaled_op(lax.argmin_p)
def argmin(x: ScaledArray, **params: Any) -> Any:
    """Index of the smallest element, found on the data (see `argmax`). Plain integers."""
    return lax.argmin_p.bind(as_jax(x.data), **params)
