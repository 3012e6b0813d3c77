"""Scaled rules of indexing primitives: gather/scatter, dynamic slices, sorts, scans
(cumulative ops) and windowed reductions (pooling and its gradients).

Most of these move data: the output keeps the input's scale and the data is moved as it
is (exact, in the data dtype). Where two scaled tensors meet in one output (scatter,
dynamic_update_slice) they are aligned to the *largest* scale, as select/concatenate do.
Where values are summed (scatter_add, cumsum, reduce_window_sum) the work is done in
float32 and rounded once to the output dtype. Index operands and index outputs are plain
integer arrays and stay plain. Comparisons (sort keys, max/min, the selection of pooling
gradients) run on the data: a scale is positive, so it never changes an order.
"""
from __future__ import annotations

import functools
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.operands import (
    as_jax,
    common_scale,
    compute_dtype,
    gather_aligned,
    gathered_result,
    in_scale,
    is_scale_free,
    one,
    promote,
    scale_dtype,
    scale_of,
    static_uniform_value,
)
from scalify.core.config import device_groups, narrow_contractions
from scalify.core.operands import cast, fit_to_format
from scalify.core.pow2 import is_static, pow2_round, pow2_round_down, xnp
from scalify.core.registry import UnsupportedPrimitiveError, register_scaled_op
from scalify.core.range_guard import _guard_factor
from scalify.rules.linalg import _max_abs
from scalify.rules.reductions import _SUM_DOT, _sum_by_dot


# --- small local helpers ---------------------------------------------------------------


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype)


def _data(x: Any) -> Any:
    """The array a data-movement op acts on: a ScaledArray's data, or the plain array."""
    return x.data if isinstance(x, ScaledArray) else as_jax(x)


def _scale_or_one(x: Any) -> Any:
    s = scale_of(x)
    return one() if s is None else s


def _maximum(a: Any, b: Any) -> Any:
    return xnp(a, b).maximum(a, b)


@functools.lru_cache(maxsize=None)
def _binary_jaxpr(fn: Any, dtype: np.dtype) -> tuple:
    """``(jaxpr, consts)`` of the scalar combiner ``fn(a, b)`` at ``dtype``: the
    ``update_jaxpr`` a scatter needs when it runs in another dtype than the equation's."""
    aval = jax.ShapeDtypeStruct((), dtype)
    closed = jax.make_jaxpr(fn)(aval, aval)
    return closed.jaxpr, tuple(closed.consts)


def _combiner_in(params: dict, fn: Any, dtype: np.dtype, eqn_dtype: np.dtype) -> dict:
    """A scatter's ``params`` with its combiner ``fn`` rebuilt at ``dtype`` when the
    scatter runs in another dtype than the equation's ``eqn_dtype``."""
    if np.dtype(dtype) == np.dtype(eqn_dtype):
        return params
    jaxpr, consts = _binary_jaxpr(fn, np.dtype(dtype))
    return dict(params, update_jaxpr=jaxpr, update_consts=consts)


# --- gather ----------------------------------------------------------------------------


