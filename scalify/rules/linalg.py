"""Scaled rules of contractions: ``dot_general`` and ``conv_general_dilated``.

A contraction of unit-variance operands over K products has variance K. Both rules
compute the contraction on the operands' data *as stored* (float16, bfloat16 and float8
data stay in their format, so the hardware's narrow matmul units do the work) with
float32 accumulation, divide the result by ``pow2(sqrt(K))`` in float32 and round once to
the output dtype; the output scale is ``lhs.scale * rhs.scale * pow2(sqrt(K))``. Data
therefore stays near unit variance (unit scaling), and every scale stays a power of two.
Inside scalify, a float32 result's division is left to the next rule (`Rescaled`), so
that a transpose in between stays foldable into the contraction.

Narrow data (float16, bfloat16, float8 operands and result) leave the contraction in a
narrow dtype, float32 accumulation staying inside it (`_reduction_dtype`): XLA's SPMD
partitioner sums a sharded contraction's partial results (every weight gradient under
data parallelism or FSDP) in the dot's output dtype, so this is what gradient
all-reduces and reduce-scatters move. float16 results get the division by
``pow2(sqrt(K))`` and a measured headroom before the dot, so that no partial sum can
overflow (`_narrow_contraction`); float8 products leave in bfloat16 (float32's range).

`scaled_dot_general` is the building block: the ``dot_general`` rule calls it, and so can
a policy that first casts the operands' data to float8 (a real float8 ``dot_general``
with float32 accumulation, which XLA lowers to an FP8 GEMM on hardware that has one).
"""
from __future__ import annotations

import functools
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scalify.core.datatype import ScaledArray
from scalify.core.config import get_config, narrow_contractions
from scalify.core.datatype import is_float_dtype
from scalify.core.operands import as_jax, cast, fit_to_format, is_narrow, promote, saturating_cast, scale_dtype, scale_mul, times_residual
from scalify.core.pow2 import exp2_int, exponent, pow2_round
from scalify.core.deferred import Deferred
from scalify.core.trace_state import data_factor
from scalify.core.registry import register_scaled_op

# Used by the solver/decomposition rules at the end of this module.
from jax.extend.core import primitives as _P  # noqa: E402
from scalify.core.interpreter import eval_closed_jaxpr  # noqa: E402
from scalify.core.operands import common_scale, compute_dtype, in_scale, one, scale_quotient  # noqa: E402
from scalify.core.pow2 import is_static  # noqa: E402


def _accumulation_dtype(*dtypes: Any) -> np.dtype:
    """float32, or float64 when an operand or the output is float64."""
    return np.dtype(np.float64 if any(np.dtype(d).itemsize > 4 for d in dtypes) else np.float32)


def fan_in_factor(k: int) -> np.ndarray:
    """``pow2(sqrt(k))`` as a static scale (1 for ``k <= 1``), rounded with the active
    `ScalifyConfig`'s rounding mode."""
    return pow2_round(np.sqrt(np.asarray(max(int(k), 1), scale_dtype())))


def _rescale(acc: Any, factor: Any, dtype: Any) -> Any:
    """``acc / factor`` (float32, exact for a power of two), rounded once to ``dtype``."""
    if factor != 1:
        acc = lax.mul(acc, np.asarray(1 / factor, acc.dtype))
    return saturating_cast(acc, dtype)


