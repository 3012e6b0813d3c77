"""Narrow float formats: which formats are narrow, their bounds, and the one
saturating cast every part of scalify rounds to them with.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import jax.numpy as jnp
import numpy as np

from scalify.core.datatype import is_float_dtype
from scalify.core.static import cast


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


def saturating_cast(x: Any, dtype: Any) -> Any:
    """``cast(x, dtype)``, saturating finite values to the format's largest finite value
    for float8 formats (E4M3FN has no infinity: an overflowing cast would give NaN);
    infinities and NaN are cast as they are, so that they stay visible."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 and is_float_dtype(dtype):
        big = float(jnp.finfo(dtype).max)
        x = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)
    return cast(x, dtype)