@register_scaled_op(lax.gather_p)
def gather(operand: Any, indices: Any, *, fill_value: Any = None, mode: Any = None, **params: Any) -> ScaledArray:
    """``x[idx]``, `jnp.take`, `take_along_axis`, embedding lookups: data movement, the
    output keeps the operand's scale; indices are plain integers.

    The out-of-bounds fill of ``mode=FILL_OR_DROP`` is a *value*, so it must be expressed
    in the output's scale:

    - ``None`` (NaN for floats), NaN, 0 and +-inf read the same in every scale: passed on
      unchanged, the scale is kept;
    - a finite non-zero fill ``c`` joins the output like a concatenated constant: the
      output scale is the largest of the operand's and ``pow2(|c|)``. When that is the
      operand's (static) scale and ``c / scale`` fits the data dtype, ``c / scale`` is
      simply the gather's fill; otherwise the gathered data is rescaled in float32 and
      the fill is put in place with an in-bounds mask (a gather of ones with the same
      indices), so a traced scale works too.
    """
    x = promote(operand)
    idx = as_jax(indices)
    dtype = _dtype(x)
    uses_fill = mode == lax.GatherScatterMode.FILL_OR_DROP
    if not uses_fill or fill_value is None or is_scale_free(np.asarray(fill_value, np.float32)):
        out = lax.gather_p.bind(x.data, idx, fill_value=fill_value, mode=mode, **params)
        return ScaledArray(out, x.scale)

    fill = np.asarray(fill_value, scale_dtype())
    s_out = _maximum(x.scale, pow2_round_down(np.abs(fill)))
    if is_static(s_out) and is_static(x.scale) and s_out == x.scale:
        fill_data = fill / x.scale
        if np.isfinite(np.asarray(fill_data).astype(dtype)):
            out = lax.gather_p.bind(x.data, idx, fill_value=float(fill_data), mode=mode, **params)
            return ScaledArray(out, x.scale)
    cd = compute_dtype(dtype)
    data = lax.gather_p.bind(x.data, idx, fill_value=0, mode=mode, **params)
    inside = lax.gather_p.bind(
        lax.full(x.shape, True, np.bool_), idx, fill_value=False, mode=mode, **params
    )
    data = in_scale(ScaledArray(data, x.scale), s_out, cd)
    filled = jnp.where(inside, data, (jnp.asarray(fill, cd) / jnp.asarray(s_out, cd)).astype(cd))
    return ScaledArray(filled.astype(dtype), s_out)


# --- scatter ---------------------------------------------------------------------------


def _scatter_aligned(prim: Any, operand: Any, indices: Any, updates: Any, params: dict, fn: Any = None) -> ScaledArray:
    """Operand and updates aligned to the largest scale (`gather_aligned`); ``fn`` the
    scatter's combiner (min, max), rebuilt in float32 when they are aligned there."""
    s, (od, ud), mixed = gather_aligned((operand, updates))
    if fn is not None:
        params = _combiner_in(params, fn, od.dtype, _dtype(operand))
    out = prim.bind(od, as_jax(indices), ud, **params)
    return gathered_result(out, s, _dtype(operand), mixed)


@register_scaled_op(lax.scatter_p)
def scatter(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].set(u)``: every output element is an operand or an update element, so
    both are aligned to the largest of their scales (as `select` does) and the scatter
    runs on the aligned data in the data dtype (power-of-two rescaling: exact); at
    distinct traced scales of a narrow format, as `concatenate` (`gather_aligned`). A
    scale-free operand (``zeros.at[i].set(u)``) adopts the updates' scale. A custom
    update function (``x.at[i].apply(f)``) is not supported on scaled operands."""
    if params.get("update_jaxpr") is not None:
        raise UnsupportedPrimitiveError(
            "scalify: `scatter` with a custom update function (`x.at[i].apply(f)`) on a "
            "ScaledArray is not supported; unscale with `scalify.asarray` first."
        )
    return _scatter_aligned(lax.scatter_p, operand, indices, updates, params)


@register_scaled_op(lax.scatter_min_p)
def scatter_min(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].min(u)``: aligned to the largest scale as `scatter`; the minimum of
    aligned data is the minimum of the values (same positive scale), exact."""
    return _scatter_aligned(lax.scatter_min_p, operand, indices, updates, params, lax.min)