class Rescaled(Deferred):
    """A float32 contraction's result whose division by ``factor`` is still to do, at
    scale ``scale`` (data dtype ``dtype``).

    Why deferred: a weight gradient reaches the jaxpr as ``transpose(dot_general(...))``,
    which XLA computes as one contraction with its operands read transposed, as in the
    plain program. Divided at once, the result would sit between the two: XLA then
    copies the transposed result, or, dividing the smaller operand instead, makes a pass
    over that operand (it has other users, so the division cannot fuse into it). The
    `transpose` rule moves the result and keeps the division pending (`map_layout`); the
    next rule divides (`materialise`), in a multiplication XLA fuses into that rule's own
    kernel. Exact: the factor is a power of two.

    Only for float32 data: a narrower result is rounded to its dtype at once (the
    division rides along with that rounding); deferring that rounding measured slower
    on the float16 GPT step of `benchmarks/overhead.py`."""

    def __init__(self, acc: Any, factor: Any, dtype: Any, scale: Any):
        self.acc, self.factor, self.dtype, self.scale = acc, factor, dtype, scale

    def _materialise(self) -> ScaledArray:
        return ScaledArray(_rescale(self.acc, self.factor, self.dtype), self.scale)

    def map_layout(self, fn: Any) -> "Rescaled":
        """`Deferred.map_layout`: a same-scale operation commutes with the pending
        division by a power of two."""
        return Rescaled(fn(self.acc), self.factor, self.dtype, self.scale)

    def replace_scale(self, scale: Any) -> "Rescaled":
        """`Deferred.replace_scale`."""
        return Rescaled(self.acc, self.factor, self.dtype, scale)


def _scaled_contraction(
    lhs: Any, rhs: Any, contract: Any, k: int, out_type: Optional[Any],
    out_size: Optional[int] = None, deferred: bool = False,
) -> Any:
    """Shared body: promote operands, contract the data with float32 accumulation
    (``contract(ld, rd, acc_dtype)``), move ``pow2(sqrt(k))`` into the scale.
    ``out_size`` (the result's number of elements, when the caller knows it) allows
    dividing a smaller float32 operand instead of the result. With ``deferred`` (the
    rule inside the interpreter) the division of a float32 result is left to the
    result's consumer: a `Rescaled` value."""
    lhs, rhs = promote(lhs), promote(rhs)
    if out_type is None:
        out_type = _default_out_dtype(lhs.dtype, rhs.dtype)
    acc_dtype = _accumulation_dtype(lhs.dtype, rhs.dtype, out_type)
    factor = fan_in_factor(k)
    ld, rd = as_jax(lhs.data), as_jax(rhs.data)
    scale = scale_mul(lhs.scale, rhs.scale)
    if factor != 1:
        scale = scale_mul(scale, factor)
    red = _reduction_dtype(lhs.dtype, rhs.dtype, out_type)
    if red is not None:
        return _narrow_contraction(ld, rd, contract, k, factor, scale, np.dtype(out_type), red)
    same = {np.dtype(lhs.dtype), np.dtype(rhs.dtype), np.dtype(out_type)} == {acc_dtype}
    if deferred and factor != 1 and same:
        return Rescaled(contract(ld, rd, acc_dtype), factor, out_type, scale)
    if factor != 1 and out_size is not None and same:
        # Data already in the accumulation dtype: dividing an operand by the power of
        # two gives the same bits as dividing the result, so divide the smaller operand
        # when it is smaller than the result. Besides doing less work, this leaves the
        # contraction's output untouched, so XLA can still fold a following transpose
        # into the dot (as in every weight gradient) instead of copying the result.
        small = min((ld.size, 0), (rd.size, 1))
        if small[0] < out_size:
            inv = np.asarray(1 / factor, acc_dtype)
            ld, rd = (lax.mul(ld, inv), rd) if small[1] == 0 else (ld, lax.mul(rd, inv))
            return ScaledArray(contract(ld, rd, acc_dtype), scale)
    acc = contract(ld, rd, acc_dtype)
    if is_narrow(out_type):
        # Range guard: K correlated products sum to up to K (not sqrt(K)) times their
        # size, beyond float16's range for drifted or outlier data.
        if factor != 1:
            acc = lax.mul(acc, np.asarray(1 / factor, acc.dtype))
        return fit_to_format(acc, scale, out_type)
    return ScaledArray(_rescale(acc, factor, out_type), scale)


_F16, _BF16, _F32 = np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32)

# A contraction whose data are float16 leaves the dot with a bound on its size: the prescale
# keeps every partial sum (on each device of a sharded contraction, and their sum) at most
# 2**_HEADROOM_EXP, half of float16's largest power of two.
_HEADROOM_EXP = 15


