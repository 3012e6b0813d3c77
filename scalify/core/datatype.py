"""`ScaledArray`: a low-precision ``data`` array and a scalar ``scale``.

The value represented is ``data * scale``. ``data`` keeps the shape and dtype the user's
function sees (float16, bfloat16, float8, float32...); ``scale`` is a float32 scalar,
normally a power of two, that carries the magnitude.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scalify import _jax_compat
from scalify.core.config import Pow2RoundMode
from scalify.core.pow2 import is_static
from scalify.core.rms import pow2_rms


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype scalify computes in for data of ``dtype``: float32, or ``dtype`` itself
    when wider (float64). Float8 formats have no implicit promotion in JAX, hence no
    `jnp.promote_types` here."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize > 4 else np.dtype(np.float32)


def is_float_dtype(dtype: Any) -> bool:
    """True for every floating dtype, float8 formats of ml_dtypes included."""
    try:
        return jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        return False


class ScaledArray:
    """A scaled tensor: value ``data * scale``.

    Args:
      data: a floating array (any float dtype, float8 included).
      scale: a floating scalar, normally a power of two. Python numbers become float32.
        Scale 0 is the all-zero tensor (its value is 0 whatever the data): it carries no
        magnitude, so it never sets the scale of what it is combined with (``add(zeros,
        x)`` is ``x`` at ``x``'s scale). Negative, infinite and NaN scales are refused.

    A ScaledArray is a JAX pytree with children ``(data, scale)``: it passes through
    `jax.jit`, `jax.tree` functions, `eval_shape` and sharding like a pair of arrays.
    Outside `scalify` it is a container; inside `scalify` every primitive acts on it.
    """

    __slots__ = ("data", "scale")
    __array_priority__ = 1000

    def __init__(self, data: Any, scale: Any):
        if isinstance(data, ScaledArray):
            raise TypeError("ScaledArray data must be an array, got a ScaledArray.")
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = np.float32(scale)
        dtype = getattr(data, "dtype", None)
        if dtype is None or not is_float_dtype(dtype):
            raise TypeError(
                f"ScaledArray data must be a floating array, got {type(data).__name__}"
                f" of dtype {dtype}."
            )
        sdtype = getattr(scale, "dtype", None)
        if sdtype is None or not is_float_dtype(sdtype):
            raise TypeError(f"ScaledArray scale must be a floating scalar, got {scale!r}.")
        if np.shape(scale) != ():
            raise TypeError(
                f"ScaledArray scale must be a scalar, got shape {np.shape(scale)}."
            )
        if is_static(scale) and not (np.isfinite(scale) and scale >= 0):
            raise ValueError(f"ScaledArray scale must be finite and >= 0, got {scale}.")
        self.data = data
        self.scale = scale

    # --- array-like attributes -------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.shape, self.dtype)

    def to_array(self, dtype: Optional[Any] = None) -> jax.Array:
        """The value ``data * scale`` as a plain array of ``dtype`` (default: data's).

        The product is computed in float32 (or wider) and rounded once to ``dtype``.
        """
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        cdtype = compute_dtype(self.dtype)
        if is_float_dtype(dtype) and dtype.itemsize > cdtype.itemsize:
            cdtype = dtype
        value = jnp.asarray(self.data).astype(cdtype) * jnp.asarray(self.scale).astype(cdtype)
        return value.astype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.to_array(), dtype=dtype)

    def astype(self, dtype: Any) -> "ScaledArray":
        """Same scale, data cast to ``dtype`` (a float dtype)."""
        if not is_float_dtype(dtype):
            raise TypeError(f"ScaledArray.astype needs a float dtype, got {dtype}.")
        return ScaledArray(self.data.astype(dtype), self.scale)

    def __repr__(self) -> str:
        return f"ScaledArray(data={self.data!r}, scale={self.scale!r})"

    def __len__(self) -> int:
        return self.shape[0]


def _flatten_with_keys(x: ScaledArray):
    return ((jax.tree_util.GetAttrKey("data"), x.data), (jax.tree_util.GetAttrKey("scale"), x.scale)), None


def _unflatten(aux: Any, children: Any) -> ScaledArray:
    # JAX rebuilds pytrees with placeholder leaves (None, object(), tracers, specs):
    # no validation here, only in the constructor users call.
    out = object.__new__(ScaledArray)
    out.data, out.scale = children
    return out


jax.tree_util.register_pytree_with_keys(
    ScaledArray, _flatten_with_keys, _unflatten, flatten_func=lambda x: ((x.data, x.scale), None)
)


def is_scaled_leaf(x: Any) -> bool:
    """`is_leaf` predicate for `jax.tree` functions: stop at ScaledArrays."""
    return isinstance(x, ScaledArray)


def _check_concrete_scale(scale: Any) -> None:
    if isinstance(scale, jax.Array) and not _jax_compat.is_tracer(scale):
        s = np.asarray(scale)
        if not (np.isfinite(s) and s >= 0):
            raise ValueError(f"ScaledArray scale must be finite and >= 0, got {s}.")


def scaled_array(data: Any, scale: Any, dtype: Any = None, npapi: Any = None) -> ScaledArray:
    """``ScaledArray(data, scale)`` from array-likes: ``data`` is the data, not divided.

    Args:
      data: array-like data (lists and NumPy arrays become arrays).
      scale: a scalar >= 0 (0: the all-zero tensor); Python numbers become float32.
      dtype: optional dtype for the data.
      npapi: the array module building data and scale: ``jax.numpy`` (the default) or
        ``numpy``, whose arrays stay NumPy (static, folded at trace time inside
        `scalify`). The same signature as jax-scalify's ``scaled_array``.
    """
    npapi = jnp if npapi is None else npapi
    if npapi not in (jnp, np):
        raise TypeError(f"scaled_array: npapi must be jax.numpy or numpy, got {npapi!r}.")
    data = npapi.asarray(data, dtype=dtype)
    if hasattr(scale, "dtype") and is_float_dtype(scale.dtype):
        scale = npapi.asarray(scale)
    else:
        scale = npapi.asarray(scale, dtype=np.float32)
    if npapi is np and scale.dtype.itemsize < 4:
        scale = scale.astype(np.float32)
    _check_concrete_scale(scale)  # NumPy scales: the constructor checks them
    return ScaledArray(data, scale)


def unit_scale(x: Any) -> jax.Array:
    """The power of two nearest below the root-mean-square of ``x``: the scale that
    leaves ``x / scale`` near unit variance (`scalify.core.rms.pow2_rms`, rounded down
    whatever the `ScalifyConfig` mode). 0 when ``x`` is all zeros (the zero tensor
    carries no magnitude), 1 when it is empty, not finite, or its RMS is below the
    smallest normal float32 number. A float32 scalar, no gradient."""
    return _unit_scale_and_inverse(jnp.asarray(x))[0]


def _unit_scale_and_inverse(x: jax.Array) -> Any:
    """``(unit_scale(x), f)`` with ``x * f`` the data at that scale: ``f`` is the scale's
    reciprocal, and 1 where the scale is 0 (all zeros: the data stay 0, never 0 / 0) or
    1. Both float32 scalars."""
    if x.size == 0:
        return jnp.float32(1), jnp.float32(1)
    m, inv = pow2_rms(x.astype(compute_dtype(x.dtype)), normalise=True, mode=Pow2RoundMode.DOWN)
    m, inv = m.astype(np.float32), inv.astype(np.float32)
    ok = m >= np.float32(np.finfo(np.float32).tiny)
    one, zero = np.float32(1), np.float32(0)
    return jnp.where(ok, m, jnp.where(m == zero, zero, one)), jnp.where(ok, inv, one)


def at_unit_scale(x: Any, dtype: Any = None) -> "ScaledArray":
    """``x`` as a ScaledArray at its `unit_scale`, data cast to ``dtype`` (default
    ``x``'s dtype) after scaling in float32, so values below the narrow format's range
    survive. An all-zero ``x`` gives zero data at scale 0."""
    x = jnp.asarray(x)
    s, f = _unit_scale_and_inverse(x)
    cd = compute_dtype(x.dtype)
    data = (x.astype(cd) * f.astype(cd)).astype(x.dtype if dtype is None else dtype)
    return ScaledArray(data, s)


def as_scaled_array(tree: Any, scale: Any = None, dtype: Any = None) -> Any:
    """Turn every float leaf of ``tree`` into a ScaledArray of the same value.

    ``data = x / scale``. With ``scale=None`` (the default) each leaf gets its own
    `unit_scale` (the power of two below its RMS), so data starts near unit variance:
    that is what keeps data in range through deep networks, whose weights are initialised
    with a standard deviation of ``1/sqrt(fan_in)``; an all-zero leaf (a zero bias) gets
    scale 0. Pass ``scale=1.0`` for data equal
    to ``x``. ``dtype`` casts the data after dividing (so tiny float32 values survive a
    cast to float16). Integer and boolean leaves, and existing ScaledArrays, are returned
    unchanged.
    """
    if scale is not None:
        scale = jnp.asarray(scale, dtype=np.float32)
        if np.shape(scale) != ():
            raise TypeError(f"as_scaled_array: scale must be a scalar, got shape {np.shape(scale)}.")
        _check_concrete_scale(scale)
        if not _jax_compat.is_tracer(scale) and float(scale) == 0:
            raise ValueError("as_scaled_array: scale=0 would drop the values (data = x / 0); "
                             "leave scale=None: all-zero leaves get scale 0 by themselves.")
    if dtype is not None and not is_float_dtype(dtype):
        raise TypeError(f"as_scaled_array: dtype must be a float dtype, got {dtype}.")

    def convert(x: Any) -> Any:
        if isinstance(x, ScaledArray) or x is None:
            return x
        if isinstance(x, (float,)) or (hasattr(x, "dtype") and is_float_dtype(x.dtype)):
            x = jnp.asarray(x)
            out_dtype = x.dtype if dtype is None else np.dtype(dtype)
            if scale is None:
                return at_unit_scale(x, out_dtype)
            data = (x.astype(compute_dtype(x.dtype)) / scale).astype(out_dtype)
            return ScaledArray(data, scale)
        return x

    return jax.tree.map(convert, tree, is_leaf=is_scaled_leaf)


def asarray(tree: Any, dtype: Any = None) -> Any:
    """Turn every ScaledArray leaf of ``tree`` into a plain array (``data * scale``).

    With ``dtype``, float leaves (scaled or plain) are cast to it; other leaves are
    returned unchanged.
    """

    def convert(x: Any) -> Any:
        if isinstance(x, ScaledArray):
            return x.to_array(dtype)
        if dtype is not None and hasattr(x, "dtype") and is_float_dtype(x.dtype):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(convert, tree, is_leaf=is_scaled_leaf)
