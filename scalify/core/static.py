"""Values known at trace time beside traced ones, and the conversions every rule uses.

Rules receive NumPy values (literals, folded constants such as ``zeros_like`` or a
``-inf`` mask fill, static scales) mixed with traced JAX values. Static values are kept
in NumPy for as long as possible, so that whatever depends on them folds at trace time:
`cast` stays in NumPy for them, and `as_jax` turns one into a JAX value only where a
primitive needs it (a uniform array as one broadcast, never an embedded constant).

A static constant whose elements are all equal (`static_uniform_value`) reads the same
at every scale when it is 0, +-inf or NaN (`is_scale_free`): such a constant takes no
part in choosing a scale and adopts the scale it is aligned to. Any other static
constant has the scale `static_scale` (the power of two of its largest finite
magnitude).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import get_config
from scalify.core.datatype import is_float_dtype
from scalify.core.pow2 import is_static, pow2_round_down


def static_uniform_value(x: Any) -> Optional[np.generic]:
    """The single value of a static array whose elements are all equal, else None."""
    if not is_static(x):
        return None
    a = np.asarray(x)
    if a.size == 0:
        return None
    first = a.reshape(-1)[0]
    if a.size == 1 or all(s == 0 for s in a.strides):
        return first
    if a.size <= 1 << 22 and (np.all(a == first) or (np.isnan(first) and np.all(np.isnan(a)))):
        return first
    return None


def is_scale_free(x: Any) -> bool:
    """True for a static constant that reads the same in any scale: 0, +-inf, NaN."""
    c = static_uniform_value(x)
    if c is None or not is_float_dtype(np.asarray(c).dtype):
        return c is not None and c == 0
    return bool(c == 0 or not np.isfinite(c))


def scale_dtype() -> np.dtype:
    return get_config().scale_dtype


def one() -> np.ndarray:
    """A static scale of 1."""
    return np.ones((), scale_dtype())


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype``: NumPy for a static value, one ``convert_element_type`` (none
    when it already is) for a traced one. Rules call `lax` directly rather than
    `jax.numpy`: every `jax.numpy` function is a `jit` of its own, whose dispatch costs
    far more trace time than the primitive it binds."""
    dtype = np.dtype(dtype)
    if is_static(x):
        return np.asarray(x, dtype)
    return x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)


def as_jax(x: Any) -> Any:
    """A JAX value for ``x``; a static array with equal elements becomes a broadcast of
    its scalar (one op in the program) rather than an embedded constant array."""
    if isinstance(x, np.ndarray) and x.size > 1:
        c = static_uniform_value(x)
        if c is not None:
            return jax.lax.broadcast(jnp.asarray(c), x.shape)
    return jnp.asarray(x) if is_static(x) else x


def static_scale(x: Any) -> Optional[np.ndarray]:
    """The scale a static operand is read with: None for a scale-free constant (0,
    +-inf, NaN), ``pow2(|c|)`` for a uniform constant ``c``, the power of two of the
    largest finite magnitude of any other static array (1 when it has none)."""
    c = static_uniform_value(x)
    if c is not None:
        if is_scale_free(x):
            return None
        return pow2_round_down(np.abs(np.asarray(c, dtype=scale_dtype())))
    a = np.abs(np.asarray(x, dtype=scale_dtype()))
    finite = a[np.isfinite(a)]
    m = finite.max() if finite.size else 0
    return pow2_round_down(np.asarray(m, scale_dtype())) if m > 0 else one()
