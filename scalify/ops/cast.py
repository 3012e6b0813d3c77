"""Casts to narrow float formats: real (`cast_on_*`) and simulated (`reduce_precision_on_*`).

Both kinds **saturate**: a value beyond the target format's largest finite value ``M``
(infinities included) becomes ``+-M`` before rounding, as hardware "satfinite"
conversions do. float8_e4m3fn has no infinity, so a plain ``astype`` of an overflowing
value gives NaN; a saturating cast never turns a number into NaN. NaN stays NaN (except
for formats with no NaN code, such as float4_e2m1fn, where the real cast gives what
XLA/ml_dtypes give).

Inside `scalify` the cast acts on a ScaledArray's **data** (the scale is kept), which is
what a narrow-format tensor of scalify holds; on plain arrays it acts on the value.

The simulated cast returns the input dtype holding exactly the values the real cast
would give (bit for bit, checked exhaustively against ml_dtypes). It is built on
`lax.reduce_precision` with the mantissa width of the target, plus what that operator
does not model: saturation at the format's own maximum (fn/fnuz formats use the top
exponent for numbers, so their maximum is not the IEEE one), the subnormal range
(XLA's `reduce_precision` flushes the reduced format's subnormals to zero, so values
below the smallest normal are rounded to the subnormal grid with an exact
scale-round-unscale in float32), and the absence of negative zero in the fnuz formats.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad

from scalify.core import formats
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.operands import as_jax, compute_dtype, fit_to_format, is_narrow
from scalify.core.registry import register_scaled_op
from scalify.lax._primitive import define_primitive
from scalify.ops._backward import bound, map_on_backward_data

__all__ = [
    "cast_on_forward",
    "cast_on_backward",
    "reduce_precision_on_forward",
    "reduce_precision_on_backward",
    "saturating_cast",
    "simulated_cast",
]


# --- format information -------------------------------------------------------------


def _target_dtype(dtype: Any, fname: str) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fname}: dtype must be a floating dtype, got {dtype!r}.") from None
    if not is_float_dtype(d):
        raise TypeError(f"{fname}: dtype must be a floating dtype, got {d}.")
    if jnp.finfo(d).nmant == 0:  # float8_e8m0fnu: exponent only, unsigned, no zero
        raise TypeError(
            f"{fname}: {d} is an exponent-only scale format (no sign, no zero, no mantissa);"
            " casting values to it is not supported."
        )
    return np.dtype(d)


@functools.lru_cache(maxsize=None)
def _format(dtype: np.dtype) -> Tuple[float, int, int, bool]:
    """(largest finite value, mantissa bits, smallest normal exponent, has -0)."""
    fi = jnp.finfo(dtype)
    negzero = np.signbit(np.asarray(-0.0, np.float32).astype(dtype).astype(np.float32))
    return float(fi.max), int(fi.nmant), int(fi.minexp), bool(negzero)


@functools.lru_cache(maxsize=None)
def _xla_can_cast(dtype: np.dtype) -> bool:
    """Whether this JAX/XLA build converts float32 to ``dtype`` (some ml_dtypes formats,
    e.g. float6 ones, exist in NumPy before XLA supports them)."""
    try:
        with jax.ensure_compile_time_eval():
            jax.block_until_ready(jnp.zeros((1,), np.float32).astype(dtype))
        return True
    except Exception:  # XLA reports an unsupported element type in various ways
        return False


def _check_castable(dtype: np.dtype, fname: str) -> None:
    if not _xla_can_cast(dtype):
        raise TypeError(
            f"{fname}: this JAX/XLA version cannot cast to {dtype}; use"
            " `reduce_precision_on_forward` / `_on_backward` for a simulated cast."
        )


# --- plain implementations --------------------------------------------------------------


def saturating_cast(x: Any, dtype: Any) -> jax.Array:
    """``x.astype(dtype)`` after clipping to the format's finite range, infinities
    included (NaN kept): `scalify.core.formats.saturating_cast` with
    ``overflow="saturate", infinities="saturate"``."""
    return formats.saturating_cast(as_jax(x), dtype, overflow="saturate", infinities="saturate")


def _mul_pow2(x: Any, e: int) -> Any:
    """``x * 2**e``, exact, in steps that keep each constant representable."""
    while e != 0:
        step = max(-100, min(100, e))
        x = x * np.asarray(2.0**step, x.dtype)
        e -= step
    return x


def simulated_cast(x: Any, dtype: Any) -> jax.Array:
    """The values of ``saturating_cast(x, dtype)``, held in ``x``'s dtype."""
    x = as_jax(x)
    dtype = np.dtype(dtype)
    _, nmant, emin, negzero = _format(dtype)
    cd = compute_dtype(x.dtype)
    cfi = jnp.finfo(cd)
    y = formats.clip_to_format(x.astype(cd), dtype, infinities="saturate")
    if nmant < cfi.nmant:
        # Normal range: round the mantissa (ties to even); the exponent range of the
        # compute dtype is kept so that nothing is flushed or overflows here.
        normal = lax.reduce_precision(y, exponent_bits=int(cfi.nexp), mantissa_bits=nmant)
        # Subnormal range: a fixed grid of step 2**(emin - nmant).
        grid = _mul_pow2(y, nmant - emin)
        small = _mul_pow2(lax.round(grid, lax.RoundingMethod.TO_NEAREST_EVEN), emin - nmant)
        y = jnp.where(jnp.abs(y) < np.asarray(2.0**emin, cd), small, normal)
    if not negzero:  # fnuz formats: -0 does not exist, the cast gives +0
        y = jnp.where(y == 0, jnp.zeros((), cd), y)
    return y.astype(x.dtype)


# --- primitives -------------------------------------------------------------------------


