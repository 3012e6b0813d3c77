"""How rules see their operands: scales, alignment and static (trace-time) knowledge.

Rules receive ScaledArrays and plain arrays mixed. A plain operand is read as scale 1,
except a *static* one (a NumPy value known at trace time: a literal, a folded constant
such as ``zeros_like`` or a ``-inf`` mask fill) whose value is the same everywhere:

- a finite non-zero constant ``c`` has scale ``pow2(|c|)``;
- a *scale-free* constant (0, +-inf, NaN) has the same value in every scale, so it
  takes no part in choosing a common scale and adopts whatever scale it is aligned to.

A *traced plain scalar* (a learning rate from a schedule, a norm computed by the user)
is read at its own power-of-two magnitude ``pow2(|c|)`` (0 for 0), measured with three
scalar bit operations, so that multiplying by it moves its magnitude into the scale
instead of leaving data ``c`` times off unit size.

**Zeros.** A scale of 0 is the all-zero tensor: it carries no magnitude, so the largest
(or hypotenuse) scale of operands ignores it, products with it are 0 at scale 0, and
ratios to a zero target scale are 0, never ``0 / 0``.

Operands aligned to a common scale are aligned to a power of two known as such at trace
time (`aligned_scale`), so the ratios of scales are multiplications by exact reciprocals,
never divisions (see `ratio_of` for why that matters to XLA).

The layers below this module, one concept each, are re-exported here so that a rule
imports what it needs from one place:

- `scalify.core.static`: static values, `cast`, `as_jax`;
- `scalify.core.trace_state`: which traced scales are known powers of two;
- `scalify.core.scale_math`: products and quotients of scales kept in range;
- `scalify.core.formats`: narrow formats and the saturating cast;
- `scalify.core.range_guard`: `fit_to_format`;
- `scalify.core.wide`: deferred narrow rounding (`Wide`).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config, narrow_contractions
from scalify.core.datatype import ScaledArray, compute_dtype, is_float_dtype
from scalify.core.formats import format_bounds, is_narrow, saturating_cast
from scalify.core.pow2 import is_static, pow2_reciprocal, pow2_round, xnp
from scalify.core.range_guard import fit_to_format, guard_band
from scalify.core.scale_math import (
    clip_scale,
    scale_bounds,
    scale_div,
    scale_max,
    scale_mul,
    scale_product,
    scale_quotient,
    scales_dtype,
    times_residual,
)
from scalify.core.static import as_jax, cast, is_scale_free, one, scale_dtype, static_scale, static_uniform_value
from scalify.core.trace_state import (
    aligned_scale,
    computed_once,
    exact_reciprocal,
    known_pow2,
    mark_pow2,
    pow2_scope,
    register_pow2,
)
from scalify.core.wide import (
    WIDE_HI,
    WIDE_LO,
    Wide,
    bounded_operands,
    data_bounds,
    deferring,
    materialised,
    needs_guard,
    wide_result,
    within_wide_bounds,
)

__all__ = [
    # defined here: reading operands
    "scale_of", "scalar_scale", "promote", "in_scale", "ratio_of", "common_scale",
    "hypot_scale", "out_dtype", "broadcast_narrow", "mixed_scales", "gather_aligned",
    "gathered_result",
    # re-exported from the layers below
    "ScaledArray", "compute_dtype", "is_float_dtype",
    "as_jax", "cast", "is_scale_free", "one", "scale_dtype", "static_scale", "static_uniform_value",
    "aligned_scale", "computed_once", "exact_reciprocal", "known_pow2", "mark_pow2", "pow2_scope",
    "clip_scale", "scale_bounds", "scale_div", "scale_max", "scale_mul", "scale_product",
    "scale_quotient", "scales_dtype", "times_residual",
    "format_bounds", "is_narrow", "saturating_cast", "fit_to_format", "guard_band",
    "WIDE_HI", "WIDE_LO", "Wide", "bounded_operands", "data_bounds", "deferring", "materialised",
    "needs_guard", "wide_result", "within_wide_bounds",
]


def scale_of(x: Any) -> Any:
    """The scale an operand is read with (None for scale-free constants); a traced plain
    float scalar is read at its power of two (`scalar_scale`), a static operand at
    `static_scale`."""
    if isinstance(x, (ScaledArray, Wide)):
        return x.scale
    if not is_static(x) and np.shape(x) == () and is_float_dtype(x.dtype):
        return scalar_scale(x)
    if is_static(x):
        return static_scale(x)
    return one()


def scalar_scale(x: Any) -> Any:
    """``pow2_floor(|x|)`` of a traced float scalar, in the scale dtype: 0 for 0 (and
    subnormals), 1 for inf/NaN (kept visible in the data). Registered as a power of two,
    so aligning to it multiplies by an exact reciprocal. No gradient (as every scale)."""
    from scalify.core.pow2 import pow2_floor

    a = cast(jax.lax.abs(jax.lax.stop_gradient(x)), scale_dtype())
    f = pow2_floor(a)
    s = jax.lax.select(jax.lax.is_finite(a), f, np.ones((), f.dtype))
    register_pow2(s, pow2_reciprocal(s))
    return s


def promote(x: Any) -> ScaledArray:
    """Any float operand as a ScaledArray of the same value (ScaledArrays unchanged, a
    `Wide` value materialised)."""
    if isinstance(x, ScaledArray):
        return x
    if isinstance(x, Wide):
        return x.materialise()
    s = scale_of(x)
    s = one() if s is None else s
    return ScaledArray(in_scale(x, s, np.asarray(x).dtype if is_static(x) else x.dtype), s)


def in_scale(x: Any, scale: Any, dtype: Any = None) -> Any:
    """The value of ``x`` divided by ``scale``, as an array of ``dtype``.

    ``dtype`` defaults to the compute dtype (float32 or wider). Exact when the ratio of
    scales is a power of two and the result is in range. Static uniform operands become
    a broadcast constant (cheap in HLO), never an embedded array. A `Wide` operand is
    read from its float32 data (no rounding to its narrow dtype on the way).
    """
    if isinstance(x, (ScaledArray, Wide)):
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
        v = ratio_of(np.asarray(c, scale_dtype()), scale)
        return _full(np.shape(x), v, dtype)
    if is_static(scale) and scale == 1:
        return _astype(x, dtype)
    return _mul(x, ratio_of(one(), scale), dtype)


def ratio_of(a: Any, b: Any) -> Any:
    """``a / b`` for scales: NumPy when both are static; 1 when they are the same value;
    ``a * (1/b)`` with the exact exponent-bit reciprocal when ``b`` is a traced scale
    known to be a power of two (`known_pow2`), else a division.

    Why avoid the division: XLA never duplicates a division into the fusions that use
    it, so every distinct scale ratio would compile to a scalar kernel of its own; a
    multiplication by a reciprocal built from integer bit operations is duplicated into
    its consumers instead, and costs no kernel.
    """
    if a is b:
        return one()
    if is_static(b) and np.all(np.asarray(b) == 0):
        # A zero target scale (operands all zero): the ratio of a zero operand is 0, not
        # 0 / 0; a non-zero one (never aligned to 0 by the rules) becomes huge, not 0.
        b = np.asarray(np.finfo(np.asarray(b).dtype).tiny, np.asarray(b).dtype)
    inv = None if is_static(b) else exact_reciprocal(b)
    if inv is not None:
        return scale_mul(a, inv)
    if not is_static(b):
        # A zero target scale (operands that are all zero): 0 / 0 would make the data
        # NaN. Dividing by the smallest normal instead gives 0 for a zero ``a``.
        b = jax.lax.max(b, np.asarray(np.finfo(b.dtype).tiny, b.dtype))
    return scale_div(a, b)


def _mul(data: Any, factor: Any, dtype: Any) -> Any:
    cd = compute_dtype(np.dtype(dtype))
    return cast(jax.lax.mul(cast(as_jax(data), cd), cast(factor, cd)), dtype)


def _astype(x: Any, dtype: Any) -> Any:
    return cast(as_jax(x), dtype)


def _full(shape: Sequence[int], value: Any, dtype: Any) -> Any:
    return jax.lax.broadcast(cast(value, dtype), tuple(shape))


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
    exact. Scale-free constants (0, +-inf, NaN) never count; 1 if nothing does. Two or
    more distinct traced scales give `aligned_scale` of their maximum.
    """
    scales = []
    infinite_constant = False
    for x in xs:
        sx = scale_of(x)
        if sx is None and is_static(x):
            c = static_uniform_value(x)
            infinite_constant |= c is not None and not np.isfinite(c)
        if sx is not None and is_static(x):
            sx = sx * _headroom(np.asarray(x).dtype)
        if sx is not None:
            scales.append(sx)
    if not scales:
        return one()
    s = _aligned_largest(_largest(scales), scales)
    if infinite_constant and not is_static(s):
        # All traced operands zero (scale 0) beside a -inf mask fill: the result must
        # not hold -inf at scale 0 (whose value, -inf * 0, is NaN).
        lo = np.asarray(np.finfo(s.dtype).tiny, s.dtype)
        s = mark_pow2(jax.lax.max(s, lo))
    return s