def _reduction_dtype(a: Any, b: Any, out: Any) -> Optional[np.dtype]:
    """The dtype in which a contraction of narrow data leaves the ``dot_general`` (None: the
    wide path, float32 accumulation output then rounding).

    Why it matters: XLA's SPMD partitioner computes a contraction over a sharded dimension
    (every weight gradient under data parallelism: the batch is contracted) as one partial
    contraction per device and sums the partial results across devices in the *output*
    dtype of the ``dot_general``, before any conversion that follows it. A float32 output
    then moves twice the bytes of a bfloat16 program's gradients. So narrow data are
    contracted with float32 accumulation *inside* the dot but a narrow output:

    - float16 output with a float16/bfloat16 operand: float16, the operand prescaled so
      that no partial sum overflows (`_narrow_contraction`), where several devices may
      share the contraction (`scalify.core.config.narrow_contractions`); else None;
    - otherwise (bfloat16 output; float8 x float8 operands; float8 output): bfloat16,
      which has float32's exponent range, so nothing overflows where float32 does not;
      its 8 bits of precision are below the error of float8 operands.
    """
    dts = [np.dtype(a), np.dtype(b), np.dtype(out)]
    if not all(is_float_dtype(d) and d.itemsize <= 2 for d in dts):
        return None
    if dts[2] == _F16 and any(d.itemsize == 2 for d in dts[:2]):
        # On one device nothing is summed across devices, and the wide path is cheaper:
        # the float32 accumulator is rounded once by the output's guard, with no operand
        # measurement or prescale (`benchmarks/overhead.py` measures both).
        return _F16 if narrow_contractions() else None
    return _BF16


@functools.partial(jax.jit, static_argnums=2)
def _headroom(ma: Any, mb: Any, c: int) -> Tuple[Any, Any]:
    """``(e, 1/e)``: the power of two ``e <= 1`` that keeps ``K * ma * mb * e / factor``
    (a bound on every partial sum of the prescaled contraction) at most 2**_HEADROOM_EXP,
    from the operands' max-abs ``ma``, ``mb`` (float32 scalars) and ``c =
    ceil(log2(K / factor))``. Exponent arithmetic (exact, no overflow): ``ma < 2**(ea+1)``.
    1 for a zero operand or a non-finite max-abs (inf/NaN stay visible)."""
    ea, eb = exponent(ma), exponent(mb)
    k = jax.lax.sub(np.int32(_HEADROOM_EXP - 2 - c), jax.lax.add(ea, eb))
    k = jax.lax.clamp(np.int32(-100), k, np.int32(0))  # e / factor stays a normal float32
    finite = jax.lax.bitwise_and(jax.lax.lt(ea, np.int32(128)), jax.lax.lt(eb, np.int32(128)))
    k = jax.lax.select(finite, k, np.int32(0))
    return exp2_int(k, np.float32), exp2_int(jax.lax.neg(k), np.float32)


def _max_abs(x: Any) -> Any:
    """max |x| as a float32 scalar (exact: a maximum in the data's own dtype), no gradient."""
    x = jax.lax.stop_gradient(x)
    m = jax.lax.reduce_max(jax.lax.abs(x), tuple(range(x.ndim)))
    return cast(m, _F32)