@register_scaled_op(lax.scatter_max_p)
def scatter_max(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].max(u)``: aligned to the largest scale as `scatter`, exact."""
    return _scatter_aligned(lax.scatter_max_p, operand, indices, updates, params, lax.max)


def _scatter_accumulate(prim: Any, fn: Any, operand: Any, indices: Any, updates: Any, params: dict) -> ScaledArray:
    s = common_scale(operand, updates)
    dtype = _dtype(operand)
    cd = compute_dtype(dtype)
    params = _combiner_in(params, fn, cd, dtype)
    od, idx, ud = in_scale(operand, s, cd), as_jax(indices), in_scale(updates, s, cd)
    groups = _scatter_groups(ud, params) if dtype in _SUM_DOT and narrow_contractions() else 1
    if groups > 1:
        zero = static_uniform_value(operand) == 0
        return _grouped_scatter(prim, od, idx, ud, s, dtype, groups, params, zero)
    out = prim.bind(od, idx, ud, **params)
    # Duplicated indices sum up to (number of updates) terms: range-guarded.
    return fit_to_format(out, s, dtype)



def _scatter_groups(ud: Any, params: dict) -> int:
    """How many groups `_grouped_scatter` splits the updates into: the largest divisor of
    the updates' leading dimension that divides the device count, when that dimension is
    a scatter (not window) dimension of a scatter without batching dimensions; else 1."""
    dn = params["dimension_numbers"]
    if ud.ndim == 0 or 0 in dn.update_window_dims or dn.operand_batching_dims:
        return 1
    return device_groups(ud.shape[0])


def _grouped_scatter(prim: Any, od: Any, idx: Any, ud: Any, s: Any, dtype: np.dtype, g: int,
                     params: dict, zero_operand: bool) -> ScaledArray:
    """A scatter-add/sub of 16-bit data for sums that devices share
    (`ScalifyConfig.narrow_contractions`): the updates are split along their leading
    dimension into ``g`` groups, each scattered in float32 into its own copy of the
    operand, and the ``g`` partial results are summed by a contraction with a 16-bit
    output (`reductions._sum_by_dot`).

    Why: XLA's SPMD partitioner scatters each device's part of a batch-sharded update
    on its own and sums the partial results across devices in the scatter's dtype (an
    embedding's gradient): a float32 scatter moves twice a 16-bit program's bytes, and a
    float16 scatter rounds every addition (a token seen 2048 times stops growing). Split
    along the batch, each device's groups are summed in float32; only their per-group
    totals are rounded to 16 bits (once, after moving their max-abs to 2**14: no
    overflow) and cross devices in 16 bits. The operand is added in one group only.
    Memory: ``g`` copies of the operand, ``g / (devices sharing the batch)`` of them on
    each device. The result is range-guarded."""
    ug = ud.reshape((g, ud.shape[0] // g) + ud.shape[1:])
    ig = idx.reshape((g, idx.shape[0] // g) + idx.shape[1:])
    if zero_operand:  # a gradient's scatter into zeros: every group starts from zeros
        base = jnp.zeros((g,) + tuple(od.shape), np.float32)
    else:
        base = lax.pad(od[None], np.float32(0), [(0, g - 1, 0)] + [(0, 0, 0)] * od.ndim)
    parts = jax.vmap(lambda o, i, u: prim.bind(o, i, u, **params))(base, ig, ug)
    m, inv = _guard_factor(_max_abs(parts), np.float32(0), np.float32(0), 14)
    total, c = _sum_by_dot(cast(lax.mul(parts, inv), dtype), (0,), g)
    return fit_to_format(lax.mul(total, lax.mul(m, np.float32(1 / c))), s, dtype)


@register_scaled_op(lax.scatter_add_p)
def scatter_add(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].add(u)`` (and the gradient of every gather: an embedding's backward is
    a scatter-add of the cotangents into zeros). Operand and updates are aligned to the
    largest of their scales; the additions run in float32 (duplicated indices accumulate
    without float16 rounding) and the result is rounded once to the data dtype and
    range-guarded (``n`` duplicates sum to up to ``n`` times their size). Where devices
    share the sum (`ScalifyConfig.narrow_contractions`), 16-bit data is scattered in
    groups whose totals cross devices in 16 bits (`_grouped_scatter`).

    The largest scale, rather than moving ``sqrt(#duplicates)`` into the scale, because
    the number of duplicates is data dependent; for two terms it equals add's
    ``pow2(sqrt(sa**2 + sb**2))`` up to one rounding step."""
    return _scatter_accumulate(lax.scatter_add_p, lax.add, operand, indices, updates, params)


