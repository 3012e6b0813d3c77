"""How rules see their operands: scales, alignment and static (trace-time) knowledge.

Rules receive ScaledArrays and plain arrays mixed. A plain operand is read as scale 1,
except a *static* one (a NumPy value known at trace time: a literal, a folded constant
such as ``zeros_like`` or a ``-inf`` mask fill) whose value is the same everywhere:

- a finite non-zero constant ``c`` has scale ``pow2(|c|)``;
- a *scale-free* constant (0, +-inf, NaN) has the same value in every scale, so it
  takes no part in choosing a common scale and adopts whatever scale it is aligned to.

Scale arithmetic stays in NumPy when every scale is static, so it folds at trace time.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.datatype import ScaledArray, compute_dtype, is_float_dtype  # noqa: F401
from scalify.core.pow2 import is_static, pow2_round, pow2_round_down, xnp


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


def scale_of(x: Any) -> Any:
    """The scale an operand is read with (None for scale-free constants)."""
    if isinstance(x, ScaledArray):
        return x.scale
    c = static_uniform_value(x)
    if c is not None:
        if is_scale_free(x):
            return None
        return pow2_round_down(np.abs(np.asarray(c, dtype=scale_dtype())))
    if is_static(x):
        a = np.abs(np.asarray(x, dtype=scale_dtype()))
        finite = a[np.isfinite(a)]
        m = finite.max() if finite.size else 0
        return pow2_round_down(np.asarray(m, scale_dtype())) if m > 0 else one()
    return one()


def promote(x: Any) -> ScaledArray:
    """Any float operand as a ScaledArray of the same value (ScaledArrays unchanged)."""
    if isinstance(x, ScaledArray):
        return x
    s = scale_of(x)
    s = one() if s is None else s
    return ScaledArray(in_scale(x, s, np.asarray(x).dtype if is_static(x) else x.dtype), s)


def in_scale(x: Any, scale: Any, dtype: Any = None) -> Any:
    """The value of ``x`` divided by ``scale``, as an array of ``dtype``.

    ``dtype`` defaults to the compute dtype (float32 or wider). Exact when the ratio of
    scales is a power of two and the result is in range. Static uniform operands become
    a broadcast constant (cheap in HLO), never an embedded array.
    """
    if isinstance(x, ScaledArray):
        dtype = compute_dtype(x.dtype) if dtype is None else dtype
        ratio = ratio_of(x.scale, scale)
        data = x.data
        if is_static(ratio) and ratio == 1:
            return _astype(data, dtype)
        return _mul(data, ratio, dtype)
    xdtype = np.asarray(x).dtype if is_static(x) else x.dtype
    dtype = compute_dtype(xdtype) if dtype is None else dtype
    c = static_uniform_value(x)
    if c is not None:
        if is_scale_free(x):
            return _full(np.shape(x), c, dtype)
        v = xnp(scale).asarray(c, scale_dtype()) / scale
        return _full(np.shape(x), v, dtype)
    if is_static(scale) and scale == 1:
        return _astype(x, dtype)
    return _mul(x, 1 / scale, dtype)


def ratio_of(a: Any, b: Any) -> Any:
    """``a / b`` for scales: NumPy when both are static; 1 when they are the same value."""
    if a is b:
        return one()
    return a / b


def as_jax(x: Any) -> Any:
    """A JAX value for ``x``; a static array with equal elements becomes a broadcast of
    its scalar (one op in the program) rather than an embedded constant array."""
    if isinstance(x, np.ndarray) and x.size > 1:
        c = static_uniform_value(x)
        if c is not None:
            return jax.lax.broadcast(jnp.asarray(c), x.shape)
    return jnp.asarray(x) if is_static(x) else x


def _mul(data: Any, factor: Any, dtype: Any) -> Any:
    cd = compute_dtype(np.dtype(dtype))
    out = as_jax(data).astype(cd) * jnp.asarray(factor).astype(cd)
    return out.astype(dtype)


def _astype(x: Any, dtype: Any) -> Any:
    return as_jax(x).astype(dtype)


def _full(shape: Sequence[int], value: Any, dtype: Any) -> Any:
    return jax.lax.broadcast(jnp.asarray(value).astype(dtype), tuple(shape))


def _headroom(dtype: Any) -> np.ndarray:
    """``2**-H`` with H half the exponent range of ``dtype`` (8 for float16, 64 for
    float32 and bfloat16, 4 for float8 E4M3)."""
    h = int(np.log2(float(jnp.finfo(dtype).max))) // 2
    return np.asarray(2.0**-h, scale_dtype())


def common_scale(*xs: Any) -> Any:
    """The scale operands are aligned to (select, concatenate, max/min, clamp, scatter).

    Traced operands (ScaledArrays, plain arrays) count with their scale; the largest
    wins. A static constant only needs the scale to be large enough to hold it with
    headroom: ``pow2(|c|) * 2**-H`` (`_headroom`), so a mask fill of ``finfo.min``
    (2**127 in float32) is held exactly as a large data value instead of dragging the
    other operands' data into the subnormals, and ``max(x, 1)`` on tiny ``x`` stays
    exact. Scale-free constants (0, +-inf, NaN) never count; 1 if nothing does.
    """
    scales = []
    for x in xs:
        sx = scale_of(x)
        if sx is not None and is_static(x):
            sx = sx * _headroom(np.asarray(x).dtype)
        if sx is not None:
            scales.append(sx)
    if not scales:
        return one()
    out = scales[0]
    for s in scales[1:]:
        out = xnp(out, s).maximum(out, s)
    return out


def hypot_scale(*scales: Any) -> Any:
    """``pow2(sqrt(sum(s**2)))`` without overflow, ignoring None (scale-free) entries.

    For power-of-two scales (all that rules and `as_scaled_array` produce) the rounded
    hypotenuse has a closed form: with ``m = max(s)`` and ``n`` scales, ``sqrt(sum s**2)``
    lies in ``[m, m * sqrt(n)]``, so rounding DOWN gives ``m`` when ``n <= 3`` (the sum is
    below ``4 m**2``), and rounding UP gives ``2 m`` when the sum is above ``m**2`` and
    ``n <= 4``, i.e. when some other scale is present. Using the closed form emits one
    ``max`` per scale instead of the ~20 scalar ops of the general formula (the general
    formula is kept for NONE/STOCHASTIC rounding, more operands, and static scales, where
    it folds in NumPy anyway). A non-power-of-two scale a user passed in is carried like
    ``mul`` carries it (``max`` is then not rounded).
    """
    scales = [s for s in scales if s is not None]
    if not scales:
        return one()
    if len(scales) == 1:
        return scales[0]
    mod = xnp(*scales)
    m = scales[0]
    for s in scales[1:]:
        m = mod.maximum(m, s)
    mode = get_config().rounding_mode
    if mod is jnp and mode == Pow2RoundMode.DOWN and len(scales) <= 3:
        return m
    if mod is jnp and mode == Pow2RoundMode.UP and len(scales) <= 4:
        return m * 2
    total = sum((s / m) ** 2 for s in scales)
    return pow2_round(m * mod.sqrt(total))


def out_dtype(*xs: Any) -> np.dtype:
    """Result dtype of operands the jaxpr already made consistent: the dtype of the first
    non-static operand (literals may be weakly typed)."""
    for x in xs:
        if not is_static(x):
            return np.dtype(x.dtype)
    return np.asarray(xs[0]).dtype