def mixed_scales(xs: Sequence[Any]) -> bool:
    """True when the traced operands among ``xs`` are read at two or more distinct
    scales: traced scales compared by identity (pieces of one ScaledArray share theirs),
    static ones by value. Their ratio is then unknown at trace time."""
    keys = set()
    for x in xs:
        if is_static(x):
            continue
        s = scale_of(x)
        if s is not None:
            keys.add(("value", float(s)) if is_static(s) else ("traced", id(s)))
    return len(keys) > 1


def gather_aligned(xs: Sequence[Any]) -> tuple:
    """``(s, datas, mixed)`` for a rule that gathers the elements of several operands
    into one result (concatenate, stack, pad, scatter, dynamic_update_slice): the
    largest operand scale `common_scale` and every operand's data in it, and whether
    the operands' scales are `mixed_scales`.

    Operands at one scale keep their dtype (the result is bit-exact). Operands at
    distinct traced scales of a narrow format are aligned in float32 and the result is
    left for `gathered_result` to round: aligned in float16, an operand 2**30 below the
    largest scale would flush to 0, and a ``log`` or ``rsqrt`` of it be infinite."""
    dtype = out_dtype(*xs)
    s = common_scale(*xs)
    mixed = is_narrow(dtype) and mixed_scales(xs)
    cd = compute_dtype(dtype) if mixed else dtype
    return s, [in_scale(x, s, cd) for x in xs], mixed