@register_scaled_op(lax.scatter_sub_p)
def scatter_sub(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].subtract(u)``: scaled as `scatter_add` (largest scale, float32 work)."""
    return _scatter_accumulate(lax.scatter_sub_p, lax.sub, operand, indices, updates, params)


@register_scaled_op(lax.scatter_mul_p)
def scatter_mul(operand: Any, indices: Any, updates: Any, **params: Any) -> ScaledArray:
    """``x.at[i].mul(u)``. Untouched elements keep magnitude ``s_x``; updated elements
    become ``x * u``, of magnitude ``s_x * s_u``. One scale serves both, so it is the
    larger of the two magnitudes (the 'align to the largest' rule):
    ``s_out = s_x * max(1, s_u)``, a product of powers of two, exact.

    Data: the operand is rescaled to ``s_out`` (by ``1 / max(1, s_u)``, a power of two)
    and multiplied by the updates' *values* ``d_u * s_u`` in float32, then rounded once;
    this is exact for every element hit once. With duplicated indices an element is
    multiplied by several updates and its magnitude may leave the static scale's reach:
    the result is range-guarded (`fit_to_format`). A scale-free operand or updates (0, inf, NaN) count as scale 1."""
    s_x = _scale_or_one(operand)
    s_u = _scale_or_one(updates)
    s_out = s_x * _maximum(one(), s_u)
    dtype = _dtype(operand)
    cd = compute_dtype(dtype)
    params = _combiner_in(params, lax.mul, cd, dtype)
    out = lax.scatter_mul_p.bind(
        in_scale(operand, s_out, cd), as_jax(indices), in_scale(updates, one(), cd), **params
    )
    return fit_to_format(out, s_out, dtype)


# --- dynamic slices --------------------------------------------------------------------


@register_scaled_op(lax.dynamic_slice_p)
def dynamic_slice(operand: Any, *indices: Any, **params: Any) -> ScaledArray:
    """`lax.dynamic_slice`: data movement, the scale is kept; indices are plain."""
    x = promote(operand)
    out = lax.dynamic_slice_p.bind(x.data, *[as_jax(i) for i in indices], **params)
    return ScaledArray(out, x.scale)


@register_scaled_op(lax.dynamic_update_slice_p)
def dynamic_update_slice(operand: Any, update: Any, *indices: Any, **params: Any) -> ScaledArray:
    """`lax.dynamic_update_slice`: the output holds operand and update elements, so both
    are aligned to the largest of their scales (exact power-of-two rescaling in the data
    dtype). A scale-free operand (zeros) adopts the update's scale. At distinct traced
    scales of a narrow format, as `concatenate` (`gather_aligned`)."""
    s, (od, ud), mixed = gather_aligned((operand, update))
    out = lax.dynamic_update_slice_p.bind(od, ud, *[as_jax(i) for i in indices], **params)
    return gathered_result(out, s, _dtype(operand), mixed)


# --- sorting ---------------------------------------------------------------------------


@register_scaled_op(lax.sort_p)
def sort(*operands: Any, **params: Any) -> List[Any]:
    """`lax.sort` of one or several operands (`jnp.sort`, `argsort`, sort by keys with
    ``num_keys``): every operand is sorted as data and keeps its own scale.

    A key's elements share one positive scale, so sorting its data gives the order of its
    values (NaNs last, as JAX does). Lexicographic multi-key sorts compare each key only
    with itself, never one operand with another, so no alignment across operands is
    needed. Plain operands (an argsort's iota, integer payloads) stay plain."""
    outs = lax.sort_p.bind(*[_data(x) for x in operands], **params)
    return [ScaledArray(o, x.scale) if isinstance(x, ScaledArray) else o for x, o in zip(operands, outs)]


@register_scaled_op(lax.top_k_p)
def top_k(operand: Any, **params: Any) -> List[Any]:
    """`lax.top_k`: the values keep the operand's scale (their order is the data's, the
    scale being positive); the indices are plain."""
    x = promote(operand)
    values, idx = lax.top_k_p.bind(x.data, **params)
    return [ScaledArray(values, x.scale), idx]


@register_scaled_op(lax.approx_top_k_p)
def approx_top_k(operand: Any, *rest: Any, **params: Any) -> List[Any]:
    """`lax.approx_max_k` / `approx_min_k`: as `top_k` (values scaled, indices plain)."""
    x = promote(operand)
    values, idx = lax.approx_top_k_p.bind(x.data, *[as_jax(r) for r in rest], **params)
    return [ScaledArray(values, x.scale), idx]


# --- cumulative ops --------------------------------------------------------------------


@register_scaled_op(lax.cumsum_p)
def cumsum(operand: Any, *, axis: int, **params: Any) -> ScaledArray:
    """`jnp.cumsum` over ``N`` elements: computed in float32, output scale
    ``s * pow2(sqrt(N))`` (a static factor).

    Element ``n`` sums ``n`` terms, so for unit-variance inputs it grows like
    ``sqrt(n)`` (like ``n`` when the terms share a sign, e.g. probabilities). Moving
    ``pow2(sqrt(N))`` into the scale is `reduce_sum`'s choice: the last element, which
    *is* the reduce_sum, lands at unit variance; the first ones at ``1/sqrt(N)``,
    comfortably normal in float16 for any realistic ``N``; a same-sign cumsum of
    ``N`` unit terms ends at ``sqrt(N)`` in data instead of ``N`` (no float16 overflow
    before ``N ~ 4e9``). The gradient, a reverse cumsum over the same axis, gets the same
    factor."""
    x = promote(operand)
    n = x.shape[axis]
    s_out = x.scale * pow2_round(np.asarray(np.sqrt(max(n, 1)), scale_dtype()))
    data = in_scale(x, s_out, compute_dtype(x.dtype))
    out = lax.cumsum_p.bind(data, axis=axis, **params)
    return ScaledArray(out.astype(x.dtype), s_out)


@register_scaled_op(lax.cummax_p)
def cummax(operand: Any, **params: Any) -> ScaledArray:
    """`lax.cummax`: each output is an input element, so data movement: the scale is
    kept (a positive scale does not change which element is largest)."""
    x = promote(operand)
    return ScaledArray(lax.cummax_p.bind(x.data, **params), x.scale)


@register_scaled_op(lax.cummin_p)
def cummin(operand: Any, **params: Any) -> ScaledArray:
    """`lax.cummin`: data movement, the scale is kept (as `cummax`)."""
    x = promote(operand)
    return ScaledArray(lax.cummin_p.bind(x.data, **params), x.scale)


@register_scaled_op(lax.cumprod_p)
def cumprod(operand: Any, *, axis: int, reverse: bool = False, **params: Any) -> ScaledArray:
    """`jnp.cumprod` over ``N`` elements. A product of ``c`` terms has scale ``s**c``
    (``c = 1 .. N``): one output spans magnitudes ``s .. s**N``, which no single scale
    holds unless ``s = 1``. As in a concatenation, the output takes the largest:
    ``s_out = s**N`` if ``s >= 1`` else ``s`` (computed on the exponent, so a power of
    two; clamped to float32's normal range). Elements far below it underflow in the
    data, as when concatenating tensors of very different scales.

    Data: ``cumprod(d)`` in float32 times ``s**c / s_out`` (per position; an exact power
    of two for a power-of-two ``s``: ``ldexp(1, k*c - E)``), rounded once. With
    ``s = 1`` (discount factors, probabilities) it is the plain cumprod of the data."""
    x = promote(operand)
    n = x.shape[axis]
    cd = compute_dtype(x.dtype)
    mod = xnp(x.scale)
    m, k = mod.frexp(mod.asarray(x.scale, np.float32))  # s = m * 2**k, m in [0.5, 1)
    m, k = m * 2, k - 1  # m in [1, 2): exactly 1 for a power of two
    e_out = mod.clip(mod.where(k >= 0, k * n, k), -126, 127)
    s_out = mod.ldexp(np.float32(1), e_out).astype(scale_dtype())
    data = lax.cumprod_p.bind(x.data.astype(cd), axis=axis, reverse=reverse, **params)
    if not (is_static(x.scale) and x.scale == 1):
        pos = lax.broadcasted_iota(np.int32, x.shape, axis)
        count = (n - pos) if reverse else (pos + 1)  # number of factors of each output
        mant = jnp.power(jnp.asarray(m, cd), count.astype(cd))  # 1 for a power of two
        data = data * jnp.ldexp(mant, jnp.asarray(k, np.int32) * count - jnp.asarray(e_out, np.int32))
    return ScaledArray(data.astype(x.dtype), s_out)


@register_scaled_op(lax.cumlogsumexp_p)
def cumlogsumexp(operand: Any, **params: Any) -> ScaledArray:
    """`lax.cumlogsumexp`: a non-linear scan, computed on the unscaled values in float32.
    Each output lies within ``[max_i x_i, max_i x_i + log N]``: of the inputs' magnitude
    when the scale is large, of order ``log N`` (<~ 30) when it is small. The output
    scale is ``max(s, 1)``, which holds both without overflow."""
    x = promote(operand)
    cd = compute_dtype(x.dtype)
    s_out = _maximum(x.scale, one())
    out = lax.cumlogsumexp_p.bind(in_scale(x, one(), cd), **params)
    return ScaledArray((out / jnp.asarray(s_out, cd)).astype(x.dtype), s_out)


# --- windowed reductions (pooling) ------------------------------------------------------


@register_scaled_op(lax.reduce_window_sum_p)
def reduce_window_sum(operand: Any, *, window_dimensions: Sequence[int], **params: Any) -> ScaledArray:
    """Sum pooling (and avg pooling, a sum divided by the window size): computed in
    float32, output scale ``s * pow2(sqrt(W))`` with ``W = prod(window_dimensions)``,
    `reduce_sum`'s unit-scaling choice for a sum of ``W`` terms (static factor)."""
    x = promote(operand)
    w = int(np.prod(window_dimensions, dtype=np.int64))
    s_out = x.scale * pow2_round(np.asarray(np.sqrt(max(w, 1)), scale_dtype()))
    data = in_scale(x, s_out, compute_dtype(x.dtype))
    out = lax.reduce_window_sum_p.bind(data, window_dimensions=window_dimensions, **params)
    return ScaledArray(out.astype(x.dtype), s_out)


@register_scaled_op(lax.reduce_window_max_p)
def reduce_window_max(operand: Any, **params: Any) -> ScaledArray:
    """Max pooling: each output is an input element (or the -inf padding, scale-free),
    so the scale is kept and the data pooled as it is (exact)."""
    x = promote(operand)
    return ScaledArray(lax.reduce_window_max_p.bind(x.data, **params), x.scale)


@register_scaled_op(lax.reduce_window_min_p)
def reduce_window_min(operand: Any, **params: Any) -> ScaledArray:
    """Min pooling: as `reduce_window_max`, the scale is kept."""
    x = promote(operand)
    return ScaledArray(lax.reduce_window_min_p.bind(x.data, **params), x.scale)


@register_scaled_op(lax.reduce_window_p)
def reduce_window(*operands: Any, jaxpr: Any, consts: Any, **params: Any) -> List[Any]:
    """Generic `lax.reduce_window` (any reducer: products, argmax pairs, a max with a
    non-identity init such as 0...). The reducer is arbitrary scalar code, so it runs on
    the *unscaled values* in float32: float operands and init values are unscaled to
    float32, the reducer is re-traced at float32, and each output ``i`` that comes from
    a scaled operand ``i`` is returned at the largest of operand ``i``'s scale and its
    init value's scale (the rule of a concatenation: the init joins the window).
    Magnitude-preserving reducers (max/min/select) and window sums are held well;
    products of many large-scale terms may overflow the data, as in `cumprod`. Integer
    operands (indices) and plain float operands stay plain."""
    n = len(operands) // 2
    xs, inits = operands[:n], operands[n:]

    def to_compute(v: Any) -> Any:
        if is_float_dtype(_dtype(v)):
            return in_scale(v, one(), compute_dtype(_dtype(v)))
        return as_jax(v)

    args = [to_compute(v) for v in operands]
    reducer = jaxpr_as_fun(ClosedJaxpr(jaxpr, list(consts)))
    scalars = [jax.ShapeDtypeStruct((), a.dtype) for a in args[:n]] * 2
    closed = jax.make_jaxpr(reducer)(*scalars)
    outs = lax.reduce_window_p.bind(*args, jaxpr=closed.jaxpr, consts=tuple(closed.consts), **params)
    results = []
    for x, init, o in zip(xs, inits, outs):
        dtype = _dtype(x)
        if isinstance(x, ScaledArray):
            s = common_scale(x, init)
            results.append(ScaledArray((o / jnp.asarray(s, o.dtype)).astype(dtype), s))
        else:
            results.append(o.astype(dtype))
    return results


@register_scaled_op(lax.select_and_scatter_add_p)
def select_and_scatter_add(source: Any, operand: Any, **params: Any) -> ScaledArray:
    """The gradient of max pooling: each window of ``operand`` selects one element (a
    comparison of its data, which orders like its values) and ``source`` (the
    cotangent) is added there. The output holds sums of source elements, so it keeps
    the source's scale; the additions (overlapping windows) run in float32 (the
    operand's data widened too: exact, same order) and the result is rounded once. A
    scale-free source (zeros) counts as scale 1."""
    s = _scale_or_one(source)
    dtype = _dtype(source)
    cd = compute_dtype(dtype)
    src = in_scale(source, s, cd)
    # The primitive wants one dtype for both; widening the operand keeps its order.
    out = lax.select_and_scatter_add_p.bind(src, _data(operand).astype(cd), **params)
    return ScaledArray(out.astype(dtype), s)


@register_scaled_op(lax.select_and_gather_add_p)
def select_and_gather_add(tangents: Any, operand: Any, **params: Any) -> ScaledArray:
    """The forward-mode derivative of max pooling: each window picks the tangent where
    ``operand`` is largest (compared as data, which orders like the values). Data
    movement of the tangents: their scale is kept (scale-free tangents count as 1)."""
    s = _scale_or_one(tangents)
    dtype = _dtype(tangents)
    out = lax.select_and_gather_add_p.bind(in_scale(tangents, s, dtype), _data(operand), **params)
    return ScaledArray(out, s)


# --- generic reductions with a user computation ------------------------------------------
#
# `reduce` (``lax.reduce`` with a computation that is not a plain sum/max/min/...,
# and multi-operand reductions such as value-index pairs) and `select_and_scatter`
# (``select``/``scatter`` computations) carry arbitrary scalar code, which may mix
# operands in any non-linear way: no scale rule can be derived from it. Both rules
# therefore run it on the *unscaled values* in float32 (range of the float32
# reference) and give each float result a *fresh* scale measured from the result: the
# power of two below its root-mean-square (`unit_scale`, as `as_scaled_array`), so the
# output data start near unit variance whatever the computation did. This costs one
# small reduction over the (already reduced) output.

from jax.extend.core import Jaxpr  # noqa: E402
from jax.extend.core import primitives as _P  # noqa: E402

from scalify.core import walker  # noqa: E402
from scalify.core.datatype import at_unit_scale  # noqa: E402

# Call-like primitives whose body a widened computation inlines.
_CALLS = {_P.jit_p: "jaxpr", _P.closed_call_p: "call_jaxpr", _P.call_p: "call_jaxpr",
          _P.custom_jvp_call_p: "call_jaxpr", _P.custom_vjp_call_p: "call_jaxpr"}


def _widen(x: Any) -> Any:
    """A narrow float (float16, bfloat16, float8) value as float32; others unchanged."""
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if is_float_dtype(dtype) and dtype.itemsize < 4:
        return x.astype(np.float32) if hasattr(x, "astype") else np.float32(x)
    return x


def _widened(jaxpr: Jaxpr, consts: Sequence[Any]) -> Any:
    """``jaxpr`` (a scalar computation) as a function computing every float value in
    float32 or wider: narrow float inputs, literals and constants are widened,
    casts to narrow floats become casts to float32, and nested calls are inlined."""

    def evaluate(eqn: Any, invals: List[Any]) -> List[Any]:
        invals = [_widen(x) for x in invals]
        if eqn.primitive in _CALLS:
            body, body_consts = walker.unpack(eqn.params[_CALLS[eqn.primitive]])
            return run(body, body_consts, invals)
        params = dict(eqn.params)
        new = params.get("new_dtype")
        if new is not None and is_float_dtype(new) and np.dtype(new).itemsize < 4:
            params["new_dtype"] = np.dtype(np.float32)
        return walker.bind(eqn, invals, params)

    def run(j: Jaxpr, cs: Sequence[Any], args: Sequence[Any]) -> List[Any]:
        outs = walker.eval_jaxpr(j, cs, args, evaluate, static_literals=True)
        return [_widen(o) for o in outs]

    def fn(*args: Any) -> List[Any]:
        return run(jaxpr, consts, args)

    return fn


def _as_value(x: Any) -> Any:
    """A float operand's unscaled value in the compute dtype; integer operands as they are."""
    if is_float_dtype(_dtype(x)):
        return in_scale(x, one(), compute_dtype(_dtype(x)))
    return as_jax(x)


def _fresh(value: Any, dtype: Any) -> ScaledArray:
    """``value`` (float32) as a ScaledArray of ``dtype`` data at a fresh scale: the power
    of two below its root-mean-square (`at_unit_scale`); an all-zero result is zero
    data at scale 0."""
    out = at_unit_scale(value, dtype)
    return ScaledArray(out.data, out.scale.astype(scale_dtype()))


@register_scaled_op(lax.reduce_p)
def reduce(*operands: Any, computation: Any, jaxpr: Any, dimensions: Any, **params: Any) -> List[Any]:
    """Generic `lax.reduce` (a custom computation, or several operands reduced together,
    e.g. value-index pairs): the computation runs on the unscaled values in float32 and
    each float result of a scaled operand gets a fresh scale (the power of two below its
    RMS); plain float operands give plain results, integer ones stay integers."""
    n = len(operands) // 2
    vals = [_as_value(v) for v in operands]
    fn = _widened(jaxpr.jaxpr, jaxpr.consts)
    scalars = [jax.ShapeDtypeStruct((), v.dtype) for v in vals[:n]] * 2
    closed = jax.make_jaxpr(fn)(*scalars)
    outs = lax.reduce_p.bind(*vals, computation=fn, jaxpr=closed, dimensions=dimensions, **params)
    results = []
    for x, init, o in zip(operands[:n], operands[n:], outs):
        dtype = _dtype(x)
        if isinstance(x, ScaledArray) or isinstance(init, ScaledArray):
            results.append(_fresh(o, dtype))
        else:
            results.append(o.astype(dtype))
    return results


@register_scaled_op(lax.select_and_scatter_p)
def select_and_scatter(operand: Any, source: Any, init_value: Any, *, select_jaxpr: Any,
                       select_consts: Any, scatter_jaxpr: Any, scatter_consts: Any,
                       **params: Any) -> ScaledArray:
    """Generic ``select_and_scatter`` (custom ``select`` and ``scatter``
    computations; max-pooling gradients use `select_and_scatter_add`): both run on the
    unscaled values of ``operand``, ``source`` and ``init_value`` in float32, and the
    result gets a fresh scale (the power of two below its RMS)."""
    dtype = _dtype(operand if not is_static(operand) else source)
    vals = [_as_value(v) for v in (operand, source, init_value)]
    scalar = jax.ShapeDtypeStruct((), vals[0].dtype)
    sel = jax.make_jaxpr(_widened(select_jaxpr, select_consts))(scalar, scalar)
    sca = jax.make_jaxpr(_widened(scatter_jaxpr, scatter_consts))(scalar, scalar)
    out = lax.select_and_scatter_p.bind(
        *vals, select_jaxpr=sel.jaxpr, select_consts=tuple(sel.consts),
        scatter_jaxpr=sca.jaxpr, scatter_consts=tuple(sca.consts), **params
    )
    return _fresh(out, dtype)
