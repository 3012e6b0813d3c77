"""Scaled rules of elementwise primitives.

Every rule computes in float32 (or wider, the "compute dtype") and rounds once to the
output dtype. Scales are chosen per family:

- **Arithmetic** combines scales exactly: add/sub ``pow2(sqrt(sx**2 + sy**2))`` (unit
  variance of a sum of two unit-variance terms), mul ``sx * sy``, div ``sx / sy``. A scale
  product that would leave the normal float32 range is clamped to it and the excess goes
  into the data, so that scales stay finite powers of two and the data over/underflows
  exactly where the float32 value would.
- **Data movement and selection** (neg, abs, max, min, clamp, select_n) keep the scale
  or align operands to the largest one (overflow-safe); scale-free constants (0, +-inf,
  NaN) adopt it. **Comparisons** (and atan2) align to the *smallest* scale in float32,
  exact and free of underflow, and return plain booleans.
- **Power functions** (sqrt, rsqrt, cbrt, square, integer_pow, pow with a static
  exponent) transform the scale exactly (e.g. ``sqrt``: ``p = pow2(sqrt(s))``), so that
  1e-30 or 1e30 held in float16 data stay in range; log adds ``log(s)`` in float32.
- **Other non-linear functions** compute on the unscaled value ``data * scale`` in
  float32 (its range is that of the float32 reference) and return data at a scale chosen
  from the input scale alone, with no reduction added to the hot path: 1 for functions
  whose outputs are O(1) or grow without bound for O(1) inputs (exp, cos, logistic, ...),
  ``min(s, 1)`` for functions behaving like the identity near 0 (tanh, sin, erf, expm1,
  ...), so that tiny inputs keep their precision.
- **Range guard.** Where the static scale can be off by more than a narrow data format's
  range (a product of two tensors, ``x**3``, a quotient, ``exp`` and other unbounded
  functions), the result is range-guarded for float16 and float8 data
  (`scalify.core.range_guard.fit_to_format`): its max-abs is measured and, outside a safe
  band, moved into the scale, so the data is finite wherever the float32 value is.
- **Deferred rounding** (`ScalifyConfig(defer_rounding=True)`, the default). A float16 or
  float8 result is handed on in float32 at its static scale (`scalify.core.wide.Wide`)
  to the next elementwise rule, which computes on from it; the value is rounded, and
  range-guarded if any rule of the chain needed the guard, once, where a rule that is not
  elementwise (a contraction, a gather, control flow) or the function's output reads it.
  A GELU or a layer norm thus measures one max-abs, not one per product. Static bounds
  on each value's data (`data_bounds`) keep float32 from over- or underflowing inside a
  chain: a rule whose result could leave them materialises its operands first. ``exp``
  and the other unbounded functions read a chain's float32 value but guard their own
  result at once; comparisons, selections of operands at distinct scales and the rules
  not named "deferred" in docs/operators.md read materialised operands.

Static operands (NumPy values known at trace time) contribute their power-of-two part as
a static scale, so ``x * 3.0`` multiplies the scale by 2 and the data by 1.5, and
``x + 0``, ``max(x, -inf)`` keep ``x``'s scale without computing any.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.extend.core import primitives as jax_primitives

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.formats import clip_to_format
from scalify.core.range_guard import recentre
from scalify.core.trace_state import register_selection, selection_of, unrounded_of
from scalify.core.operands import (
    Wide,
    as_jax,
    broadcast_narrow,
    bounded_operands,
    cast,
    data_bounds,
    deferring,
    format_bounds,
    is_scale_free,
    materialised,
    mixed_scales,
    _headroom,
    needs_guard,
    wide_result,
    within_wide_bounds,
    common_scale,
    compute_dtype,
    fit_to_format,
    hypot_scale,
    is_narrow,
    in_scale,
    one,
    out_dtype,
    promote,
    ratio_of,
    clip_scale,
    scale_bounds,
    scale_of,
    scale_product,
    scale_quotient,
    scales_dtype,
    static_uniform_value,
    times_residual,
)
from scalify.core.pow2 import (
    exp2_int, exponent, is_static, mantissa, pow2_round, pow2_rsqrt_down, pow2_sqrt_down, xnp,
)
from scalify.core.registry import register_scaled_op
from scalify.rules.same_scale import keep_scale

# --------------------------------------------------------------------------------------
# Scale helpers local to this family.
# --------------------------------------------------------------------------------------


def _is_one(s: Any) -> bool:
    return is_static(s) and bool(np.asarray(s) == 1)


def _or_one(s: Optional[Any]) -> Any:
    return one() if s is None else s


def _scale_pow(s: Any, c: float) -> Tuple[Any, Optional[Any]]:
    """``s ** c`` (``c`` a static exponent) as ``(scale, residual)``: writing
    ``s = m * 2**e``, ``scale = 2**floor(c * e)`` clamped to the normal range and
    ``residual = s**c / scale`` (``2**frac(c * e) * m**c``; exactly 1 for a power-of-two
    ``s`` and integer ``c`` unless clamped)."""
    dtype = scales_dtype(s)
    _, _, kmin, kmax = scale_bounds(dtype)
    if is_static(s):
        m, e = np.frexp(np.float64(s))  # s = (2m) * 2**(e-1), 2m in [1, 2)
        e = max(int(e) - 1, kmin)
        q = c * e
        k = min(max(np.floor(q), kmin), kmax)
        with np.errstate(over="ignore", under="ignore"):
            r = np.float32(np.exp2(q - k) * (float(s) / 2.0**e) ** c)
        return np.asarray(np.ldexp(1.0, int(k)), dtype), (None if r == 1 else np.asarray(r))
    return _traced_scale_pow(cast(s, dtype), c)


@functools.partial(jax.jit, static_argnums=1)
def _traced_scale_pow(s: Any, c: float) -> Tuple[Any, Any]:
    """The traced body of `_scale_pow`: one `jit` equation per call, traced once per
    (dtype, exponent). No division: XLA never duplicates one into its consumers, so it
    would be a kernel of its own."""
    dtype = np.dtype(s.dtype)
    _, _, kmin, kmax = scale_bounds(dtype)
    e = lax.max(exponent(s), np.int32(kmin))
    mant = cast(mantissa(s), np.float32)  # s / 2**e, exact; 1 for a power of two
    q = lax.mul(np.float32(c), cast(e, np.float32))  # integer-valued for integer c
    k = clip_scale(lax.floor(q), kmin, kmax)
    frac = lax.sub(q, k)
    one32 = np.float32(1)
    r = lax.select(lax.eq(frac, np.float32(0)), one32, lax.exp2(frac))
    r = lax.mul(r, lax.select(lax.eq(mant, one32), one32, lax.pow(mant, np.float32(c))))
    return exp2_int(cast(k, np.int32), dtype), r


def _value(x: ScaledArray) -> Any:
    """The unscaled value ``data * scale`` in the compute dtype (float32 or wider)."""
    d = cast(as_jax(x.data), compute_dtype(x.dtype))
    if _is_one(x.scale):
        return d
    return lax.mul(d, cast(x.scale, d.dtype))


def _traced_down(s: Any) -> bool:
    """A traced scalar scale under DOWN rounding: power-of-two roots of it have exact
    bit formulas (`pow2_sqrt_down`, `pow2_rsqrt_down`)."""
    return not is_static(s) and np.shape(s) == () and get_config().rounding_mode == Pow2RoundMode.DOWN


def _data(x: ScaledArray) -> Any:
    """The data in the compute dtype."""
    return cast(as_jax(x.data), compute_dtype(x.dtype))


def _div_by_scale(y: Any, t: Any) -> Any:
    if _is_one(t):
        return y
    return y / jnp.asarray(t, y.dtype)


def _max_scale(a: Any, b: Any) -> Any:
    return xnp(a, b).maximum(a, b)


def _min_scale(a: Any, b: Any) -> Any:
    return xnp(a, b).minimum(a, b)


def _clamp_scale(s: Any) -> Any:
    """Keep a derived scale inside the normal range of its dtype (finite, non-zero)."""
    lo, hi, _, _ = scale_bounds(scales_dtype(s))
    if is_static(s):
        return np.asarray(min(max(float(s), lo), hi), scales_dtype(s))
    return clip_scale(s, lo, hi)


# --------------------------------------------------------------------------------------
# Arithmetic.
# --------------------------------------------------------------------------------------


def _sum_bounds(bx: Tuple[int, int], by: Tuple[int, int]) -> Tuple[int, int]:
    # Operands are aligned to a scale at least half of each (a ratio below 2).
    return max(bx[0], by[0]) + 2, min(bx[1], by[1])


def _sum(lax_fn: Callable[..., Any], x: Any, y: Any) -> Any:
    dtype = out_dtype(x, y)
    # float8 data spans 2**-9 to 448 only: where the larger operand's values are far
    # below its scale (``relu`` of negative values is zeros at ``x``'s scale; a
    # cancellation), the sum's static scale flushes the other operand's elements
    # (``relu(x) - 1.5`` read 0). A float8 sum is therefore range-guarded, which lifts
    # such data; float16's 40 binades make this too rare to pay a guard for.
    lift = np.dtype(dtype).itemsize == 1 and is_narrow(dtype) and get_config().range_guard
    x, y = broadcast_narrow(x, y)
    if deferring(dtype):
        (x, y), bounds = bounded_operands((x, y), _sum_bounds)
        s = hypot_scale(scale_of(x), scale_of(y))
        guard = needs_guard(x, y) or lift
        return wide_result(lax_fn(in_scale(x, s), in_scale(y, s)), s, dtype, guard, bounds, (x, y))
    x, y = materialised(x), materialised(y)
    s = hypot_scale(scale_of(x), scale_of(y))
    out = lax_fn(in_scale(x, s), in_scale(y, s))
    return fit_to_format(out, s, dtype) if lift else ScaledArray(cast(out, dtype), s)


@register_scaled_op(lax.add_p, jax_primitives.add_jaxvals_p, takes_deferred=(Wide,))
def add(x: Any, y: Any, **params: Any) -> Any:
    """``x + y`` at scale ``pow2(sqrt(sx**2 + sy**2))``: the sum of two independent
    unit-variance terms has variance 2, so data stays near unit variance. A scale-free
    constant (``x + 0``) keeps the other operand's scale. Also the rule of autodiff's
    ``add_any`` (``add_jaxvals_p``), which sums cotangents. Deferred rounding: a
    float16/float8 sum is handed on in float32 (`Wide`; its chain is guarded at the end
    only where one of the chain's rules needed the guard). A float8 sum is guarded:
    where the larger operand's values lie far below its scale (zeros of a ``relu``),
    the smaller one's would flush in float8's 18 binades."""
    return _sum(lax.add, x, y)


@register_scaled_op(lax.sub_p, takes_deferred=(Wide,))
def sub(x: Any, y: Any, **params: Any) -> Any:
    """``x - y``, scaled as `add`; a float16/float8 difference is handed on in float32
    (`Wide`), as in `add`."""
    return _sum(lax.sub, x, y)


def _bounded_factor(x: Any) -> bool:
    """An operand whose data lies in ``[1, 2)`` in magnitude: a static constant or a
    traced plain scalar, read at its own power of two (`scale_of`). Multiplying by it
    at most doubles the other operand's data, so the product needs no range guard."""
    return is_static(x) or (not isinstance(x, (ScaledArray, Wide)) and np.shape(x) == ())


def _product_bounds(bx: Tuple[int, int], by: Tuple[int, int]) -> Tuple[int, int]:
    return bx[0] + by[0] + 1, bx[1] + by[1]


def _quotient_bounds(bx: Tuple[int, int], by: Tuple[int, int]) -> Tuple[int, int]:
    return bx[0] - by[1] + 1, bx[1] - by[0] - 1


def _scaled_binary(x: Any, y: Any, dtype: Any, bounded: bool, op: Callable, scale_fn: Callable,
                   bounds_fn: Callable) -> Any:
    """The body of `mul` and `div`: ``op`` on the data at scale ``scale_fn(sx, sy)``
    (its non-power-of-two residual folded into the data); handed on unrounded (`Wide`,
    data bounds from ``bounds_fn``) when deferring, else rounded, and range-guarded
    unless ``bounded``."""
    x, y = broadcast_narrow(x, y)
    if deferring(dtype):
        (x, y), bounds = bounded_operands((x, y), bounds_fn)
    else:
        x, y = materialised(x), materialised(y)
    sx, sy = _or_one(scale_of(x)), _or_one(scale_of(y))
    s, r = scale_fn(sx, sy)
    data = times_residual(op(in_scale(x, sx), in_scale(y, sy)), r)
    if deferring(dtype):
        return wide_result(data, s, dtype, needs_guard(x, y) or not bounded, bounds, (x, y))
    if bounded:
        return ScaledArray(cast(data, dtype), s)
    return fit_to_format(data, s, dtype)


@register_scaled_op(lax.mul_p, takes_deferred=(Wide,))
def mul(x: Any, y: Any, **params: Any) -> Any:
    """``x * y`` at scale ``sx * sy``: the product of unit-variance data has unit
    variance. A static constant ``c`` contributes ``pow2(|c|)`` to the scale and
    ``c / pow2(|c|)`` to the data; a scale-free one (0, inf, NaN) multiplies the data
    as it is (``x * 0`` is 0, ``inf * 0`` is NaN, like float32). A traced scalar (a
    learning rate) is read at its own power of two likewise. A scale product outside
    the float32 normal range is clamped and the excess goes into the data.

    Range: the product of two tensors' data is unbounded under ``sx * sy`` (``x * x``
    of data with max-abs 300 overflows float16), so it is range-guarded
    (`fit_to_format`: finite data whenever the float32 value is finite and inside the
    scale range). A product with a constant or scalar is bounded (data grows < 2x) and
    is not measured. An all-zero operand (scale 0) gives the zero tensor, scale 0.

    Deferred rounding: a float16/float8 product is handed on in float32 (`Wide`), and
    its range guard, when needed, runs once at the end of its elementwise chain; a chain
    whose data bound would leave float32's range materialises (and guards) its operands
    first."""
    bounded = _bounded_factor(x) or _bounded_factor(y)
    dtype = params.get("out_dtype") or out_dtype(x, y)
    return _scaled_binary(x, y, dtype, bounded, lax.mul, scale_product, _product_bounds)


@register_scaled_op(lax.div_p, takes_deferred=(Wide,))
def div(x: Any, y: Any, **params: Any) -> Any:
    """``x / y`` at scale ``sx / sy`` (static constants, scalars and clamping as in
    `mul`). Range: dividing by tensor data near 0 is unbounded, so the quotient is
    range-guarded (`fit_to_format`) unless the divisor is a constant or a scalar.
    Deferred rounding as `mul`: the quotient's data are bounded by the operands' data
    bounds (the divisor's non-zero data are at least its format's smallest subnormal),
    so a float16/float8 quotient is handed on in float32 (`Wide`) and guarded once at
    the end of its chain."""
    return _scaled_binary(x, y, out_dtype(x, y), _bounded_factor(y), lax.div, scale_quotient, _quotient_bounds)


@register_scaled_op(lax.neg_p, takes_deferred=(Wide,))
def neg(x: Any, **params: Any) -> Any:
    """``-x``: same scale, data negated (exact; a `Wide` operand stays Wide)."""
    return keep_scale(lax.neg_p, x, **params)


@register_scaled_op(lax.abs_p, takes_deferred=(Wide,))
def abs_(x: Any, **params: Any) -> Any:
    """``|x|``: same scale, absolute value of the data (exact; a `Wide` operand stays
    Wide)."""
    return keep_scale(lax.abs_p, x, **params)


@register_scaled_op(lax.sign_p, takes_deferred=(Wide,))
def sign(x: Any, **params: Any) -> Any:
    """``sign(x)`` in {-1, 0, 1} (NaN for NaN) at scale 1: the sign of the data, since
    scales are positive (of a `Wide` operand's float32 data, then handed on in float32
    (`Wide`))."""
    if isinstance(x, Wide):
        return wide_result(lax.sign_p.bind(x.data, **params), one(), x.dtype, False, (1, 0))
    return ScaledArray(lax.sign_p.bind(x.data, **params), one())


@register_scaled_op(lax.rem_p)
def rem(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``rem(x, y)`` (C ``fmod``: sign of ``x``, ``|rem| < |y|``) at the smaller scale of
    the two operands, since ``|rem(x, y)| <= min(|x|, |y|)``. Both operands are aligned
    to it in float32, where ``fmod`` is exact."""
    scales = [s for s in (scale_of(x), scale_of(y)) if s is not None]
    s = one()
    if scales:
        s = scales[0] if len(scales) == 1 else _min_scale(*scales)
    data = lax.rem(in_scale(x, s), in_scale(y, s))
    return ScaledArray(data.astype(out_dtype(x, y)), s)


@register_scaled_op(lax.nextafter_p)
def nextafter(x: Any, y: Any, **params: Any) -> ScaledArray:
    """The next representable value after ``x`` towards ``y``, *in the data format at
    x's scale*: ``nextafter(dx, y / sx) * sx``. With a power-of-two scale this is the
    float nextafter of the value (exact for float32 data in the normal range); for
    float16 data the step is one float16 ulp. The direction is decided in float32."""
    x = promote(x)
    s = x.scale
    a = x.data
    a32 = _data(x)
    b32 = in_scale(y, s)
    toward = jnp.where(b32 > a32, jnp.inf, jnp.where(b32 < a32, -jnp.inf, b32))
    return ScaledArray(lax.nextafter(a, toward.astype(a.dtype)), s)


# --------------------------------------------------------------------------------------
# Selection (aligned to the largest scale) and comparisons (to the smallest).
# --------------------------------------------------------------------------------------


def _aligned(xs: Any, dtype: Any = None) -> Tuple[Any, list]:
    s = common_scale(*xs)
    return s, [as_jax(in_scale(x, s, dtype)) for x in xs]


# How many binades below the largest scale a selection's lower data bound counts the
# other operands' scales (`_select`): their ratio is traced, unknown at trace time. An
# element further below may underflow in the float32 chain that follows, as it would
# (35 binades below the largest element) once rounded to float16.
SELECTION_SPAN = 40


def _select(prim: Primitive, xs: Any, dtype: Any, params: Any, pred: Any = None) -> ScaledArray:
    """A selection among ``xs`` (max, min, clamp, select_n) at their largest scale.

    With one traced scale (``max(x, 0)``, a ``-inf`` mask fill beside ``x``) the data are
    aligned in ``dtype`` and selected: each output element is an input element, exact.
    With several distinct traced scales the data are aligned and selected in float32 and
    the result's max-abs is put at the top of the format's band (`fit_to_format` with
    ``spread``: float16 data up to 2**11), leaving the format's whole range below it to
    the smaller elements: one selected from an operand far below the largest scale
    (``where(p, 1e14, 6e4)``) would flush to zero in float16 at unit scale, and ``max``'s
    derivative, which compares the output with each operand, would then lose it.

    Deferred rounding: with one traced scale and a `Wide` operand, the selection is
    made on the float32 data and handed on Wide (each output element an aligned input
    element: the bounds are the operands'). With distinct traced scales the float32
    selection is handed on Wide too, rounded with the spread guard where a rule that is
    not elementwise reads it: the next elementwise rule (``rsqrt(min(x, eps))``, a
    ``log`` of a clipped value) reads the small elements in float32, whatever the span
    of binades between the operands, and the comparisons too (`_unrounded`), so that
    a derivative's masks agree with its values. Its largest element is moved to unit
    size first (`recentre`: a ``max(x, y)`` that took the far smaller ``x`` everywhere
    must not leave ``x`` far below its scale, where ``x * x`` underflows float32). The
    ratio of traced scales is unknown at trace time: its lower data bound counts the
    smaller elements within ``2**SELECTION_SPAN`` of the largest, so a chain that would
    leave float32's range rounds it first."""
    mixed = mixed_scales(xs)
    bounds = [_selected_bounds(x, dtype) for x in xs]
    hi, lo = max(b[0] for b in bounds), min(b[1] for b in bounds)
    if mixed:
        lo -= SELECTION_SPAN
    wide = deferring(dtype) and (within_wide_bounds(hi, lo) if mixed else any(isinstance(x, Wide) for x in xs))
    if wide:
        s, data = _aligned(xs, compute_dtype(dtype))
        out = prim.bind(*(data if pred is None else [as_jax(pred), *data]), **params)
        if not mixed:
            return wide_result(out, s, dtype, needs_guard(*xs), (hi, lo), xs)
        selection = (prim.name, list(xs)) if prim in (lax.max_p, lax.min_p) else None
        out, s = recentre(out, s)  # the largest scale may lie far above every element
        return Wide(out, s, dtype, True, hi, lo, spread=True, selection=selection)
    xs = [materialised(x) for x in xs]
    s, data = _aligned(xs, compute_dtype(dtype) if mixed else dtype)
    operands = data if pred is None else [as_jax(pred), *data]
    out = prim.bind(*operands, **params)
    if not mixed:
        return ScaledArray(out, s)
    out = fit_to_format(out, s, dtype, spread=True)
    if prim in (lax.max_p, lax.min_p):
        register_selection(out.data, prim.name, xs)  # see `_equal_to_selection`
    return out


def _selected_bounds(x: Any, dtype: Any) -> Tuple[int, int]:
    """Data bounds of a selection's operand aligned to `common_scale`: a traced one at
    most doubles (a scale that is not a power of two is aligned to the power of two
    below it); a static constant is held with the headroom of its dtype (data below
    ``2**(H + 1)``)."""
    if is_static(x):
        if is_scale_free(x):
            return 0, 0
        h = int(-np.log2(float(_headroom(np.asarray(x).dtype))))
        return h + 1, format_bounds(dtype)[1]
    hi, lo = data_bounds(x)
    return hi + 1, lo


@register_scaled_op(lax.max_p, takes_deferred=(Wide,))
def max_(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``max(x, y)`` at the larger scale; operands of distinct traced scales are selected
    in float32 and range-guarded, so a value far below the larger scale is kept
    (`_select`). Scale-free constants (``max(x, 0)``, ``max(x, -inf)``) keep ``x``'s
    scale. Deferred rounding: with one traced scale, a selection among `Wide` operands
    stays Wide (selected from their float32 data)."""
    return _select(lax.max_p, (x, y), out_dtype(x, y), params)


@register_scaled_op(lax.min_p, takes_deferred=(Wide,))
def min_(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``min(x, y)``, scaled as `max` (a selection among `Wide` operands of one traced
    scale stays Wide)."""
    return _select(lax.min_p, (x, y), out_dtype(x, y), params)


@register_scaled_op(lax.clamp_p, takes_deferred=(Wide,))
def clamp(lo: Any, x: Any, hi: Any, **params: Any) -> ScaledArray:
    """``clamp(lo, x, hi)`` with the three operands aligned to the largest scale
    (scale-free bounds such as 0 or inf ignored), as `max` (a selection among `Wide`
    operands of one traced scale stays Wide)."""
    return _select(lax.clamp_p, (lo, x, hi), out_dtype(x, lo, hi), params)


@register_scaled_op(lax.select_n_p, takes_deferred=(Wide,))
def select_n(pred: Any, *cases: Any, **params: Any) -> Any:
    """``select_n(pred, *cases)`` with the cases aligned to the largest scale; scale-free
    static cases (broadcast zeros, ``-inf`` masks) adopt it. A static uniform predicate
    picks its case at trace time, keeping that case's own scale. Deferred rounding as in
    `max`: a selection among `Wide` operands of one traced scale stays Wide."""
    c = static_uniform_value(pred)
    if c is not None:
        return cases[int(c)]
    return _select(lax.select_n_p, cases, out_dtype(*cases), params, pred=pred)


def _aligned_low(*xs: Any) -> list:
    """Operands in float32 at their *smallest* scale (scale-free constants ignored).

    Scaling data up by a power of two is exact, so nothing underflows (aligning to the
    largest scale would flush small values to zero); a value that overflows becomes
    +-inf, which still orders correctly against the other operand, whose data is
    unchanged. The ratio is capped at the largest power of two so that a zero stays 0.
    """
    scales = [s for s in (scale_of(x) for x in xs) if s is not None]
    s = one()
    if scales:
        # The smallest *non-zero* scale: a zero scale is the all-zero tensor, whose data
        # aligns to any scale as 0 (aligning to 0 would divide by it).
        _, hi, _, _ = scale_bounds(scales_dtype(*scales))
        scales = [_nonzero_or(t, hi) for t in scales]
        s = scales[0]
        for t in scales[1:]:
            s = _min_scale(s, t)
    _, hi, _, _ = scale_bounds(scales_dtype(s))
    out = []
    for x in xs:
        if isinstance(x, (ScaledArray, Wide)):
            r = ratio_of(x.scale, s)
            r = None if _is_one(r) else xnp(r).minimum(r, hi)
            out.append(times_residual(_data(x), r))
        else:
            out.append(as_jax(in_scale(x, s)))
    return out


def _nonzero_or(s: Any, big: float) -> Any:
    """``s``, or ``big`` where ``s`` is 0 (the scale of an all-zero tensor)."""
    if is_static(s):
        return s if np.asarray(s) != 0 else np.asarray(big, np.asarray(s).dtype)
    return lax.select(lax.eq(s, np.zeros((), s.dtype)), np.asarray(big, s.dtype), s)


def _registered(prim: Primitive, rule: Callable[..., Any], doc: str, **options: Any) -> Callable[..., Any]:
    """``rule``, built by a factory for ``prim``, registered under the primitive's name
    with the docstring ``doc`` (the one docs/operators.md shows)."""
    rule.__name__ = prim.name
    rule.__doc__ = doc
    return register_scaled_op(prim, **options)(rule)


def _equal_to_selection(x: Any, y: Any) -> Any:
    """``eq(a, z)`` for ``z = max(a, b)`` (or ``min``) of operands at distinct traced
    scales, as ``a >= b`` (``a <= b``); None for any other pair.

    Why: ``z`` is rounded to one scale (`_select`), which can flush or round ``b``'s
    elements when they lie far below ``a``'s, and ``max``'s derivative finds the
    selected operand by comparing each operand with ``z``: that derivative would be lost.
    The operands themselves decide it exactly, with the same answer wherever ``z`` is
    exact (NaN included: both are false)."""
    for u, z in ((x, y), (y, x)):
        sel = selection_of(z.data) if isinstance(z, ScaledArray) else None
        if sel is None:
            continue
        kind, (a, b) = sel
        for p, q in ((a, b), (b, a)):
            if u is p or (isinstance(p, Wide) and p.materialised is u) or (
                    isinstance(u, ScaledArray) and isinstance(p, ScaledArray)
                    and u.data is p.data and u.scale is p.scale):
                return (ge if kind == "max" else le)(p, q)
    return None


def _unrounded(x: Any) -> Any:
    """``x``, or the unrounded `Wide` value recorded for its data (`register_unrounded`)."""
    w = unrounded_of(x.data) if isinstance(x, ScaledArray) else None
    return x if w is None else w


def _comparison(prim: Primitive) -> Callable[..., Any]:
    def rule(x: Any, y: Any, **params: Any) -> Any:
        if prim is lax.eq_p:
            selected = _equal_to_selection(x, y)
            if selected is not None:
                return selected
        a, b = _aligned_low(_unrounded(x), _unrounded(y))
        return prim.bind(a, b, **params)

    return _registered(prim, rule, (
        f"``{prim.name}(x, y)`` as a plain boolean array. Both operands are aligned in "
        "float32 to the *smaller* of their scales: exact for power-of-two scales, no "
        "underflow of the small operand (1e-30 still compares greater than 0 held at "
        "scale 1e30), and an overflow of the large one gives +-inf, which orders "
        "correctly. Unscaled values are never formed. A selection among operands of "
        "distinct scales that was handed on unrounded is compared on its float32 data, "
        "as the elementwise rules read it."
        + (" ``eq(a, max(a, b))`` of operands at distinct scales (as ``max``'s and "
           "``min``'s derivatives compare them) is ``a >= b`` (``a <= b`` for ``min``): "
           "exact where the rounded result lost ``b``'s elements."
           if prim is lax.eq_p else "")
    ))


eq = _comparison(lax.eq_p)
ne = _comparison(lax.ne_p)
lt = _comparison(lax.lt_p)
le = _comparison(lax.le_p)
gt = _comparison(lax.gt_p)
ge = _comparison(lax.ge_p)
# Total-order comparisons (-0 < +0, NaNs ordered): aligning by a power of two keeps signs,
# zeros and NaNs, so the same rule holds.
eq_to = _comparison(jax_primitives.eq_to_p)
le_to = _comparison(jax_primitives.le_to_p)
lt_to = _comparison(jax_primitives.lt_to_p)


@register_scaled_op(lax.is_finite_p)
def is_finite(x: ScaledArray, **params: Any) -> Any:
    """``isfinite(x)`` as a plain boolean array: the data's, since the scale is a
    positive finite number."""
    return lax.is_finite_p.bind(x.data, **params)


# --------------------------------------------------------------------------------------
# Power functions: exact scale transforms.
# --------------------------------------------------------------------------------------


def _power_bounds(c: float) -> Callable[[Tuple[int, int]], Tuple[int, int]]:
    """Data bounds of ``d**c * r`` for data bounds of ``d`` (``c`` static, non-zero):
    the residual ``r`` of `_scale_pow` lies in ``[2**min(c, 0), 2**(|c| + 1))`` (1 for a
    power-of-two scale and an integer ``c``), and the roots' ratios ``s / p**2`` and
    ``s * p**2`` lie in ``[1/4, 4]``."""
    def bounds(b: Tuple[int, int]) -> Tuple[int, int]:
        hi, lo = (c * b[0], c * b[1]) if c > 0 else (c * b[1], c * b[0])
        return int(np.ceil(hi + abs(c))) + 2, int(np.floor(lo + min(c, 0.0))) - 2

    return bounds


def _power(x: Any, c: float) -> Tuple[Any, Optional[Tuple[int, int]]]:
    """The operand of a power rule with a static exponent ``c`` (non-zero), and the
    data bounds of its result when it is handed on `Wide` (None when deferral is off:
    the operand is then materialised). A Wide operand is materialised first when the
    result's bounds would leave a float32 chain's."""
    if not deferring(x.dtype):
        return materialised(x), None
    (x,), bounds = bounded_operands((x,), _power_bounds(c))
    return x, bounds


@register_scaled_op(lax.sqrt_p, takes_deferred=(Wide,))
def sqrt(x: Any, **params: Any) -> Any:
    """``sqrt(x)`` at scale ``p = pow2(sqrt(s))``, data ``sqrt(d * s / p**2)`` (the ratio
    is 1 or 2 with DOWN rounding): the square root of 1e-30 held in float16 data is
    1e-15 at scale ~2**-50, never a float16 underflow. Deferred rounding: a float16/float8
    root is handed on in float32 (`Wide`; halving the data's log2 bounds)."""
    x, bounds = _power(x, 0.5)
    s = x.scale
    if _traced_down(s):
        p, inv = pow2_sqrt_down(s)  # the same p, from exponent bits
        ratio = lax.mul(lax.mul(s, inv), inv)
    else:
        p = pow2_round(xnp(s).sqrt(s))
        ratio = (s / p) / p
    data = lax.sqrt_p.bind(times_residual(_data(x), None if _is_one(ratio) else ratio), **params)
    if bounds is not None:
        return wide_result(data, p, x.dtype, needs_guard(x), bounds, (x,))
    return ScaledArray(data.astype(x.dtype), p)


@register_scaled_op(lax.rsqrt_p, takes_deferred=(Wide,))
def rsqrt(x: Any, **params: Any) -> Any:
    """``1 / sqrt(x)`` at scale ``p = pow2(1 / sqrt(s))``, data ``rsqrt(d * s * p**2)``.
    Range-guarded (`fit_to_format`): data near 0 (a variance far below its scale) has
    an unbounded reciprocal square root. Deferred rounding: the result's data are
    bounded by the operand's non-zero data bounds, so a float16/float8 result is handed
    on in float32 (`Wide`) and guarded once at the end of its chain."""
    x, bounds = _power(x, -0.5)
    s = x.scale
    p = pow2_rsqrt_down(s) if _traced_down(s) else pow2_round(1 / xnp(s).sqrt(s))
    ratio = (s * p) * p
    data = lax.rsqrt_p.bind(times_residual(_data(x), None if _is_one(ratio) else ratio), **params)
    if bounds is not None:
        return wide_result(data, p, x.dtype, True, bounds, (x,))
    return fit_to_format(data, p, x.dtype)


@register_scaled_op(lax.cbrt_p, takes_deferred=(Wide,))
def cbrt(x: Any, **params: Any) -> Any:
    """``cbrt(x)`` at scale ``p = pow2(cbrt(s))``, data ``cbrt(d * s / p**3)``. Deferred
    rounding: a float16/float8 root is handed on in float32 (`Wide`), as in `sqrt`."""
    x, bounds = _power(x, 1 / 3)
    s = x.scale
    p = pow2_round(xnp(s).cbrt(s))
    ratio = ((s / p) / p) / p
    data = lax.cbrt_p.bind(times_residual(_data(x), None if _is_one(ratio) else ratio), **params)
    if bounds is not None:
        return wide_result(data, p, x.dtype, needs_guard(x), bounds, (x,))
    return ScaledArray(data.astype(x.dtype), p)


@register_scaled_op(lax.square_p, takes_deferred=(Wide,))
def square(x: Any, **params: Any) -> Any:
    """``x**2`` at scale ``s**2`` (clamped to the float32 normal range, the excess into
    the data), data ``d**2``: exact for power-of-two scales. Range-guarded
    (`fit_to_format`): the square of data with max-abs above 256 overflows float16.
    Deferred rounding: a float16/float8 square is handed on in float32 (`Wide`) and
    guarded once at the end of its chain (doubling the data's log2 bounds)."""
    x, bounds = _power(x, 2.0)
    s, r = _scale_pow(x.scale, 2.0)
    data = times_residual(lax.square_p.bind(_data(x), **params), r)
    if bounds is not None:
        return wide_result(data, s, x.dtype, True, bounds, (x,))
    return fit_to_format(data, s, x.dtype)


@register_scaled_op(lax.integer_pow_p, takes_deferred=(Wide,))
def integer_pow(x: Any, *, y: int, **params: Any) -> Any:
    """``x**y`` at scale ``s**y`` (clamped to the float32 normal range, the excess into
    the data), data ``d**y``: exact for power-of-two scales, so ``x**3`` of 1e-30 gives
    float32's 0 and of 1e30 gives inf, but no NaN or zero scale downstream.
    Range-guarded (`fit_to_format`) for ``y`` other than 0 and 1: ``x**3`` (in GELU's
    tanh approximation) of data with max-abs 40 overflows float16. Deferred rounding: a
    float16/float8 power is handed on in float32 (`Wide`, the data's log2 bounds times
    ``y``, negative powers included: the operand's non-zero data are bounded below) and
    guarded once at the end of its chain."""
    x, bounds = _power(x, float(y)) if y != 0 else (materialised(x), None)
    s, r = _scale_pow(x.scale, float(y))
    data = times_residual(lax.integer_pow_p.bind(_data(x), y=y, **params), r)
    if bounds is not None:
        return wide_result(data, s, x.dtype, y != 1 or needs_guard(x), bounds, (x,))
    if y in (0, 1):
        return ScaledArray(data.astype(x.dtype), s)
    return fit_to_format(data, s, x.dtype)


@register_scaled_op(lax.pow_p, takes_deferred=(Wide,))
def pow_(x: Any, y: Any, **params: Any) -> Any:
    """``x ** y``. With a static uniform exponent ``c`` and a scaled base, the scale
    transforms exactly: ``s**c = 2**k * r`` with ``k = floor(c * log2 s)``, output scale
    ``2**k`` and data ``d**c * r`` (``r`` in ``[1, 2)``), so ``x ** 0.5`` of 1e-30 stays
    in range. Otherwise (traced exponent, scaled exponent or static base) the power is
    computed on the unscaled float32 values and returned at scale 1: its magnitude
    depends on every element of the exponent, which no input scale predicts. Both
    paths are range-guarded (`fit_to_format`). Deferred rounding: with a static
    exponent, a float16/float8 power is handed on in float32 (`Wide`, as
    `integer_pow`); the other path reads a Wide operand's float32 data and guards its
    result at once."""
    c = None if isinstance(y, (ScaledArray, Wide)) else static_uniform_value(y)
    if isinstance(x, (ScaledArray, Wide)) and c is not None and np.isfinite(c):
        c = float(np.asarray(c, np.float32))
        x, bounds = _power(x, c) if c != 0 else (materialised(x), None)
        s, r = _scale_pow(x.scale, c)
        data = times_residual(lax.pow(_data(x), np.float32(c)), r)
        if bounds is not None:
            return wide_result(data, s, out_dtype(x, y), True, bounds, (x, y))
        return fit_to_format(data, s, out_dtype(x, y))
    data = lax.pow_p.bind(in_scale(x, one()), in_scale(y, one()), **params)
    return fit_to_format(data, one(), out_dtype(x, y))


@register_scaled_op(lax.log_p, takes_deferred=(Wide,))
def log(x: Any, **params: Any) -> Any:
    """``log(x) = log(d) + log(s)`` in float32 at scale 1: extreme scales never under-
    or overflow (``log`` of 1e-30 held in float16 data is -69), and the result is
    O(10) at most for any float32 scale. Deferred rounding: reads a `Wide` operand's
    float32 data and hands a float16/float8 result on in float32 (`Wide`: below
    ``2**8``)."""
    if not deferring(x.dtype):
        x = materialised(x)
    s = x.scale
    y = lax.log_p.bind(_data(x), **params)
    if not _is_one(s):
        log_s = np.log(s) if is_static(s) else lax.log(s)
        y = lax.add(y, cast(log_s, y.dtype))
    if deferring(x.dtype):
        return wide_result(y, one(), x.dtype, False, (8, format_bounds(x.dtype)[1]))
    return ScaledArray(cast(y, x.dtype), one())


# --------------------------------------------------------------------------------------
# Other non-linear functions: computed on the unscaled float32 value.
# --------------------------------------------------------------------------------------


def _unit_scale(s: Any) -> Any:
    return one()


def _near_identity_scale(s: Any) -> Any:
    return pow2_round(_min_scale(s, one()))


def _growing_scale(s: Any) -> Any:
    return pow2_round(_max_scale(s, one()))


def _pole_at_zero_scale(s: Any) -> Any:
    return _clamp_scale(pow2_round(_max_scale(1 / s, one())))


def _decaying_scale(s: Any) -> Any:
    return pow2_round(_min_scale(one(), 1 / xnp(s).sqrt(s)))


def _odd_decaying_scale(s: Any) -> Any:
    return pow2_round(_min_scale(s, 1 / xnp(s).sqrt(s)))


_SCALE_DOCS = {
    _unit_scale: (
        "returned at scale 1: its outputs are O(1) for O(1) inputs, or grow too fast "
        "for any scale chosen from the input scale alone"
    ),
    _near_identity_scale: (
        "returned at scale ``min(s, 1)``: it behaves like ``c * x`` near 0 and is O(1) "
        "for O(1) inputs, so tiny inputs (1e-30 in float16 data) keep their precision "
        "while O(1) outputs keep unit scale"
    ),
    _growing_scale: (
        "returned at scale ``max(s, 1)``: it grows like ``x`` (times a log) for large "
        "inputs and is O(1) otherwise"
    ),
    _decaying_scale: (
        "returned at scale ``min(1, 1/sqrt(s))``: it is O(1) near 0 and decays like "
        "``1/sqrt(x)`` for large inputs"
    ),
    _odd_decaying_scale: (
        "returned at scale ``min(s, 1/sqrt(s))``: it behaves like ``x/2`` near 0 and "
        "decays like ``1/sqrt(x)`` for large inputs"
    ),
    _pole_at_zero_scale: (
        "returned at scale ``max(1 / s, 1)``: it has a ``-1/x`` pole at 0, so tiny "
        "inputs give outputs of magnitude ``1/s``, and is O(log x) otherwise"
    ),
}


# Data bounds (log2) of bounded functions' results at their scale, from the operand's
# data bounds, for results handed on `Wide`: a function O(1) at scale 1 stays below 89.5
# (acosh of float32's largest value); one like ``x`` near 0 at scale ``min(s, 1)`` is
# below ``1.6 |v| / t <= 3.2 |d|`` (erf's slope 1.13, asin's 1.57; ``t`` within 2x of
# ``s``), or below 89.5 at scale 1; a rounding at scale ``max(s, 1)`` is below
# ``2 |d| + 1``.
_BOUNDED_HI = {
    _unit_scale: lambda hi: 7,
    _near_identity_scale: lambda hi: max(7, hi + 2),
    _growing_scale: lambda hi: max(hi, 0) + 2,
}


def _nonlinear(prim: Primitive, scale_fn: Callable[[Any], Any], bounded: bool = False) -> Callable[..., Any]:
    hand_on = bounded and scale_fn in _BOUNDED_HI

    def rule(x: Any, **params: Any) -> Any:
        if not deferring(x.dtype):
            x = materialised(x)
        # Clamped to the normal range: an all-zero input (scale 0) must not give the
        # output scale 0 (``cos(0) = 1``) nor a division by it.
        t = _clamp_scale(scale_fn(x.scale))
        y = _div_by_scale(prim.bind(_value(x), **params), t)
        if hand_on and deferring(x.dtype):
            bounds = (_BOUNDED_HI[scale_fn](data_bounds(x)[0]), format_bounds(x.dtype)[1])
            # Bounded at its scale for data a narrow format holds; like the identity (or
            # a rounding) for small scales, it hands a Wide operand's range on as it is.
            return wide_result(y, t, x.dtype, scale_fn is not _unit_scale and needs_guard(x), bounds, (x,))
        if bounded:
            return ScaledArray(y.astype(x.dtype), t)
        return fit_to_format(y, t, x.dtype)

    guard = (
        "Its output is bounded at that scale: no range guard."
        if bounded else
        "Its output is unbounded at that scale, so it is range-guarded (`fit_to_format`): "
        "finite data wherever the float32 value is finite and inside the scale range."
    )
    deferral = (
        "Deferred rounding: reads a `Wide` operand's float32 value and hands a "
        "float16/float8 result on in float32 (`Wide`"
        + (")." if scale_fn is _unit_scale else
           "): where its scale follows the operand's, its data follow a Wide operand's "
           "data, so its chain is guarded at the end when the operand's chain is.")
        if hand_on else
        "Deferred rounding: reads a `Wide` operand's float32 value; its own result is "
        + ("rounded at once." if bounded else "guarded and rounded at once.")
    )
    doc = (
        f"``{prim.name}(x)`` computed in float32 on the unscaled value ``d * s`` and "
        f"{_SCALE_DOCS[scale_fn]}. {guard} {deferral}"
    )
    return _registered(prim, rule, doc, takes_deferred=(Wide,))


exp = _nonlinear(lax.exp_p, _unit_scale)
exp2 = _nonlinear(lax.exp2_p, _unit_scale)
cos = _nonlinear(lax.cos_p, _unit_scale, bounded=True)
cosh = _nonlinear(lax.cosh_p, _unit_scale)
acos = _nonlinear(lax.acos_p, _unit_scale, bounded=True)
acosh = _nonlinear(lax.acosh_p, _unit_scale, bounded=True)
logistic = _nonlinear(lax.logistic_p, _unit_scale, bounded=True)
erfc = _nonlinear(lax.erfc_p, _unit_scale, bounded=True)

tanh = _nonlinear(lax.tanh_p, _near_identity_scale, bounded=True)
sin = _nonlinear(lax.sin_p, _near_identity_scale, bounded=True)
tan = _nonlinear(lax.tan_p, _near_identity_scale)
asin = _nonlinear(lax.asin_p, _near_identity_scale, bounded=True)
atan = _nonlinear(lax.atan_p, _near_identity_scale, bounded=True)
sinh = _nonlinear(lax.sinh_p, _near_identity_scale)
asinh = _nonlinear(lax.asinh_p, _near_identity_scale, bounded=True)
atanh = _nonlinear(lax.atanh_p, _near_identity_scale)
erf = _nonlinear(lax.erf_p, _near_identity_scale, bounded=True)
erf_inv = _nonlinear(lax.erf_inv_p, _near_identity_scale)
expm1 = _nonlinear(lax.expm1_p, _near_identity_scale)
log1p = _nonlinear(lax.log1p_p, _near_identity_scale)

lgamma = _nonlinear(lax.lgamma_p, _growing_scale)
digamma = _nonlinear(lax.digamma_p, _pole_at_zero_scale)

bessel_i0e = _nonlinear(lax.bessel_i0e_p, _decaying_scale, bounded=True)
bessel_i1e = _nonlinear(lax.bessel_i1e_p, _odd_decaying_scale, bounded=True)

# Rounding to integers: for s >= 1 the value's integer part is at the data's scale (the
# result has the magnitude of x); for s < 1, |x| is below the data's magnitude and the
# results are small integers, held at scale 1.
round_ = _nonlinear(lax.round_p, _growing_scale, bounded=True)
floor = _nonlinear(lax.floor_p, _growing_scale, bounded=True)
ceil = _nonlinear(lax.ceil_p, _growing_scale, bounded=True)


@register_scaled_op(lax.atan2_p)
def atan2(x: Any, y: Any, **params: Any) -> ScaledArray:
    """``atan2(x, y)`` in float32 on both operands aligned to their smaller scale, as
    the comparisons (only their ratio matters: no underflow, and an overflow to +-inf
    gives atan2's correct limit), returned at scale 1 (an angle)."""
    a, b = _aligned_low(x, y)
    return ScaledArray(lax.atan2_p.bind(a, b, **params).astype(out_dtype(x, y)), one())


def _special_function(prim: Primitive) -> Callable[..., Any]:
    def rule(*operands: Any, **params: Any) -> ScaledArray:
        values = [in_scale(x, one()) for x in operands]
        y = prim.bind(*values, **params)
        return ScaledArray(y.astype(out_dtype(*operands)), one())

    return _registered(prim, rule, (
        f"``{prim.name}`` of several operands, computed in float32 on their unscaled "
        "values and returned at scale 1 (a special function whose magnitude no single "
        "input scale predicts; incomplete gamma and beta functions lie in [0, 1])."
    ))


igamma = _special_function(lax.igamma_p)
igammac = _special_function(lax.igammac_p)
igamma_grad_a = _special_function(lax.igamma_grad_a_p)
polygamma = _special_function(lax.polygamma_p)
zeta = _special_function(lax.zeta_p)
regularized_incomplete_beta = _special_function(lax.regularized_incomplete_beta_p)


# --------------------------------------------------------------------------------------
# Casts, precision and autodiff helpers.
# --------------------------------------------------------------------------------------


def _has_inf(dtype: Any) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isinf(np.array(np.inf, np.float32).astype(dtype)))


def _narrowing(new: np.dtype, old: np.dtype) -> bool:
    """A cast into a narrow float format with a smaller range than ``old``'s."""
    return is_float_dtype(new) and is_narrow(new) and float(jnp.finfo(new).max) < float(jnp.finfo(old).max)


def _places(sharding: Any) -> bool:
    """Whether a cast's ``sharding`` parameter places its result on mesh axes (JAX also
    passes a sharding over the empty mesh, which places nothing): such a cast is done
    on materialised data as written."""
    if sharding is None:
        return False
    mesh = getattr(sharding, "mesh", None)
    return mesh is None or bool(getattr(mesh, "axis_names", True))


def _convert_wide(x: Wide, new: np.dtype) -> Any:
    """`convert_element_type` of a `Wide` value to the float dtype ``new``, or None
    when it must be materialised first (see `convert_element_type`)."""
    if x.dtype.itemsize == 1 or not is_float_dtype(new):
        return None  # a float8 rounding is a deliberate quantisation: done as written
    if new == x.dtype:
        return x
    if is_narrow(new):
        guard = x.guard or _narrowing(new, x.dtype)
        return Wide(x.data, x.scale, new, guard, x.hi, x.lo, spread=x.spread, top=x.top)
    if not x.guard:
        return ScaledArray(cast(x.data, new), x.scale)
    if new == np.dtype(np.float32):
        return Wide(x.data, x.scale, new, True, x.hi, x.lo, band=x.band, spread=x.spread, top=x.top)
    return None


@register_scaled_op(lax.convert_element_type_p, takes_deferred=(Wide,))
def convert_element_type(x: Any, *, new_dtype: Any, **params: Any) -> Any:
    """Cast. To a float dtype: the data is cast and the scale kept (this is how a
    ScaledArray moves between float32, float16 and float8 without changing its
    magnitude); narrowing into float16 or a float8 format is range-guarded
    (`fit_to_format`: data beyond the format moves its excess into the scale); other
    finite data beyond a format without infinities saturates instead of becoming NaN
    (`scalify.core.formats.clip_to_format`). To an integer dtype: the value is unscaled
    in float32 and cast (plain output). To bool: ``data != 0`` (plain).

    Deferred rounding: a narrowing cast into float16/float8 is handed on in float32
    (`Wide`, guarded where the next rule that is not elementwise reads it). A `Wide`
    operand (a float16 result not rounded yet) cast to another float16/float8 format
    stays Wide with that target; cast to float32 or wider it is not rounded to float16
    on the way (its float32 data are kept: excess precision, as XLA's in plain float16
    JAX), and a chain that still needs its range guard stays Wide in float32 until a
    rule reads it (a ``reduce_sum`` measures its own scale and needs no guard). A Wide
    value with a float8 target, and casts to integers and bool, are materialised first:
    those roundings happen as written."""
    new = np.dtype(new_dtype)
    placed = _places(params.get("sharding"))
    if isinstance(x, Wide):
        out = None if placed else _convert_wide(x, new)
        if out is not None:
            return out
        x = x.materialise()
    if _narrowing(new, x.dtype) and deferring(new) and not placed:
        return Wide(cast(as_jax(x.data), np.float32), x.scale, new, True, *data_bounds(x))
    if is_float_dtype(new) and is_narrow(new) and float(jnp.finfo(new).max) < float(jnp.finfo(x.dtype).max):
        # Narrowing into float16/float8: range-guarded, the data's excess over the
        # format goes into the scale (float32 data of a drifted tensor, 1e16 at scale
        # 2**-86, would otherwise become inf).
        return fit_to_format(x.data, x.scale, new)
    if is_float_dtype(new):
        d = x.data
        if not _has_inf(new) and _has_inf(x.dtype):
            # An overflowing cast into a format without infinity gives NaN: finite data
            # beyond it saturate (infinities stay visible, as NaN).
            d = clip_to_format(d, new)
        data = lax.convert_element_type_p.bind(d, new_dtype=new_dtype, **params)
        return ScaledArray(data, x.scale)
    if new == np.dtype(bool):
        return lax.convert_element_type_p.bind(x.data, new_dtype=new_dtype, **params)
    return lax.convert_element_type_p.bind(_value(x), new_dtype=new_dtype, **params)


@register_scaled_op(lax.reduce_precision_p)
def reduce_precision(x: ScaledArray, **params: Any) -> ScaledArray:
    """Simulated cast applied to the data, scale kept: the mantissa is rounded as for
    the value (the scale is a power of two) and the exponent range is that of the
    *data*, which is what a real cast of a ScaledArray would see."""
    return keep_scale(lax.reduce_precision_p, x, **params)


@register_scaled_op(lax.stop_gradient_p, takes_deferred=(Wide,))
def stop_gradient(x: Any, **params: Any) -> Any:
    """``stop_gradient`` of data and scale: same value, same scale, no gradient (a
    `Wide` operand stays Wide)."""
    s = x.scale if is_static(x.scale) else lax.stop_gradient(x.scale)
    if isinstance(x, Wide):
        return x.with_data(lax.stop_gradient(x.data), s)
    return ScaledArray(lax.stop_gradient(x.data), s)