def _narrow_contraction(
    ld: Any, rd: Any, contract: Any, k: int, factor: Any, scale: Any, out_type: np.dtype, red: np.dtype
) -> ScaledArray:
    """Contract narrow data with float32 accumulation into a ``red`` output (see
    `_reduction_dtype`), then divide by ``factor`` and range-guard at the output.

    float16 (``red``): the dot cannot hold a partial sum beyond 65504, so the division
    by ``factor`` and the guard's headroom are moved *before* it, into one operand:
    a float16/bfloat16 operand is multiplied by ``e / factor`` (a power of two:
    exact, in float32 then rounded back, except for elements that become float16
    subnormals, whose absolute error stays below ``2**-25 * factor / e`` in data units).
    The *larger* float16/bfloat16 operand is prescaled: in a layer that is the activation
    (or, in a weight gradient, one of two activations), never the weight, so a weight
    sharded over devices is gathered as it is stored, once for every product that uses
    it (a prescaled weight would be gathered once per product: its prescale differs), and
    on CPU the multiplication fuses into the conversion XLA makes for its float32 dot.
    With the range guard on, ``e <= 1`` comes from the operands' max-abs
    (`_headroom`): ``|sum of K products| <= K * max|a| * max|b|``, for every subset of the
    products too, so no partial sum on any device, nor their sum, exceeds 2**15. ``e < 1``
    only where the bound (not the result) passes 2**15: a large K with large max-abs
    (a weight gradient over many tokens, outlier features); the prescaled operand's
    absolute precision is then ``2**-25 * factor / e`` in data units, below its float16
    rounding of unit-size elements while ``K * max|a| * max|b| <= 2**28`` or so, and the
    result's own rounding (float16, at the dot's output) is unchanged.
    The guard itself then measures the float16 result (after XLA's cross-device sum, if
    any) at the static scale (``result / e``, in float32) and moves any excess into the
    scale, as for every narrow result (`fit_to_format`). With the guard off only
    ``1 / factor`` is moved (as before: a result beyond the static estimate overflows).

    bfloat16 (``red``): no prescale; the division and the guard follow the dot (in
    float32; for a bfloat16 output, a multiplication by the power of two in bfloat16).

    A factor that is not a power of two (`Pow2RoundMode.NONE`) is split into its power of
    two (moved before the dot) and a residual in ``[1, 2)`` (divided after it)."""
    f = float(factor)
    f2 = float(2.0 ** np.floor(np.log2(f))) if f > 0 else 1.0
    res = f / f2  # 1 for a power of two
    guard = is_narrow(out_type) and get_config().range_guard
    if red == _F16:
        inv_e: Any = None
        p: Any = np.float32(1 / f2)
        if guard:
            c = int(np.ceil(np.log2(max(k / f2, 1.0))))
            e, inv_e = (data_factor(x) for x in _headroom(_max_abs(ld), _max_abs(rd), c))
            p = jax.lax.mul(e, p)
        if not (is_static(p) and p == 1):
            wide = [j for j, x in enumerate((ld, rd)) if np.dtype(x.dtype).itemsize == 2]
            i = max(wide, key=lambda j: (ld, rd)[j].size)  # the larger (lhs on a tie)
            x = (ld, rd)[i]
            x = cast(jax.lax.mul(cast(x, _F32), cast(p, _F32)), x.dtype)
            ld, rd = (x, rd) if i == 0 else (ld, x)
        acc = contract(ld, rd, _F16)
        if not guard:
            if res != 1:
                acc = cast(jax.lax.mul(cast(acc, _F32), np.float32(1 / res)), _F16)
            return ScaledArray(saturating_cast(acc, out_type), scale)
        data = jax.lax.mul(cast(acc, _F32), inv_e)  # the value at the static scale
        if res != 1:
            data = jax.lax.mul(data, np.float32(1 / res))
        return fit_to_format(data, scale, out_type)
    acc = contract(ld, rd, red)
    if out_type == red:
        if res != 1:  # not a power of two: divide in float32, round once
            return ScaledArray(cast(jax.lax.mul(cast(acc, _F32), np.float32(1 / f)), red), scale)
        return ScaledArray(acc if f == 1 else jax.lax.mul(acc, np.asarray(1 / f, red)), scale)
    data = cast(acc, _F32)
    if f != 1:
        data = jax.lax.mul(data, np.float32(1 / f))
    if guard:
        return fit_to_format(data, scale, out_type)
    return ScaledArray(saturating_cast(data, out_type), scale)


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
    ``dot_general``) with float32 accumulation whatever the output dtype. The sum of K
    products of unit-variance data has variance K, so the accumulator is divided by
    ``pow2(sqrt(K))`` (exact) and rounded once to the output dtype (saturating for
    float8 outputs), and the output scale is ``lhs.scale * rhs.scale * pow2(sqrt(K))``
    (a product of powers of two). When operands and result are all narrower than
    float32, the ``dot_general`` itself outputs a narrow dtype (``preferred_element_type``
    float16 or bfloat16, see `_reduction_dtype` and `_narrow_contraction`), so that a
    contraction XLA splits across devices is summed across them in that dtype. The output
    scale is a float32 number: operand scales whose product leaves float32's range
    (beyond about 2^±126) are out of scope.
    """
    return _dot_general(lhs, rhs, dimension_numbers, preferred_element_type, False, **params)


def _dot_general(
    lhs: Any, rhs: Any, dimension_numbers: Any, preferred_element_type: Optional[Any],
    deferred: bool, **params: Any,
) -> Any:
    """`scaled_dot_general`'s body. With ``deferred`` (the ``dot_general`` rule, whose
    result the interpreter hands on) a float32 result may be `Rescaled`; without, it is
    always a ScaledArray."""
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

    lshape = np.shape(lhs.data if isinstance(lhs, ScaledArray) else lhs)
    rshape = np.shape(rhs.data if isinstance(rhs, ScaledArray) else rhs)
    free = [n for d, n in enumerate(lshape) if d not in lc and d not in lb]
    free += [n for d, n in enumerate(rshape) if d not in rc and d not in rb]
    out_size = int(np.prod([lshape[d] for d in lb] + free, dtype=np.int64))
    return _scaled_contraction(lhs, rhs, contract, k, preferred_element_type, out_size, deferred)


def _with_defaults(params: dict, **defaults: Any) -> dict:
    """Equation params with defaults for the ones a direct caller may omit
    (``Primitive.bind`` wants every parameter)."""
    out = dict(defaults)
    out.update(params)
    return out


@register_scaled_op(lax.dot_general_p)
def dot_general(
    lhs: Any, rhs: Any, *, dimension_numbers: Any, preferred_element_type: Any = None, **params: Any
) -> Any:
    """``dot_general``: see `scaled_dot_general` (data contracted in their own dtypes
    with float32 accumulation; ``pow2(sqrt(K))`` moved from data into scale, K the product
    of the contracted sizes; output scale ``sa * sb * pow2(sqrt(K))``). Batch dimensions,
    several contracting dimensions and every other parameter are forwarded as given. When
    operands and result are float32 (or float64) and K > 1, the result is `Rescaled`: its
    division by ``pow2(sqrt(K))`` waits for the next rule (``.materialise()`` gives the
    ScaledArray). A float16 or float8 result is range-guarded (`fit_to_format`): K
    correlated products sum to up to K, not sqrt(K), times their size."""
    return _dot_general(lhs, rhs, dimension_numbers, preferred_element_type, True, **params)


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
    counts, dimension numbers and every other parameter are forwarded as given. A float16
    or float8 result is range-guarded (`fit_to_format`), as for `dot_general`."""
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


