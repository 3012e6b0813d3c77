"""The range guard: data that a static scale estimate let leave a narrow format.

Most rules choose their output scale statically (unit scaling: the scale a unit-variance
input would give), which is free and exact as long as the estimate is right to within
the data format's range. float32 has 254 binades of range and never notices an estimate
that is off; float16 has 40 and float8 E4M3 about 18, so rules whose estimate can be off
by that much (products, powers, quotients, unbounded functions, contractions) pass their
result through `fit_to_format`: the max-abs of the data is measured, and outside a safe
band (`guard_band`) a power of two moves from the data into the scale, exactly.
`ScalifyConfig(range_guard=False)` keeps the static estimates only.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray, compute_dtype
from scalify.core.formats import is_narrow, saturating_cast
from scalify.core.pow2 import is_static
from scalify.core.scale_math import scale_product, times_residual
from scalify.core.static import as_jax, cast
from scalify.core.trace_state import data_factor


def guard_band(dtype: Any) -> Tuple[float, float, int]:
    """``(lo, hi, t)`` of the guard of ``dtype``: data whose max-abs lies in ``[lo, hi]``
    keeps its static scale; other data is rescaled to a max-abs in ``[2**t, 2**(t+1))``.

    ``hi`` is 16x below the format's largest power of two (float16: 2**11), so that the
    bounded growth of the rules that are not guarded (a sum doubles at most, a constant
    factor is below 2) never reaches the top; ``lo = 2**-4`` keeps unit-variance data
    (max-abs 2-5) untouched while data drifting towards the subnormals is lifted; the
    target ``2**t`` (float16: 8) is the max-abs of unit-variance data."""
    dtype = np.dtype(dtype)
    top = int(jnp.finfo(dtype).maxexp) - 1  # exponent of the largest power of two
    t = min(3, top - 5)
    return 2.0**-4, 2.0 ** (top - 4), t


def fit_to_format(data: Any, scale: Any, dtype: Any, spread: bool = False, band: Any = None) -> ScaledArray:
    """``ScaledArray(data cast to dtype, scale)``, range-guarded for narrow formats.

    ``data`` is a rule's result in the compute dtype (float32) at the rule's static
    ``scale``. For a narrow ``dtype`` (`is_narrow`) with `ScalifyConfig.range_guard`
    on, the max-abs ``a`` of ``data`` is measured (one reduction, no gradient): inside
    the band ``[lo, hi]`` of `guard_band` nothing changes; outside it the power of two
    ``m = pow2_floor(a) / 2**t`` moves from the data into the scale (exact), so the data
    is finite whenever its float32 value is and inside the scale range. An all-zero
    result gets scale 0 (the zero tensor); inf/NaN data keep the static scale (they stay
    visible). Wide formats (bfloat16, float32) are cast as they are.

    With ``spread`` the max-abs is always moved to ``[hi/2, hi)``, the top of the band:
    for results that gather elements of operands at very different scales (a selection),
    whose small elements need all the format's range below the largest.

    ``band`` (default ``dtype``) is the narrow format whose band applies when it is not
    ``dtype``: a float32 result that is to be guarded as if it were float16 (a `Wide`
    value converted to float32 before its guard: see `Wide`).
    """
    dtype = np.dtype(dtype)
    band = dtype if band is None else np.dtype(band)
    if not (is_narrow(band) and get_config().range_guard) or np.ndim(data) == 0 and is_static(data):
        return ScaledArray(saturating_cast(as_jax(data), dtype), scale)
    data = as_jax(data)
    cd = compute_dtype(dtype)
    data = cast(data, cd)
    lo, hi, t = guard_band(band)
    if spread:
        t = int(np.log2(hi)) - 1
        lo = hi = 0.0  # no band: always rescaled
    out, s = _moved(data, scale, lo, hi, t)
    return ScaledArray(saturating_cast(out, dtype), s)


def _moved(data: Any, scale: Any, lo: float, hi: float, t: int) -> Tuple[Any, Any]:
    """``(data, scale)`` with the power of two `_guard_factor` picks for the data's
    max-abs (one reduction, no gradient) moved from the data into the scale, exactly;
    the data stay in their dtype."""
    a = jax.lax.stop_gradient(jax.lax.reduce_max(jax.lax.abs(data), tuple(range(data.ndim))))
    a = cast(a, np.float32)
    m, inv = _guard_factor(a, np.float32(lo), np.float32(hi), t)
    if not is_static(scale):
        m = cast(m, scale.dtype)
    s, r = scale_product(scale, m)
    return times_residual(jax.lax.mul(data, cast(data_factor(inv), data.dtype)), r), s


def recentre(data: Any, scale: Any) -> Tuple[Any, Any]:
    """``(data, scale)`` of the same value with the power of two of the data's max-abs
    moved into the scale (exact): the data's max-abs then lies in ``[1, 2)``; the data
    stay in their dtype (float32 for a `Wide` value). All-zero data get scale 0, inf/NaN
    data keep theirs. One max-abs reduction, no gradient.

    Why: a value whose scale may lie far above all of its elements (a selection among
    operands of distinct scales that took the smaller operand everywhere) would start a
    float32 chain far from unit size, where products underflow."""
    return _moved(as_jax(data), scale, 0.0, 0.0, 0)


@functools.partial(jax.jit, static_argnums=3)
def _guard_factor(a: Any, lo: Any, hi: Any, t: int) -> Tuple[Any, Any]:
    """``(m, 1/m)``: the power of two the guard moves from data to scale for a max-abs
    ``a`` (1 inside ``[lo, hi]`` or for inf/NaN; 0 for ``a == 0``, with ``1/m = 1``).
    One `jit` equation traced once, from exponent bits (exact, no division)."""
    from scalify.core.pow2 import exp2_int, exponent

    lax = jax.lax
    one_ = np.float32(1)
    k = lax.sub(exponent(a), np.int32(t))
    k = lax.clamp(np.int32(-125), k, np.int32(125))
    keep = lax.bitwise_or(lax.bitwise_and(lax.ge(a, lo), lax.le(a, hi)), lax.ne(a, a))
    keep = lax.bitwise_or(keep, lax.eq(a, np.float32(np.inf)))
    m = lax.select(keep, one_, exp2_int(k, np.float32))
    inv = lax.select(keep, one_, exp2_int(lax.neg(k), np.float32))
    zero = lax.eq(a, np.float32(0))
    return lax.select(zero, np.float32(0), m), lax.select(zero, one_, inv)
