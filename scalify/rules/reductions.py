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

import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.config import device_groups, get_config, narrow_contractions
from scalify.core.datatype import ScaledArray
from scalify.core.operands import (
    Wide, as_jax, cast, compute_dtype, deferring, fit_to_format, format_bounds, needs_guard, saturating_cast,
    scale_dtype, scale_mul, wide_result,
)
from scalify.core.pow2 import pow2_round
from scalify.core.registry import register_scaled_op
from scalify.core.rms import pow2_rms
from scalify.core.trace_state import data_factor
from scalify.rules.same_scale import keep_scale


def _num_reduced(shape: Sequence[int], axes: Sequence[int]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


@register_scaled_op(lax.reduce_sum_p, takes_deferred=(Wide,))
def reduce_sum(x: Any, *, axes: Sequence[int], **params: Any) -> Any:
    """Sum over ``axes`` (in float32, rounded once to the data dtype), with an output
    scale measured from the sum itself when N >= `ScalifyConfig.measured_min_reduced`
    (16) elements are reduced, and ``x.scale * pow2(sqrt(N))`` otherwise.

    Why measured: the static rule is right for N independent zero-mean terms (standard
    deviation sqrt(N)), but the sums that models take are often of correlated or
    positive terms (a mean, a variance, a softmax denominator), whose size is up to N,
    not sqrt(N). Layer norm's statistics then carry data sqrt(N) too large, and their
    backward (``rsqrt(var)**3``) data N**1.5 too small: gradients drift below unit size
    block after block until float16 loses them. Measuring costs one reduction over the
    output, which is N times smaller than the input: ``m = pow2(rms(sum))`` (`pow2_rms`), data
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

    With `ScalifyConfig.narrow_contractions` on (several devices), a measured sum of
    float16/bfloat16 data is a contraction with 16-bit output (`_sum_by_dot`), and a
    `Wide` operand of those dtypes whose chain needs no range guard is rounded first: the
    sum then crosses devices in 16 bits. A guarded chain (a product: a layer norm gain's
    gradient) is summed in float32 in groups along its first summed axis, one per
    device sharing it (`_group_sums`); only the group sums are rounded (range-guarded,
    a max-abs of a tensor the size of the result times the groups) and summed in 16
    bits, at the cost of one more float16 rounding.
    """
    n = _num_reduced(x.shape, axes)
    measured = n >= get_config().measured_min_reduced
    wide = isinstance(x, Wide)
    if wide and not (_fits_sum(x, n) and (measured or deferring(x.dtype))):
        x, wide = x.materialise(), False
    dot_axes, dot_n = tuple(axes), n
    if wide and measured and np.dtype(x.dtype) in _SUM_DOT and narrow_contractions():
        # Where devices share the sum, it crosses them in 16 bits (below). A chain that
        # needs no guard is rounded first; a guarded chain (a product: a layer norm's
        # gain gradient) is summed in float32 in groups along its first summed axis and
        # only the groups' sums are rounded (guarded: a max-abs of a tensor as small as
        # the result times the device count, not of the chain).
        if x.guard and get_config().range_guard:
            x, dot_axes, dot_n = _group_sums(x, tuple(sorted(axes)))
        else:
            x = x.materialise()
        wide = isinstance(x, Wide)
    cd = compute_dtype(x.dtype)
    if measured and not wide and np.dtype(x.dtype) in _SUM_DOT and narrow_contractions():
        # Summed by a contraction with a constant vector (see `_sum_by_dot`): a sum over a
        # dimension sharded across devices is then reduced across them in 16 bits.
        total, c = _sum_by_dot(as_jax(x.data), dot_axes, dot_n, params.get("out_sharding"))
        m, inv_m = pow2_rms(total, normalise=False)  # float16 sums: squares fit float32
        data = lax.mul(total, data_factor(inv_m))
        m = lax.mul(m, np.asarray(1 / c, m.dtype))  # exact: powers of two
    else:
        total = lax.reduce_sum_p.bind(cast(as_jax(x.data), cd), axes=tuple(axes), **params)
        if measured:
            m, inv_m = pow2_rms(total, normalise=wide and not _fits_mean_square(x, n, total.size))
            data = lax.mul(total, data_factor(inv_m))
    if measured:
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
        return wide_result(total, scale, x.dtype, needs_guard(x), bounds, (x,))
    if factor != 1:
        return ScaledArray(saturating_cast(total, x.dtype), scale_mul(x.scale, factor))
    return ScaledArray(saturating_cast(total, x.dtype), x.scale)


_SUM_DOT = (np.dtype(np.float16), np.dtype(jnp.bfloat16))


def _group_sums(x: Wide, axes: Tuple[int, ...]) -> Tuple[Any, Tuple[int, ...], int]:
    """``(sums, (a,), g)``: a guarded float32 chain ``x`` summed over ``axes`` except for
    ``g`` groups along the first summed axis ``a`` (`config.device_groups`: the groups
    a batch sharded across devices splits into), rounded once to ``x``'s dtype
    (range-guarded); the caller sums the ``g`` group sums over axis ``a`` by a 16-bit
    contraction. ``(x, axes, N)`` unchanged when ``g`` is 1 (the sum stays float32).

    Why: rounding the chain itself would need its max-abs, a pass over the whole chain;
    the group sums are ``N / g`` times smaller. Their one extra rounding (float16 keeps
    11 bits of each group sum) is the price of crossing devices in 16 bits."""
    a = axes[0]
    g = device_groups(x.shape[a])
    if g == 1:
        return x, axes, _num_reduced(x.shape, axes)
    d = as_jax(x.data)
    d = d.reshape(d.shape[:a] + (g, d.shape[a] // g) + d.shape[a + 1:])
    sums = lax.reduce_sum(d, (a + 1,) + tuple(b + 1 for b in axes[1:]))
    return fit_to_format(sums, x.scale, x.dtype), (a,), g


def _sum_by_dot(d: Any, axes: Tuple[int, ...], n: int, out_sharding: Any = None) -> Tuple[Any, float]:
    """``(c * sum(d over axes) in float32, c)``: the sum of 16-bit data ``d`` as a
    ``dot_general`` with a constant vector ``c``, float32 accumulation inside the dot and
    a 16-bit output (of ``d``'s dtype).

    Why: XLA's SPMD partitioner computes a sum over a sharded dimension (a bias or
    embedding gradient's sum over the batch, under data parallelism) as one partial sum
    per device, then all-reduces the partial results in the dtype the reduction
    outputs: a float32 ``reduce_sum`` moves twice the bytes of the same gradient in a
    bfloat16 program; a contraction's partial results move in its output dtype.

    Range: for float16 ``c = 2**-ceil(log2 n)``, so every partial sum, on any device and
    across them, is at most ``max|d| <= 65504`` (finite); the products ``d * c`` are
    formed inside the dot's float32 accumulation (exact). The rounding to float16 at the
    dot's output is the sum's one rounding (the measured normalisation that follows
    multiplies by a power of two); a sum ``2**24 / n`` below ``max|d|`` or further
    lands in float16's subnormals, whose absolute error is below the float16 rounding of
    the data's largest elements. bfloat16 has float32's range: ``c = 1``."""
    dt = np.dtype(d.dtype)
    k = int(np.ceil(np.log2(max(n, 1)))) if dt == np.dtype(np.float16) else 0
    c = 2.0**-k
    vec = jnp.full([d.shape[a] for a in axes], c, dt)
    dn = ((axes, tuple(range(len(axes)))), ((), ()))
    total = lax.dot_general(d, vec, dn, preferred_element_type=dt, out_sharding=out_sharding)
    return cast(total, np.float32), c


def _fits_sum(x: Wide, n: int) -> bool:
    """Whether the float32 sums of ``n`` data of a `Wide` operand stay finite."""
    return x.hi + int(np.ceil(np.log2(max(n, 1)))) <= 120


def _fits_mean_square(x: Wide, n: int, size: int) -> bool:
    """Whether the mean square of ``size`` sums of ``n`` data of a `Wide` operand stays
    inside float32's normal range by its data bounds (see `Wide`)."""
    top = x.hi + int(np.ceil(np.log2(max(n, 1))))
    k = int(np.ceil(np.log2(max(size, 1))))
    return 2 * top + k <= 120 and 2 * x.lo - k >= -120


@register_scaled_op(lax.reduce_max_p, takes_deferred=(Wide,))
def reduce_max(x: Any, **params: Any) -> Any:
    """Max over the equation's axes of the data, same scale: exact, since the scale is
    positive (``max(d * s) == max(d) * s``). A `Wide` operand stays Wide (its float32
    data's max)."""
    return keep_scale(lax.reduce_max_p, x, **params)


@register_scaled_op(lax.reduce_min_p, takes_deferred=(Wide,))
def reduce_min(x: Any, **params: Any) -> Any:
    """Min over the equation's axes of the data, same scale (exact, see `reduce_max`;
    a `Wide` operand stays Wide)."""
    return keep_scale(lax.reduce_min_p, x, **params)


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