# --- solvers and decompositions ------------------------------------------------------------
#
# Decompositions of a scaled matrix ``A = s * D`` are decompositions of its data ``D``
# with the scale moved to the factor that is linear in ``A``: ``QR(sD) = Q (sR)``,
# ``svd(sD) = U (sS) V^T``, ``eigh(sD) = V diag(sW) V^T``, ``schur(sD) = Z (sT) Z^T``,
# ``cholesky(sD) = sqrt(s) chol(D)``; orthogonal factors keep unit scale (their
# entries are at most 1 in magnitude). Solves divide scales: ``(sa A)^-1 (sb b) =
# (sb / sa) A^-1 b``. XLA's CPU decompositions work in float32 and wider, so data
# narrower than float32 are widened (exact), decomposed, and each output rounded once
# to the data dtype. Every scale is a product or ratio of the inputs' powers of two
# (clamped to float32's normal range, the excess going into the data), or the power of
# two of a square root.


def _data32(x: ScaledArray) -> Any:
    """The data widened to the compute dtype (float32, or float64 for float64 data)."""
    return as_jax(x.data).astype(compute_dtype(x.dtype))


@register_scaled_op(lax.linalg.triangular_solve_p)
def triangular_solve(a: Any, b: Any, *, unit_diagonal: bool = False, **params: Any) -> ScaledArray:
    """``x = op(A)^-1 b`` (or ``b op(A)^-1``) at scale ``sb / sa``: the solve of the data
    (widened to float32) is exact algebra, ``(sa A)^-1 (sb b) = (sb/sa) A^-1 b``. With
    ``unit_diagonal`` the diagonal is 1 in *value*, not in data, so ``A``'s unscaled
    values are used in float32 and ``x`` keeps ``b``'s scale ``sb``. Every parameter
    (side, lower, transpose, conjugate) is forwarded."""
    a, b = promote(a), promote(b)
    db = _data32(b)
    if unit_diagonal:
        da = in_scale(a, one(), db.dtype)
        scale, r = b.scale, None
    else:
        da = _data32(a)
        scale, r = scale_quotient(b.scale, a.scale)
    x = lax.linalg.triangular_solve_p.bind(da, db, unit_diagonal=unit_diagonal, **params)
    return ScaledArray(saturating_cast(times_residual(x, r), b.dtype), scale)


