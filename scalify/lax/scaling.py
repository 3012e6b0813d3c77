"""User-callable scaling primitives: get_data_scale, set_scaling, stop_scaling, rebalance.

Each function works in three settings:

- **inside** `scalify`: the user's function is traced with plain tracers, so each call
  binds a JAX primitive; the interpreter then meets the primitive in the jaxpr and its
  scaled rule (registered below) acts on the ScaledArray;
- **outside** `scalify` on a ScaledArray (eagerly or under `jax.jit`): the function acts
  on ``.data`` and ``.scale`` directly (an eager ``bind`` would reject a ScaledArray);
- **outside** `scalify` on a plain array: the primitive's plain implementation runs. A
  plain array has scale 1 and keeps its value: ``get_data_scale(x)`` is ``(x, 1)``,
  ``set_scaling``/``rebalance`` return ``x``, ``stop_scaling`` is an optional cast.

Every primitive has a JVP rule, a transpose where it is linear, a `vmap` rule and an MLIR
lowering, so `jax.grad`, `jax.vmap` and `jax.jit` work inside and outside `scalify`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from scalify import _jax_compat
from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.operands import as_jax, compute_dtype, in_scale, promote
from scalify.core.pow2 import is_static, pow2_round, pow2_round_down
from scalify.core.registry import register_scaled_op
from scalify.core.rms import pow2_rms
from scalify.lax._primitive import NOT_MAPPED, define_primitive

__all__ = [
    "get_data_scale",
    "set_scaling",
    "stop_scaling",
    "rebalance",
    "rescale_by_norm",
    "get_data_scale_p",
    "set_scaling_p",
    "stop_scaling_p",
    "rebalance_p",
]


# --- small helpers -------------------------------------------------------------------


def _as_operand(x: Any) -> Any:
    """Arrays and ScaledArrays unchanged; Python numbers and lists as JAX arrays."""
    if isinstance(x, ScaledArray) or hasattr(x, "dtype"):
        return x
    return jnp.asarray(x)


def _dtype_of(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_scale(scale: Any, fname: str) -> Any:
    """Validate a user-given scale (a positive scalar) and return it as a float array.

    Static scales (Python/NumPy numbers) stay NumPy so that scalify folds them at trace
    time; a ScaledArray scale is kept as is (its value is read where it is used).
    """
    if isinstance(scale, ScaledArray):
        if scale.shape != ():
            raise TypeError(f"{fname}: scale must be a scalar, got shape {scale.shape}.")
        return scale
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"{fname}: scale must be a positive float scalar, got {scale!r}.")
    if is_static(scale):
        s = np.asarray(scale)
        if s.shape != ():
            raise TypeError(f"{fname}: scale must be a scalar, got shape {s.shape}.")
        if not (is_float_dtype(s.dtype) or np.issubdtype(s.dtype, np.integer)):
            raise TypeError(f"{fname}: scale must be a positive float scalar, got dtype {s.dtype}.")
        if not is_float_dtype(s.dtype):
            s = s.astype(get_config().scale_dtype)
        if not (np.isfinite(s) and s > 0):
            raise ValueError(f"{fname}: scale must be positive and finite, got {s}.")
        return s
    if not hasattr(scale, "dtype"):
        raise TypeError(f"{fname}: scale must be a positive scalar, got {type(scale).__name__}.")
    if np.shape(scale) != ():
        raise TypeError(f"{fname}: scale must be a scalar, got shape {np.shape(scale)}.")
    if not is_float_dtype(scale.dtype):
        if not jnp.issubdtype(scale.dtype, jnp.integer):
            raise TypeError(f"{fname}: scale must be a positive float scalar, got dtype {scale.dtype}.")
        scale = jnp.asarray(scale).astype(get_config().scale_dtype)
    if isinstance(scale, jax.Array) and not _jax_compat.is_tracer(scale):
        v = np.asarray(scale)
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{fname}: scale must be positive and finite, got {v}.")
    return scale


def _scale_value(scale: Any) -> Any:
    """A scale operand as a plain value in the configured scale dtype (NumPy if static)."""
    sdtype = get_config().scale_dtype
    if isinstance(scale, ScaledArray):
        return scale.to_array(jnp.promote_types(scale.dtype, sdtype)).astype(sdtype)
    if is_static(scale):
        return np.asarray(scale, dtype=sdtype)
    return jnp.asarray(scale).astype(sdtype)


def _with_scale_operand(prim: Any, on_scaled: Any, x: Any, scale: Any, fname: str) -> Any:
    """The public ``set_scaling``/``rebalance``: ``scale`` checked; a ScaledArray ``x``
    handled directly (``on_scaled(x, scale)``: an eager ``bind`` would reject it); any
    other ``x`` binds ``prim``, whose scaled rule acts inside `scalify` (a ScaledArray
    ``scale`` is passed as its value)."""
    scale = _check_scale(scale, fname)
    if isinstance(x, ScaledArray):
        return on_scaled(x, scale)
    if isinstance(scale, ScaledArray):
        scale = scale.to_array(np.float32)
    return prim.bind(_as_operand(x), scale)


def _unbatch_scale(scale: Any, dim: Any) -> Any:
    """A per-example scale under `vmap` reduced to one shared scale (the largest).

    ``set_scaling`` and ``rebalance`` keep values unchanged whatever the scale, and a
    ScaledArray holds a single scale for the whole batch: the largest per-example scale
    keeps every example's data within range.
    """
    if dim is NOT_MAPPED:
        return scale
    return jnp.max(scale, axis=dim)


def rescale_by_norm(data: Any, scale: Any, norm: str) -> Tuple[Any, Any]:
    """Move the norm of ``data`` into the scale: ``(data / f, scale * f)``, ``f = pow2(norm)``.

    ``norm`` is ``"max"`` (largest magnitude), ``"l1"`` (mean magnitude) or ``"l2"``
    (root mean square, `scalify.core.rms.pow2_rms`), computed in float32 on the data
    (the L1/L2 norms are computed on data divided by its max, so they never overflow).
    The value ``data * scale`` is unchanged (exactly, with power-of-two scales). Guards:

    - a zero, subnormal or non-finite norm (all-zero data, NaN/inf data) leaves the
      tensor unchanged: the scale never becomes zero or infinite;
    - the new scale is kept within the normal range of the scale dtype (the factor is
      clipped), so a value beyond float32 range stays representable.
    """
    data = as_jax(data)
    if data.size == 0:
        return data, scale
    cd = compute_dtype(data.dtype)
    sdtype = np.dtype(_dtype_of(scale))
    scd = compute_dtype(sdtype)
    if norm == "l2":  # the power of two of the RMS, as every measured scale
        factor = pow2_rms(data.astype(cd), normalise=True)[0].astype(scd)
    else:
        a = jnp.abs(data.astype(cd))
        m = jnp.max(a)
        if norm == "max":
            n = m
        elif norm == "l1":
            ok = (m > 0) & jnp.isfinite(m)
            safe_m = jnp.where(ok, m, jnp.ones((), cd))
            n = jnp.mean(a / safe_m) * safe_m
        else:
            raise ValueError(f"rescale_by_norm: unknown norm {norm!r} (expected 'max', 'l1' or 'l2').")
        factor = pow2_round(n.astype(scd))
    fi = jnp.finfo(scd)
    valid = jnp.isfinite(factor) & (factor >= fi.tiny)
    factor = jnp.where(valid, factor, jnp.ones((), scd))
    s = jnp.asarray(scale).astype(scd)
    sfi = jnp.finfo(sdtype)
    lo = np.asarray(sfi.tiny, scd) / s
    hi = pow2_round_down(np.asarray(sfi.max, scd)) / s
    factor = jnp.clip(factor, lo, hi)
    new_scale = (s * factor).astype(sdtype)
    new_data = (data.astype(cd) / factor.astype(cd)).astype(data.dtype)
    return new_data, new_scale


# --- get_data_scale --------------------------------------------------------------------


def _gds_impl(x: Any, *, scale_dtype: Any) -> Any:
    return x, jnp.ones((), scale_dtype)


def _gds_abstract(x: Any, *, scale_dtype: Any) -> Any:
    return x, jax.core.ShapedArray((), scale_dtype)


def _gds_batch(args: Any, dims: Any, *, scale_dtype: Any) -> Any:
    out = get_data_scale_p.bind(*args, scale_dtype=scale_dtype)
    return out, [dims[0], NOT_MAPPED]


get_data_scale_p = define_primitive(
    "scalify_get_data_scale", _gds_impl, _gds_abstract, multiple_results=True, batching_rule=_gds_batch
)


def _gds_jvp(primals: Any, tangents: Any, *, scale_dtype: Any) -> Any:
    (x,), (t,) = primals, tangents
    data, scale = get_data_scale_p.bind(x, scale_dtype=scale_dtype)
    scale_dot = ad.Zero(jax.core.ShapedArray((), scale_dtype))
    if type(t) is ad.Zero:
        return (data, scale), (t, scale_dot)
    # data = x / scale with the scale held constant: d(data) = dx / scale.
    cd = compute_dtype(t.dtype)
    data_dot = (t.astype(cd) / scale.astype(cd)).astype(t.dtype)
    return (data, scale), (data_dot, scale_dot)


ad.primitive_jvps[get_data_scale_p] = _gds_jvp


@register_scaled_op(get_data_scale_p, always_scaled=True)
def _get_data_scale_rule(x: Any, *, scale_dtype: Any, **params: Any) -> Any:
    """``(data, scale)`` of a ScaledArray; a plain array has a static scale 1 (kept
    static so that later uses of the scale fold at trace time)."""
    if isinstance(x, ScaledArray):
        s = x.scale
        s = np.asarray(s, scale_dtype) if is_static(s) else jnp.asarray(s).astype(scale_dtype)
        return [x.data, s]
    return [x, np.ones((), scale_dtype)]


def get_data_scale(x: Any) -> Tuple[Any, Any]:
    """The ``(data, scale)`` pair of ``x``.

    On a ScaledArray (inside `scalify`, or outside it eagerly or under `jit`) this is
    ``(x.data, x.scale)``; on a plain array it is ``(x, 1)`` with a scalar scale of the
    configured scale dtype (float32 by default).

    Under `jax.grad` the scale is treated as a constant: ``d data = dx / scale``.
    """
    if isinstance(x, ScaledArray):
        return x.data, x.scale
    x = _as_operand(x)
    data, scale = get_data_scale_p.bind(x, scale_dtype=np.dtype(get_config().scale_dtype))
    return data, scale


# --- set_scaling -------------------------------------------------------------------------


def _ss_impl(x: Any, scale: Any) -> Any:
    return x


def _ss_abstract(x: Any, scale: Any) -> Any:
    if scale.shape != ():
        raise TypeError(f"set_scaling: scale must be a scalar, got shape {scale.shape}.")
    return x


def _ss_batch(args: Any, dims: Any) -> Any:
    x, scale = args
    return set_scaling_p.bind(x, _unbatch_scale(scale, dims[1])), dims[0]


set_scaling_p = define_primitive("scalify_set_scaling", _ss_impl, _ss_abstract, batching_rule=_ss_batch)


def _value_preserving_jvp(prim: Any) -> Any:
    """JVP of a primitive whose value is its first operand: the tangent passes through."""

    def jvp(primals: Any, tangents: Any, **params: Any) -> Any:
        return prim.bind(*primals, **params), tangents[0]

    return jvp


ad.primitive_jvps[set_scaling_p] = _value_preserving_jvp(set_scaling_p)


def _set_scaling(x: Any, scale: Any) -> Any:
    s = _scale_value(scale)
    if not isinstance(x, ScaledArray) and not is_float_dtype(_dtype_of(x)):
        return x  # integer and boolean arrays carry no scale
    return ScaledArray(in_scale(x, s, _dtype_of(x)), s)


@register_scaled_op(set_scaling_p, always_scaled=True)
def _set_scaling_rule(x: Any, scale: Any, **params: Any) -> Any:
    """``x`` re-expressed with the given scale: ``data = value / scale`` (computed in
    float32, rounded once to the data dtype), a plain float array included (it becomes
    a ScaledArray). The scale is used as given, not rounded: the user asked for it."""
    return _set_scaling(x, scale)


def set_scaling(x: Any, scale: Any) -> Any:
    """``x`` with scale ``scale``: same value, data re-expressed as ``value / scale``.

    Inside `scalify` the result is a ScaledArray (a plain float array included); outside
    `scalify`, a ScaledArray is re-expressed directly and a plain array is returned
    unchanged. ``scale`` must be a positive scalar; pass a power of two for an exact
    rescaling (it is used as given). Under `jax.grad` the gradient passes through
    unchanged (``set_scaling`` does not change the value).
    """
    return _with_scale_operand(set_scaling_p, _set_scaling, x, scale, "set_scaling")


# --- rebalance -----------------------------------------------------------------------------


def _rb_batch(args: Any, dims: Any) -> Any:
    x, factor = args
    return rebalance_p.bind(x, _unbatch_scale(factor, dims[1])), dims[0]


def _rb_abstract(x: Any, factor: Any) -> Any:
    if factor.shape != ():
        raise TypeError(f"rebalance: scale must be a scalar, got shape {factor.shape}.")
    return x


rebalance_p = define_primitive("scalify_rebalance", _ss_impl, _rb_abstract, batching_rule=_rb_batch)
ad.primitive_jvps[rebalance_p] = _value_preserving_jvp(rebalance_p)


def _rebalance(x: ScaledArray, factor: Any) -> ScaledArray:
    f = _scale_value(factor)
    new_scale = x.scale * f
    return ScaledArray(in_scale(x, new_scale, x.dtype), new_scale)


@register_scaled_op(rebalance_p)
def _rebalance_rule(x: Any, factor: Any, **params: Any) -> Any:
    """Scale multiplied by ``factor``, data divided by it (computed in float32, rounded
    once): the value is unchanged, exact for a power-of-two factor. A plain operand
    stays plain (it has no scale to rebalance)."""
    if not isinstance(x, ScaledArray):
        return x
    return _rebalance(x, factor)


def rebalance(x: Any, scale: Any) -> Any:
    """Move a factor ``scale`` from the data into the scale: ``scale' = x.scale * scale``
    and ``data' = x.data / scale``; the value is unchanged (exactly, for a power of two).

    As in jax-scalify: ``rebalance(x, pow2(norm))`` moves a data norm into the scale. A
    plain array (outside or inside `scalify`) is returned unchanged. Under `jax.grad` the
    gradient passes through unchanged.
    """
    return _with_scale_operand(rebalance_p, _rebalance, x, scale, "rebalance")


# --- stop_scaling ----------------------------------------------------------------------------


def _sts_impl(x: Any, *, dtype: Any) -> Any:
    return x if dtype is None else x.astype(dtype)


def _sts_abstract(x: Any, *, dtype: Any) -> Any:
    return x if dtype is None else x.update(dtype=dtype, weak_type=False)


stop_scaling_p = define_primitive("scalify_stop_scaling", _sts_impl, _sts_abstract, elementwise=True)


@register_scaled_op(stop_scaling_p)
def _stop_scaling_rule(x: Any, *, dtype: Any = None, **params: Any) -> Any:
    """The plain value ``data * scale``, computed in float32 (or wider) and rounded once
    to ``dtype`` (default: the data dtype). The output is a plain array."""
    if isinstance(x, ScaledArray):
        return x.to_array(dtype)
    return _sts_impl(as_jax(x), dtype=dtype)


def stop_scaling(x: Any, dtype: Optional[Any] = None) -> Any:
    """The plain value of ``x`` (``data * scale``), optionally cast to ``dtype``.

    Inside `scalify` the output is a plain array (scale propagation stops here);
    outside, a ScaledArray is converted directly and a plain array is only cast.
    Under `jax.grad` inside `scalify`, the incoming gradient (a plain array) becomes a
    ScaledArray again: its largest magnitude is moved into a power-of-two scale before
    the cast back to ``x``'s dtype, so a tiny or huge gradient neither underflows nor
    overflows the narrow data format.
    """
    if dtype is not None:
        dtype = np.dtype(dtype)
    if isinstance(x, ScaledArray):
        return x.to_array(dtype)
    return stop_scaling_p.bind(_as_operand(x), dtype=dtype)


# The gradient of `stop_scaling`: back from a plain cotangent to a scaled one.


def _tsc_impl(ct: Any, *, dtype: Any) -> Any:
    return ct.astype(dtype)


def _tsc_abstract(ct: Any, *, dtype: Any) -> Any:
    return ct.update(dtype=dtype, weak_type=False)


to_scaled_cast_p = define_primitive("scalify_to_scaled_cast", _tsc_impl, _tsc_abstract, elementwise=True)


@register_scaled_op(to_scaled_cast_p, always_scaled=True)
def _to_scaled_cast_rule(ct: Any, *, dtype: Any, **params: Any) -> Any:
    """Cast to ``dtype`` as a ScaledArray. A plain float operand first gets the scale
    ``pow2(max|ct|)`` (moved out of its data in float32), so that the cast to a narrow
    format neither overflows nor underflows; a ScaledArray keeps its scale."""
    if not isinstance(ct, ScaledArray):
        if not is_float_dtype(_dtype_of(ct)) or not is_float_dtype(dtype):
            return _tsc_impl(as_jax(ct), dtype=dtype)
        if is_static(ct):
            ct = promote(ct)
        else:
            cd = compute_dtype(ct.dtype)
            data, scale = rescale_by_norm(ct.astype(cd), np.ones((), get_config().scale_dtype), "max")
            ct = ScaledArray(data, scale)
    cd = compute_dtype(ct.dtype)
    return ScaledArray(as_jax(ct.data).astype(cd).astype(dtype), ct.scale)


def _sts_transpose(ct: Any, x: Any, *, dtype: Any) -> Any:
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval.to_tangent_aval())]
    return [to_scaled_cast_p.bind(ct, dtype=np.dtype(x.aval.dtype))]


def _tsc_transpose(ct: Any, x: Any, *, dtype: Any) -> Any:
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval.to_tangent_aval())]
    return [stop_scaling_p.bind(ct, dtype=np.dtype(x.aval.dtype))]


ad.deflinear2(stop_scaling_p, _sts_transpose)
ad.deflinear2(to_scaled_cast_p, _tsc_transpose)