def _cast_abstract(x: Any, *, dtype: Any) -> Any:
    return x.update(dtype=dtype, weak_type=False)


cast_p = define_primitive(
    "scalify_saturating_cast", lambda x, *, dtype: saturating_cast(x, dtype), _cast_abstract, elementwise=True
)


def _cast_transpose(ct: Any, x: Any, *, dtype: Any) -> Any:
    return [cast_p.bind(ct, dtype=np.dtype(x.aval.dtype))]


# Treated as linear, as JAX treats `convert_element_type`: the tangent is cast too, and
# the cotangent is cast back to the input's dtype.
ad.deflinear2(cast_p, _cast_transpose)


@register_scaled_op(cast_p)
def _cast_rule(x: Any, *, dtype: Any, **params: Any) -> Any:
    """Cast of the **data**: a scaled tensor in a narrow format is its data in that
    format. Range-guarded (`fit_to_format`) into a narrower float16/float8 format: data
    whose max-abs leaves the format's safe band (outliers above E4M3's 448) moves the
    excess into the scale instead of saturating; otherwise the scale is kept."""
    if isinstance(x, ScaledArray):
        return _cast_scaled(x, dtype)
    return saturating_cast(x, dtype)


def _cast_scaled(x: ScaledArray, dtype: np.dtype) -> ScaledArray:
    """A ScaledArray's data cast to ``dtype``: range-guarded when narrowing into a
    float16/float8 format, a saturating cast with the scale kept otherwise."""
    narrower = np.dtype(dtype).itemsize < np.dtype(x.dtype).itemsize or (
        float(jnp.finfo(dtype).max) < float(jnp.finfo(x.dtype).max))
    if is_narrow(dtype) and narrower:
        return fit_to_format(x.data, x.scale, dtype)
    return ScaledArray(saturating_cast(x.data, dtype), x.scale)


def _rp_abstract(x: Any, *, dtype: Any) -> Any:
    return x


reduce_precision_p = define_primitive(
    "scalify_simulated_cast", lambda x, *, dtype: simulated_cast(x, dtype), _rp_abstract, elementwise=True
)


def _rp_jvp(primals: Any, tangents: Any, *, dtype: Any) -> Any:
    # On the forward pass only: the tangent (and so the gradient) is left untouched.
    return reduce_precision_p.bind(primals[0], dtype=dtype), tangents[0]


ad.primitive_jvps[reduce_precision_p] = _rp_jvp


@register_scaled_op(reduce_precision_p)
def _reduce_precision_rule(x: Any, *, dtype: Any, **params: Any) -> Any:
    """Simulated saturating cast of the **data** (scale kept), as `_cast_rule` but the
    data keeps its dtype."""
    if isinstance(x, ScaledArray):
        return ScaledArray(simulated_cast(x.data, dtype), x.scale)
    return simulated_cast(x, dtype)


# --- public API ---------------------------------------------------------------------------


def _operand(x: Any) -> Any:
    return x if isinstance(x, ScaledArray) or hasattr(x, "dtype") else jnp.asarray(x)


def _check_float_input(x: Any, fname: str) -> None:
    if not is_float_dtype(x.dtype):
        raise TypeError(f"{fname}: x must be a floating array, got dtype {x.dtype}.")


def cast_on_forward(x: Any, dtype: Any) -> Any:
    """Cast ``x`` to ``dtype`` (a real ``astype``), saturating to the format's largest
    finite value first. On a ScaledArray the data is cast and the scale kept. The
    gradient is cast back to ``x``'s dtype, as for ``astype``."""
    dtype = _target_dtype(dtype, "cast_on_forward")
    _check_castable(dtype, "cast_on_forward")
    x = _operand(x)
    if isinstance(x, ScaledArray):
        return _cast_scaled(x, dtype)
    return cast_p.bind(x, dtype=dtype)


def _cast_round_trip(ct: Any, dtype: np.dtype) -> Any:
    return cast_p.bind(cast_p.bind(ct, dtype=dtype), dtype=np.dtype(ct.dtype))


def cast_on_backward(x: Any, dtype: Any) -> Any:
    """Identity on the forward pass; on the backward pass the gradient is cast to
    ``dtype`` (saturating) and back to ``x``'s dtype, so it holds only ``dtype``'s
    values (on a scaled gradient inside `scalify`: its data)."""
    dtype = _target_dtype(dtype, "cast_on_backward")
    _check_castable(dtype, "cast_on_backward")
    x = _operand(x)
    _check_float_input(x, "cast_on_backward")
    return map_on_backward_data(bound(_cast_round_trip, dtype), x)


def reduce_precision_on_forward(x: Any, dtype: Any) -> Any:
    """Simulated saturating cast of ``x`` to ``dtype``: the result keeps ``x``'s dtype and
    holds exactly the values `cast_on_forward` would give. On a ScaledArray it acts on
    the data. The gradient passes through unchanged."""
    dtype = _target_dtype(dtype, "reduce_precision_on_forward")
    x = _operand(x)
    _check_float_input(x, "reduce_precision_on_forward")
    if isinstance(x, ScaledArray):
        return ScaledArray(simulated_cast(x.data, dtype), x.scale)
    return reduce_precision_p.bind(x, dtype=dtype)


def _simulated_ct(ct: Any, dtype: np.dtype) -> Any:
    return reduce_precision_p.bind(ct, dtype=dtype)


def reduce_precision_on_backward(x: Any, dtype: Any) -> Any:
    """Identity on the forward pass; the gradient gets a simulated saturating cast to
    ``dtype`` (on a scaled gradient inside `scalify`: its data)."""
    dtype = _target_dtype(dtype, "reduce_precision_on_backward")
    x = _operand(x)
    _check_float_input(x, "reduce_precision_on_backward")
    return map_on_backward_data(bound(_simulated_ct, dtype), x)
