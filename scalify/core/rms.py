"""The power of two of a tensor's root-mean-square: how scalify measures a tensor's size.

Unit scaling wants data of unit variance, so wherever scalify *measures* a scale rather
than deriving it statically, it measures the RMS and keeps its power of two: a fresh
ScaledArray (`scalify.core.datatype.unit_scale`), a measured sum (`reduce_sum`), a
user's ``dynamic_rescale_l2`` (`scalify.lax.scaling.rescale_by_norm`). `pow2_rms` is
that one measurement, with the same answers everywhere for the cases that need care:

- **all zeros** give 0: the zero tensor carries no magnitude (scale 0, see
  `scalify.core.operands`);
- a mean square that is not finite (inf/NaN data) or below the smallest normal number
  gives 1: no scale is ever infinite, NaN or subnormal;
- with ``normalise``, the data are first divided by the power of two of their max-abs
  (exact), so that squares of values near ``1e-24`` or ``1e24`` neither underflow nor
  overflow in float32.

With DOWN rounding (the default mode) the power of two comes from the exponent bits of
the mean square ``v``: ``pow2_down(sqrt(v)) = 2**floor(floor(log2 v) / 2)``, exactly,
with integer operations only, which XLA fuses into the consumers (a square root or a
division would each be a kernel of their own). Other modes take the square root.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.pow2 import pow2_floor_and_reciprocal, pow2_round, pow2_sqrt_down


def pow2_rms(x: Any, *, normalise: bool = True, mode: Optional[Pow2RoundMode] = None) -> Tuple[Any, Any]:
    """``(m, 1 / m)`` with ``m = pow2(rms(x))``, traced scalars of ``x``'s dtype, no
    gradient.

    ``m`` is 0 for all-zero ``x`` (with ``1 / m`` left at 1, so that multiplying the
    zero data by it keeps them 0) and 1 (both) when the mean square is not finite or
    is below the smallest normal number. ``normalise`` divides ``x`` by the power of
    two of its max-abs first (one more reduction), for data whose squares could leave
    the float range; without it, an RMS under about ``2**-63`` in float32 reads as 1.
    ``mode`` is the rounding to a power of two (default: `ScalifyConfig.rounding_mode`).
    """
    t = lax.stop_gradient(x)
    if not normalise:
        return _pow2_rms(t, mode)
    a = lax.reduce_max(lax.abs(t), tuple(range(t.ndim)))
    f, inv_f = _max_pow2(a)
    m, inv = _pow2_rms(lax.mul(t, inv_f), mode)
    return lax.mul(m, f), lax.mul(inv, inv_f)


def _pow2_rms(t: Any, mode: Optional[Pow2RoundMode]) -> Tuple[Any, Any]:
    v = lax.reduce_sum(lax.square(t), tuple(range(t.ndim)))
    v = lax.mul(v, np.asarray(1 / max(t.size, 1), v.dtype))  # the mean square
    mode = get_config().rounding_mode if mode is None else Pow2RoundMode(mode)
    if mode == Pow2RoundMode.DOWN:
        m, inv = _traced_rms_down(v)
    else:
        m = pow2_round(lax.sqrt(_normal_or_one(v)), mode)
        inv = lax.div(np.ones((), v.dtype), m)
    # An all-zero tensor: scale 0, so that it never sets the scale of what it is added
    # to (its data, 0, is kept as it is: ``inv`` stays finite).
    return lax.select(lax.eq(v, np.zeros((), v.dtype)), np.zeros((), v.dtype), m), inv


@jax.jit
def _max_pow2(a: Any) -> Tuple[Any, Any]:
    """``(pow2_floor(a), its reciprocal)`` of a max-abs ``a`` (subnormal ``a`` read as
    the smallest normal), ``(1, 1)`` for 0, inf or NaN. One `jit` equation."""
    fi = jnp.finfo(a.dtype)
    ok = lax.bitwise_and(lax.gt(a, np.zeros((), a.dtype)), lax.le(a, np.asarray(fi.max, a.dtype)))
    f, inv = pow2_floor_and_reciprocal(lax.max(a, np.asarray(fi.tiny, a.dtype)))
    one_ = np.ones((), a.dtype)
    return lax.select(ok, f, one_), lax.select(ok, inv, one_)


def _normal_or_one(v: Any) -> Any:
    fi = jnp.finfo(v.dtype)
    ok = lax.bitwise_and(lax.ge(v, np.asarray(fi.tiny, v.dtype)), lax.le(v, np.asarray(fi.max, v.dtype)))
    return lax.select(ok, v, np.ones((), v.dtype))


@jax.jit
def _traced_rms_down(v: Any) -> Tuple[Any, Any]:
    """``(pow2_down(sqrt(v)), its reciprocal)`` of a mean square ``v`` from exponent
    bits; one `jit` equation whose ~20 scalar primitives are traced once per dtype."""
    return pow2_sqrt_down(_normal_or_one(v))