def _pow2_sqrt(s: Any) -> Any:
    """``pow2(sqrt(s))`` of a positive scale, exact for powers of two: with
    ``s = m * 2**k`` (``m`` in [1, 2)), ``sqrt(s) = sqrt(m * 2**(k % 2)) * 2**(k // 2)``,
    so only a number in [1, 2.9) goes through ``sqrt`` (whose device implementation
    may round ``sqrt(2**-40)`` just below ``2**-20``). NumPy for a static scale."""
    mod = np if is_static(s) else jnp
    m, e = mod.frexp(mod.asarray(s, scale_dtype()))  # s = m * 2**e, m in [0.5, 1)
    k = e - 1
    half = k // 2
    t = mod.sqrt(2 * m * mod.where(k - 2 * half == 1, 2, 1).astype(m.dtype))
    return mod.ldexp(pow2_round(t), half).astype(scale_dtype())


@register_scaled_op(lax.linalg.cholesky_p)
def cholesky(a: Any, **params: Any) -> ScaledArray:
    """``chol(A)`` at scale ``p = pow2(sqrt(sa))``, as ``sqrt``: ``chol(sa D) =
    sqrt(sa) chol(D)``, so the data are ``chol(D * sa / p**2)`` (``sa / p**2`` is 1 or 2
    for a power-of-two ``sa``), computed in float32 and rounded once."""
    a = promote(a)
    s = a.scale
    p = _pow2_sqrt(s)
    r = (s / p) / p
    d = _data32(a) * (r if is_static(r) else jnp.asarray(r, compute_dtype(a.dtype)))
    out = lax.linalg.cholesky_p.bind(d.astype(compute_dtype(a.dtype)), **params)
    return ScaledArray(saturating_cast(out, a.dtype), p)


def _factors(a: ScaledArray, outs: Sequence[Any], scaled: Sequence[bool]) -> List[Any]:
    """Outputs of a decomposition of ``a``'s data as ScaledArrays: float outputs at
    ``a``'s scale where ``scaled``, at scale 1 otherwise (orthogonal factors); integer
    outputs (pivots, permutations) plain."""
    res = []
    for o, sc in zip(outs, scaled):
        if not jnp.issubdtype(o.dtype, jnp.floating):
            res.append(o)
        else:
            res.append(ScaledArray(saturating_cast(o, a.dtype), a.scale if sc else one()))
    return res


@register_scaled_op(lax.linalg.qr_p)
def qr(a: Any, **params: Any) -> List[Any]:
    """``A = Q R``: ``Q`` (orthogonal) at scale 1 and ``R`` at ``A``'s scale, since
    ``QR(s D) = Q (s R_D)``; the decomposition of the data runs in float32. Column
    pivots (``pivoting=True``) are plain integers."""
    a = promote(a)
    outs = lax.linalg.qr_p.bind(_data32(a), **params)
    return _factors(a, outs, [False, True, False])


@register_scaled_op(lax.linalg.svd_p)
def svd(a: Any, **params: Any) -> List[Any]:
    """``A = U diag(S) V^T``: singular values ``S`` at ``A``'s scale, ``U`` and ``V^T``
    (orthogonal) at scale 1, since ``svd(s D) = U (s S_D) V^T``; computed on the data in
    float32."""
    a = promote(a)
    outs = lax.linalg.svd_p.bind(_data32(a), **params)
    return _factors(a, outs, [True] + [False] * (len(outs) - 1))


