"""Scaled rules of contractions: ``dot_general`` and ``conv_general_dilated``.

A contraction of unit-variance operands over K products has variance K. Both rules
compute the contraction on the operands' data *as stored* (float16, bfloat16 and float8
data stay in their format, so the hardware's narrow matmul units do the work) with
float32 accumulation, divide the result by ``pow2(sqrt(K))`` in float32 and round once to
the output dtype; the output scale is ``lhs.scale * rhs.scale * pow2(sqrt(K))``. Data
therefore stays near unit variance (unit scaling), and every scale stays a power of two.

`scaled_dot_general` is the building block: the ``dot_general`` rule calls it, and so can
a policy that first casts the operands' data to float8 (a real float8 ``dot_general``
with float32 accumulation, which XLA lowers to an FP8 GEMM on hardware that has one).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.datatype import ScaledArray
from scalify.core.operands import as_jax, promote, scale_dtype
from scalify.core.pow2 import pow2_round
from scalify.core.registry import register_scaled_op


def _accumulation_dtype(*dtypes: Any) -> np.dtype:
    """float32, or float64 when an operand or the output is float64."""
    return np.dtype(np.float64 if any(np.dtype(d).itemsize > 4 for d in dtypes) else np.float32)


def _cast(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``, saturating to the format's largest finite value for float8
    formats (E4M3FN has no infinity: an overflowing cast would give NaN)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -big, big)
    return x.astype(dtype)


def fan_in_factor(k: int) -> np.ndarray:
    """``pow2(sqrt(k))`` as a static scale (1 for ``k <= 1``), rounded with the active
    `ScalifyConfig`'s rounding mode."""
    return pow2_round(np.sqrt(np.asarray(max(int(k), 1), scale_dtype())))


def _rescale(acc: Any, factor: Any, dtype: Any) -> Any:
    """``acc / factor`` (float32, exact for a power of two), rounded once to ``dtype``."""
    if factor != 1:
        acc = acc * np.asarray(1 / factor, acc.dtype)
    return _cast(acc, dtype)


def _scaled_contraction(
    lhs: Any, rhs: Any, contract: Any, k: int, out_type: Optional[Any]
) -> ScaledArray:
    """Shared body: promote operands, contract the data with float32 accumulation
    (``contract(ld, rd, acc_dtype)``), move ``pow2(sqrt(k))`` into the scale."""
    lhs, rhs = promote(lhs), promote(rhs)
    if out_type is None:
        out_type = _default_out_dtype(lhs.dtype, rhs.dtype)
    acc_dtype = _accumulation_dtype(lhs.dtype, rhs.dtype, out_type)
    acc = contract(as_jax(lhs.data), as_jax(rhs.data), acc_dtype)
    factor = fan_in_factor(k)
    scale = lhs.scale * rhs.scale
    if factor != 1:
        scale = scale * factor
    return ScaledArray(_rescale(acc, factor, out_type), scale)


def _default_out_dtype(a: Any, b: Any) -> np.dtype:
    """Output dtype of a contraction without ``preferred_element_type``: the operands'
    dtype; for two different float8 formats, the one with the larger range (as
    ``lax.dot_general`` does)."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    try:
        return np.dtype(jnp.promote_types(a, b))
    except Exception:  # float8 formats of different kinds do not promote
        return max((a, b), key=lambda d: float(jnp.finfo(d).max))


def contracted_size(lhs_shape: Sequence[int], dimension_numbers: Any) -> int:
    """K of a ``dot_general``: the product of the lhs contracting dimensions' sizes."""
    (lhs_contract, _), _ = dimension_numbers
    return int(np.prod([lhs_shape[d] for d in lhs_contract], dtype=np.int64))