def gathered_result(out: Any, s: Any, dtype: Any, mixed: bool) -> ScaledArray:
    """The result of a gathering rule from its data ``out`` at scale ``s`` (see
    `gather_aligned`): as it is for operands at one scale; for mixed ones rounded with
    its max-abs at the top of the format's guard band (`fit_to_format` with
    ``spread``), which leaves the format's whole range below the largest element to
    the elements of the smaller operands, as a selection among them does."""
    return fit_to_format(out, s, dtype, spread=True) if mixed else ScaledArray(out, s)


def _largest(scales: Sequence[Any]) -> Any:
    """The largest of ``scales`` (a repeated value object costs no ``max``)."""
    out = scales[0]
    for s in scales[1:]:
        out = out if s is out else scale_max(out, s)
    return out


def _aligned_largest(m: Any, scales: Sequence[Any]) -> Any:
    """`aligned_scale` of ``m = _largest(scales)``; a single distinct value object is
    kept as it is (its ratio to itself is 1: nothing to align)."""
    return m if all(s is m for s in scales) else aligned_scale(m)


def hypot_scale(*scales: Any) -> Any:
    """``pow2(sqrt(sum(s**2)))`` without overflow, ignoring None (scale-free) entries.

    For power-of-two scales (all that rules and `as_scaled_array` produce) the rounded
    hypotenuse has a closed form: with ``m = max(s)`` and ``n`` scales, ``sqrt(sum s**2)``
    lies in ``[m, m * sqrt(n)]``, so rounding DOWN gives ``m`` when ``n <= 3`` (the sum is
    below ``4 m**2``), and rounding UP gives ``2 m`` when the sum is above ``m**2`` and
    ``n <= 4``, i.e. when some other scale is present. Using the closed form emits one
    ``max`` per scale instead of the ~20 scalar ops of the general formula (the general
    formula is kept for NONE/STOCHASTIC rounding, more operands, and static scales, where
    it folds in NumPy anyway). The traced result goes through `aligned_scale`: a
    non-power-of-two scale a user passed in gives a power-of-two output scale, and the
    operands are aligned to it without a division.
    """
    scales = [s for s in scales if s is not None]
    if not scales:
        return one()
    if len(scales) == 1:
        return scales[0]
    mod = xnp(*scales)
    m = _largest(scales)
    mode = get_config().rounding_mode
    if mod is jnp and mode == Pow2RoundMode.DOWN and len(scales) <= 3:
        return _aligned_largest(m, scales)
    if mod is jnp and mode == Pow2RoundMode.UP and len(scales) <= 4:
        return mark_pow2(scale_mul(aligned_scale(m), 2))
    if mod is np and m == 0:
        return m  # every operand all-zero
    m_safe = m if mod is np else jax.lax.max(m, np.asarray(np.finfo(m.dtype).tiny, m.dtype))
    total = sum((s / m_safe) ** 2 for s in scales)
    return aligned_scale(pow2_round(m * mod.sqrt(total)))


def out_dtype(*xs: Any) -> np.dtype:
    """Result dtype of operands the jaxpr already made consistent: the dtype of the first
    non-static operand (literals may be weakly typed)."""
    for x in xs:
        if not is_static(x):
            return np.dtype(x.dtype)
    return np.asarray(xs[0]).dtype


def broadcast_narrow(*xs: Any) -> Sequence[Any]:
    """The operands of an elementwise op, those it broadcasts (size-1 dimensions against
    the others' shape) broadcast on their narrow data first, where devices share the
    program (`ScalifyConfig.narrow_contractions`); unchanged elsewhere.

    Why: XLA's SPMD partitioner gathers an operand sharded along a dimension the op
    broadcasts at the op itself, in the dtype the op reads it in, and a scaled rule reads
    its operands in float32 (`in_scale`): the main job's position embedding, FSDP-sharded,
    crossed devices in float32 at ``tok_emb[tokens] + pos_emb`` (twice a bfloat16
    program's bytes). Broadcast first, the gather moves the 16-bit or float8 data."""
    if not narrow_contractions():
        return xs
    shapes = [np.shape(x) for x in xs if not is_static(x)]
    if len({len(sh) for sh in shapes}) != 1:
        return xs
    shape = tuple(max(d) for d in zip(*shapes))
    return tuple(
        ScaledArray(jax.lax.broadcast_in_dim(x.data, shape, tuple(range(len(shape)))), x.scale)
        if isinstance(x, ScaledArray) and is_narrow(x.dtype) and tuple(x.shape) != shape else x
        for x in xs
    )