@register_scaled_op(lax.linalg.eigh_p)
def eigh(a: Any, **params: Any) -> List[Any]:
    """Symmetric eigendecomposition ``A = V diag(W) V^T``: eigenvalues ``W`` at ``A``'s
    scale and eigenvectors ``V`` (orthonormal) at scale 1, since the eigenvectors of
    ``s D`` are those of ``D`` with eigenvalues times ``s``; computed on the data in
    float32."""
    a = promote(a)
    v, w = lax.linalg.eigh_p.bind(_data32(a), **params)
    return _factors(a, [v, w], [False, True])


@register_scaled_op(lax.linalg.schur_p)
def schur(a: Any, **params: Any) -> List[Any]:
    """Real Schur form ``A = Z T Z^T``: ``T`` at ``A``'s scale and the Schur vectors
    ``Z`` (orthogonal) at scale 1, since ``schur(s D) = Z (s T_D) Z^T``; computed on the
    data in float32 (XLA implements it on CPU only)."""
    a = promote(a)
    outs = lax.linalg.schur_p.bind(_data32(a), **params)
    return _factors(a, outs, [True] + [False] * (len(outs) - 1))


@register_scaled_op(lax.linalg.householder_product_p)
def householder_product(a: Any, taus: Any, **params: Any) -> ScaledArray:
    """The orthogonal matrix ``Q`` of Householder reflectors ``(a, taus)`` (as returned
    by a QR or Hessenberg factorization). Reflectors are scale-free by construction (unit
    leading entry, ``tau`` in [1, 2]), so they are read as values in float32 and ``Q``,
    orthogonal, has scale 1."""
    dtype = np.dtype(a.dtype)
    cd = compute_dtype(dtype)
    out = lax.linalg.householder_product_p.bind(
        in_scale(a, one(), cd), in_scale(taus, one(), cd), **params
    )
    return ScaledArray(saturating_cast(out, dtype), one())


@register_scaled_op(lax.linalg.tridiagonal_solve_p)
def tridiagonal_solve(dl: Any, d: Any, du: Any, b: Any, **params: Any) -> ScaledArray:
    """Solve ``T x = b`` for a tridiagonal ``T`` given by its three diagonals: the
    diagonals are one matrix, so they are aligned to their largest scale ``st``
    (scale-free ones, e.g. zeros, adopt it) in float32; ``x`` has scale ``sb / st``
    (``(st T)^-1 (sb b) = (sb/st) T^-1 b``)."""
    b = promote(b)
    st = common_scale(dl, d, du)
    cd = compute_dtype(b.dtype)
    diags = [in_scale(v, st, cd) for v in (dl, d, du)]
    scale, r = scale_quotient(b.scale, st)
    x = lax.linalg.tridiagonal_solve_p.bind(*diags, _data32(b), **params)
    return ScaledArray(saturating_cast(times_residual(x, r), b.dtype), scale)


@register_scaled_op(_P.linear_solve_p)
def custom_linear_solve(*operands: Any, const_lengths: Any, jaxprs: Any, **params: Any) -> List[Any]:
    """`lax.custom_linear_solve` (``jnp.linalg.solve`` and ``jax.scipy`` solvers, CG,
    GMRES...): its value is ``solve(matvec, b)``, so the scalified ``solve`` jaxpr is
    run on the right-hand side (each operation inside with its own rule). When `jax.grad`
    runs inside ``scalify`` the jaxpr already holds the transposed solves; when
    ``scalify(f)`` is differentiated from outside, JAX differentiates the solver's
    operations (exact for direct solvers; use `jax.grad` inside ``scalify`` for
    iterative solvers built on ``while_loop``)."""
    fields = list(const_lengths._fields)
    offset = sum(getattr(const_lengths, f) for f in fields[: fields.index("solve")])
    n_consts = sum(getattr(const_lengths, f) for f in fields)
    solve_consts = operands[offset: offset + const_lengths.solve]
    return eval_closed_jaxpr(jaxprs.solve, *solve_consts, *operands[n_consts:])


__all__ += [
    "triangular_solve",
    "cholesky",
    "qr",
    "svd",
    "eigh",
    "schur",
    "householder_product",
    "tridiagonal_solve",
    "custom_linear_solve",
]
