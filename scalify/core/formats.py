"""Narrow float formats: which formats are narrow, their bounds, and the one
saturating cast every part of scalify rounds to them with.

Why one cast: rounding to a narrow format meets the same questions everywhere (a rule's
result, a user's `cast_on_forward`, an optimizer's stored state): what a finite value
beyond the format's range becomes, what an infinity becomes, and that NaN must stay
NaN. `saturating_cast` answers them in one place; the places that need different
answers say so with its ``overflow`` and ``infinities`` arguments.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import jax.numpy as jnp
import numpy as np

from scalify.core.datatype import compute_dtype, is_float_dtype
from scalify.core.static import as_jax, cast


def is_narrow(dtype: Any) -> bool:
    """True for float formats whose exponent range is narrower than float32's (float16,
    the float8 formats): there a static scale estimate that is off by the format's range
    overflows (or flushes) data whose value float32 holds. bfloat16 shares float32's
    exponent range, and rules compute in float32, so its data overflows only where the
    float32 computation itself would."""
    dtype = np.dtype(dtype)
    return is_float_dtype(dtype) and dtype.itemsize < 4 and int(jnp.finfo(dtype).maxexp) < 128


@functools.lru_cache(maxsize=None)
def format_bounds(dtype: Any) -> Tuple[int, int]:
    """``(hi, lo)``: every finite value of ``dtype`` is below ``2**hi`` in magnitude and
    every non-zero one at least ``2**lo`` (float16: 16, -24; float8 E4M3: 9, -9)."""
    fi = jnp.finfo(np.dtype(dtype))
    hi = int(np.ceil(np.log2(float(fi.max))))
    lo = int(np.floor(np.log2(float(fi.smallest_subnormal))))
    return hi, lo


_INFINITIES = ("keep", "saturate")
_OVERFLOWS = ("float8", "saturate")


def _one_byte_float(dtype: np.dtype) -> bool:
    return dtype.itemsize == 1 and is_float_dtype(dtype)


def clip_to_format(x: Any, dtype: Any, *, infinities: str = "keep") -> Any:
    """``x`` with every value beyond the largest finite value ``M`` of ``dtype`` replaced
    by ``+-M``: what `saturating_cast` casts. NaN stays NaN; ``infinities`` says what
    happens to +-inf (see `saturating_cast`).

    Computed in ``x``'s dtype when it holds ``M`` exactly (float32 data, the common
    case: no conversion is added), else in its compute dtype (float32 or wider), where
    the bound is ``M`` or that dtype's own largest value. ``x`` is returned unchanged
    when none of its finite values can exceed ``M`` and infinities are kept."""
    if infinities not in _INFINITIES:
        raise ValueError(f"infinities must be one of {_INFINITIES}, got {infinities!r}.")
    x = as_jax(x)
    dtype = np.dtype(dtype)
    if not is_float_dtype(x.dtype):
        x = cast(x, compute_dtype(dtype))
    xd = np.dtype(x.dtype)
    fmax = float(jnp.finfo(dtype).max)
    if infinities == "keep" and float(jnp.finfo(xd).max) <= fmax:
        return x
    holds = float(jnp.finfo(xd).max) >= fmax and float(np.asarray(fmax, xd)) == fmax
    w = xd if holds else compute_dtype(xd)
    m = np.asarray(min(fmax, float(jnp.finfo(w).max)), w)
    x = cast(x, w)
    clipped = jnp.clip(x, -m, m)
    if infinities == "saturate":
        return clipped
    return jnp.where(jnp.isfinite(x), clipped, x)


def saturating_cast(x: Any, dtype: Any, *, overflow: str = "float8", infinities: str = "keep") -> Any:
    """``x`` cast to ``dtype``, with values beyond the format's largest finite value
    ``M`` first replaced by ``+-M`` where ``overflow`` says so: the one saturating cast
    of scalify.

    Semantics, for every format:

    - **NaN stays NaN** (except in formats with no NaN code, such as float4_e2m1fn,
      where the cast gives what XLA gives);
    - a finite value within range is cast as it is (rounded to nearest even);
    - a finite value beyond ``+-M`` (``overflow``): ``"float8"`` (the default)
      saturates to ``+-M`` in one-byte formats only (float8 and narrower), and lets it
      overflow to ``+-inf`` in wider ones, as a plain cast does. This is the cast of
      the scaled rules' results: float8 E4M3FN has no infinity (an overflowing cast
      would give NaN) and float8 hardware conversions saturate, while a float16 or
      bfloat16 overflow stays as visible as it is in plain JAX. ``"saturate"``
      saturates in every format (an optimizer's stored state, the public
      `scalify.ops.cast_on_forward`);
    - +-inf (``infinities``): ``"keep"`` (the default) casts them as they are, so that a
      diverged value stays visible (in a format without infinity, such as E4M3FN, it
      becomes NaN); ``"saturate"`` turns them into ``+-M`` too, as hardware "satfinite"
      conversions do (`scalify.ops.cast_on_forward`: a saturating cast never turns a
      value into NaN). Requires ``overflow="saturate"``.

    A static ``x`` that needs no clipping stays NumPy (`cast`)."""
    if overflow not in _OVERFLOWS:
        raise ValueError(f"overflow must be one of {_OVERFLOWS}, got {overflow!r}.")
    if infinities == "saturate" and overflow != "saturate":
        raise ValueError('infinities="saturate" needs overflow="saturate".')
    dtype = np.dtype(dtype)
    if overflow == "saturate" or _one_byte_float(dtype):
        if infinities == "saturate" and dtype.itemsize > compute_dtype(_dtype_of(x)).itemsize:
            x = cast(x, dtype)  # a wider target (float64): clip in it
        x = clip_to_format(x, dtype, infinities=infinities)
    return cast(x, dtype)


def _dtype_of(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
