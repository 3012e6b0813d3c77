"""Arithmetic on scales: products and quotients that stay in range.

A scale must stay a finite, non-zero power of two (or 0, the scale of the zero tensor),
so a product or quotient of scales outside the normal range of the scale dtype is
clamped to it, and the excess (the *residual*) is multiplied into the data instead:
`scale_product` and `scale_quotient` return ``(scale, residual)``, and
`times_residual` applies the residual.

Scale arithmetic stays in NumPy when every scale is static, so it folds at trace time
(`scale_mul`, `scale_div`, `scale_max`). Traced scalar products are one `jit` equation
each, whose ~15 scalar primitives are traced once per dtype rather than at every rule.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.pow2 import int_dtype, is_static
from scalify.core.static import cast, scale_dtype
from scalify.core.trace_state import data_factor, exact_reciprocal


def times_residual(data: Any, r: Optional[Any]) -> Any:
    """``data * r`` for the residual ``r`` of `scale_product` / `scale_quotient` (a
    scalar; None means 1)."""
    if r is None:
        return data
    return jax.lax.mul(data, cast(data_factor(r), data.dtype))


def _scale_binary(np_fn: Any, lax_fn: Any) -> Any:
    def op(a: Any, b: Any) -> Any:
        if is_static(a) and is_static(b):
            with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
                return np_fn(a, b)
        dtype = scales_dtype(a, b)
        return lax_fn(cast(a, dtype), cast(b, dtype))

    op.__doc__ = f"``{np_fn.__name__}`` of two scales: NumPy when both are static, else `lax`."
    return op


scale_mul = _scale_binary(np.multiply, jax.lax.mul)
scale_div = _scale_binary(np.divide, jax.lax.div)
scale_max = _scale_binary(np.maximum, jax.lax.max)


def scale_bounds(dtype: Any) -> Tuple[float, float, int, int]:
    """Smallest normal and largest power of two of a scale dtype, and their exponents."""
    fi = jnp.finfo(dtype)
    return float(fi.tiny), float(2.0 ** (fi.maxexp - 1)), int(fi.minexp), int(fi.maxexp - 1)


def scales_dtype(*scales: Any) -> np.dtype:
    """The dtype scale arithmetic on ``scales`` computes in."""
    # Python numbers are weakly typed: they take the dtype of the arrays beside them.
    dtypes = [np.asarray(s).dtype if is_static(s) else s.dtype
              for s in scales if not isinstance(s, (int, float))]
    return np.dtype(jnp.result_type(*dtypes)) if dtypes else scale_dtype()


def clip_scale(x: Any, lo: float, hi: float) -> Any:
    """``clamp(lo, x, hi)`` of a traced scalar (bounds cast to its dtype)."""
    return jax.lax.clamp(np.asarray(lo, x.dtype), x, np.asarray(hi, x.dtype))


def _is_one(s: Any) -> bool:
    return is_static(s) and bool(np.asarray(s) == 1)


def _static_clamped(p: float, dtype: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A static scale value ``p`` (exact, float64) as (scale clamped to range, residual)."""
    lo, hi, _, _ = scale_bounds(dtype)
    if p == 0:  # a zero factor (float64 products of normal float32 scales never underflow)
        return np.zeros((), dtype), None
    s = min(max(p, lo), hi)
    with np.errstate(over="ignore", under="ignore"):
        r = None if s == p else np.asarray(p / s, np.float32)
    return np.asarray(s, dtype), r


def scale_product(a: Any, b: Any) -> Tuple[Any, Optional[Any]]:
    """``a * b`` as ``(scale, residual)``: ``scale`` is the product clamped to the normal
    range of the scale dtype and ``residual = a * b / scale`` (None when exactly 1) must be
    multiplied into the data. Static scales fold in NumPy; the residual is exact for
    powers of two."""
    if _is_one(a):
        return b, None
    if _is_one(b):
        return a, None
    dtype = scales_dtype(a, b)
    if is_static(a) and is_static(b):
        return _static_clamped(float(a) * float(b), dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    if np.shape(a) == () and np.shape(b) == ():
        return _traced_scale_product(a, b)
    return _clamped_product(a, b)


def _clamped_product(a: Any, b: Any) -> Tuple[Any, Any]:
    """The traced body of `scale_product`: ``(clamp(a * b), residual)``."""
    dtype = np.dtype(a.dtype)
    lo, hi, _, _ = scale_bounds(dtype)
    p = jax.lax.mul(a, b)
    s = clip_scale(p, lo, hi)
    # residual = a * b / s when clamped, with no division (it would be a scalar kernel
    # of its own: XLA never duplicates a division into its consumers). Dividing by the
    # bound s (a power of two) is an exact shift of one factor's exponent bits, taken
    # where it stays normal: over the top, max(a, b) > sqrt(hi), so max(a, b) / hi
    # is normal; under the bottom, min(a, b) < sqrt(lo), so min(a, b) / lo is normal.
    # (Multiplying by constant powers of two instead is not safe: XLA reassociates
    # constant factors into one, a subnormal that is flushed to zero.)
    fi = jnp.finfo(dtype)
    itype = int_dtype(dtype)

    def shift(x: Any, k: int) -> Any:  # x * 2**k, for x * 2**k normal
        # Bits carry no gradient (as in the pow2 helpers): stopped explicitly, since
        # `bitcast_convert_type` has no transpose rule.
        x = jax.lax.stop_gradient(x)
        bits = jax.lax.add(jax.lax.bitcast_convert_type(x, itype), itype(k << int(fi.nmant)))
        return jax.lax.bitcast_convert_type(bits, dtype)

    small, big = jax.lax.min(a, b), jax.lax.max(a, b)
    over = jax.lax.mul(shift(big, -int(np.log2(hi))), small)
    under = jax.lax.mul(shift(small, -int(np.log2(lo))), big)
    one_ = np.ones((), dtype)
    r = jax.lax.select(jax.lax.gt(p, s), over, jax.lax.select(jax.lax.lt(p, s), under, one_))
    # A zero factor (an all-zero operand): the product is the zero tensor, scale 0.
    zero = jax.lax.eq(small, np.zeros((), dtype))
    return jax.lax.select(zero, small, s), jax.lax.select(zero, one_, r)


# Scalar scales (all of them, in practice): one `jit` equation per product, whose body
# is traced once per dtype instead of ~15 primitives traced at every rule.
_traced_scale_product = jax.jit(_clamped_product)


def scale_quotient(a: Any, b: Any) -> Tuple[Any, Optional[Any]]:
    """``a / b`` as ``(scale, residual)``, as `scale_product`. A divisor known to be a
    power of two (static, or `known_pow2`) multiplies by its exact reciprocal instead
    (no division: see `ratio_of`)."""
    if _is_one(b):
        return a, None
    dtype = scales_dtype(a, b)
    if is_static(a) and is_static(b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _static_clamped(float(np.float64(a) / np.float64(b)), dtype)
    inv = exact_reciprocal(b)
    if inv is not None:
        return scale_product(a, cast(inv, dtype))
    lo, hi, _, _ = scale_bounds(dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    p = jax.lax.div(a, b)
    s = clip_scale(p, lo, hi)
    one_ = np.ones((), dtype)
    r = jax.lax.select(jax.lax.eq(p, s), one_, jax.lax.div(jax.lax.div(a, s), b))
    zero = jax.lax.eq(a, np.zeros((), dtype))  # an all-zero dividend: scale 0
    return jax.lax.select(zero, a, s), jax.lax.select(zero, one_, r)