def scaled_dot_general(
    lhs: Any,
    rhs: Any,
    dimension_numbers: Any,
    preferred_element_type: Optional[Any] = None,
    **params: Any,
) -> ScaledArray:
    """``lax.dot_general`` of ScaledArrays (or a ScaledArray and a plain array).

    Args:
      lhs, rhs: ScaledArrays; a plain float array is promoted (scale 1, or the power of
        two of a static constant's magnitude).
      dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``,
        any number of contracting and batch dimensions.
      preferred_element_type: dtype of the output's data; None means the operands' dtype.
      **params: other ``dot_general`` parameters (``precision``, ``out_sharding``, ...),
        forwarded to the data's ``dot_general``.

    The data are contracted in their own dtypes (float8 data stay float8: a real float8
    ``dot_general``) with ``preferred_element_type`` float32, so products accumulate in
    float32 whatever the output dtype. The sum of K products of unit-variance data has
    variance K, so the accumulator is divided by ``pow2(sqrt(K))`` (exact) before one
    rounding to the output dtype (saturating for float8 outputs), and the output scale
    is ``lhs.scale * rhs.scale * pow2(sqrt(K))`` (a product of powers of two). The output
    scale is a float32 number: operand scales whose product leaves float32's range
    (beyond about 2^±126) are out of scope.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    dimension_numbers = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))  # hashable params
    k = contracted_size(np.shape(lhs.data if isinstance(lhs, ScaledArray) else lhs), dimension_numbers)

    def contract(ld: Any, rd: Any, acc_dtype: Any) -> Any:
        return lax.dot_general_p.bind(
            ld,
            rd,
            dimension_numbers=dimension_numbers,
            preferred_element_type=acc_dtype,
            **_with_defaults(params, precision=None, out_sharding=None),
        )

    return _scaled_contraction(lhs, rhs, contract, k, preferred_element_type)


def _with_defaults(params: dict, **defaults: Any) -> dict:
    """Equation params with defaults for the ones a direct caller may omit
    (``Primitive.bind`` wants every parameter)."""
    out = dict(defaults)
    out.update(params)
    return out


@register_scaled_op(lax.dot_general_p)
def dot_general(
    lhs: Any, rhs: Any, *, dimension_numbers: Any, preferred_element_type: Any = None, **params: Any
) -> ScaledArray:
    """``dot_general``: see `scaled_dot_general` (data contracted in their own dtypes
    with float32 accumulation; ``pow2(sqrt(K))`` moved from data into scale, K the product
    of the contracted sizes; output scale ``sa * sb * pow2(sqrt(K))``). Batch dimensions,
    several contracting dimensions and every other parameter are forwarded as given."""
    return scaled_dot_general(
        lhs, rhs, dimension_numbers, preferred_element_type=preferred_element_type, **params
    )


def conv_fan_in(rhs_shape: Sequence[int], dimension_numbers: Any) -> int:
    """K of a convolution: the kernel's spatial size times its input features.

    The kernel's input-feature dimension already holds the features *per group*
    (``feature_group_count`` divides the input's features; with ``batch_group_count``
    every kernel sees all input features), so K is read off the kernel's shape alone.
    Positions in the padding or between dilated inputs contribute zeros, so K is an
    upper bound there (data then sits a little under unit variance)."""
    rhs_spec = _rhs_spec(rhs_shape, dimension_numbers)
    in_feature, spatial = rhs_spec[1], rhs_spec[2:]
    return int(rhs_shape[in_feature] * np.prod([rhs_shape[d] for d in spatial], dtype=np.int64))


def _rhs_spec(rhs_shape: Sequence[int], dimension_numbers: Any) -> Tuple[int, ...]:
    if dimension_numbers is None:  # default layout: (out, in, spatial...)
        return tuple(range(len(rhs_shape)))
    if hasattr(dimension_numbers, "rhs_spec"):
        return tuple(dimension_numbers.rhs_spec)
    return tuple(lax.conv_dimension_numbers((1,) * len(rhs_shape), rhs_shape, dimension_numbers).rhs_spec)


@register_scaled_op(lax.conv_general_dilated_p)
def conv_general_dilated(
    lhs: Any, rhs: Any, *, preferred_element_type: Any = None, **params: Any
) -> ScaledArray:
    """Convolution: data convolved in their own dtypes (float8 stays float8) with float32
    accumulation, divided by ``pow2(sqrt(K))`` with K the fan-in (kernel spatial size
    times input features per group, see `conv_fan_in`), rounded once to the output
    dtype; output scale ``sa * sb * pow2(sqrt(K))``. Strides, padding, dilations, group
    counts, dimension numbers and every other parameter are forwarded as given."""
    rhs_shape = np.shape(rhs.data if isinstance(rhs, ScaledArray) else rhs)
    k = conv_fan_in(rhs_shape, params.get("dimension_numbers"))

    def contract(ld: Any, rd: Any, acc_dtype: Any) -> Any:
        return lax.conv_general_dilated_p.bind(ld, rd, preferred_element_type=acc_dtype, **params)

    return _scaled_contraction(lhs, rhs, contract, k, preferred_element_type)


__all__ = [
    "scaled_dot_general",
    "contracted_size",
    "conv_fan_in",
    "fan_in_factor",
    "dot_general",
    "conv_general_dilated",
]
