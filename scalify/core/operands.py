"""How rules see their operands: scales, alignment and static (trace-time) knowledge.

Rules receive ScaledArrays and plain arrays mixed. A plain operand is read as scale 1,
except a *static* one (a NumPy value known at trace time: a literal, a folded constant
such as ``zeros_like`` or a ``-inf`` mask fill) whose value is the same everywhere:

- a finite non-zero constant ``c`` has scale ``pow2(|c|)``;
- a *scale-free* constant (0, +-inf, NaN) has the same value in every scale, so it
  takes no part in choosing a common scale and adopts whatever scale it is aligned to.

Scale arithmetic stays in NumPy when every scale is static, so it folds at trace time.
Operands aligned to a common scale are aligned to a power of two known as such at trace
time (`aligned_scale`), so the ratios of scales are multiplications by exact reciprocals,
never divisions (see `ratio_of` for why that matters to XLA).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.datatype import ScaledArray, compute_dtype, is_float_dtype  # noqa: F401
from scalify.core.pow2 import int_dtype, is_static, pow2_floor_and_reciprocal, pow2_reciprocal, pow2_round, pow2_round_down, xnp


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


def saturating_cast(x: Any, dtype: Any) -> Any:
    """``cast(x, dtype)``, saturating to the format's largest finite value for float8
    formats (E4M3FN has no infinity: an overflowing cast would give NaN)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 and is_float_dtype(dtype):
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -big, big)
    return cast(x, dtype)


def times_residual(data: Any, r: Optional[Any]) -> Any:
    """``data * r`` for the residual ``r`` of `scale_product` / `scale_quotient` (a
    scalar; None means 1)."""
    if r is None:
        return data
    return jax.lax.mul(data, cast(r, data.dtype))


def _scale_binary(np_fn: Any, lax_fn: Any) -> Any:
    def op(a: Any, b: Any) -> Any:
        if is_static(a) and is_static(b):
            with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
                return np_fn(a, b)
        dtype = scales_dtype(a, b)
        return lax_fn(cast(a, dtype), cast(b, dtype))

    op.__doc__ = f"``{np_fn.__name__}`` of two scales: NumPy when both are static, else `lax`."
    return op


scale_mul = _scale_binary(np.multiply, jax.lax.mul)
scale_div = _scale_binary(np.divide, jax.lax.div)
scale_max = _scale_binary(np.maximum, jax.lax.max)


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
    inv = None if is_static(b) else exact_reciprocal(b)
    return scale_div(a, b) if inv is None else scale_mul(a, inv)


# --------------------------------------------------------------------------------------
# Trace-time knowledge that a traced scale is a power of two.
#
# A ratio of scales whose divisor is a power of two needs no division (`ratio_of`). The
# scales rules choose to align operands to (`hypot_scale`, `common_scale`) are rounded
# to powers of two and registered here while a `scalify` trace runs. The registry holds
# the tracer itself (so its id cannot be reused while registered) and is emptied when
# the trace ends (`pow2_scope`). A scale missing from it is only divided: the registry
# never decides a value, only which exact formula computes it.
# --------------------------------------------------------------------------------------

_POW2_SCALES: dict = {}
_POW2_DEPTH = [0]  # open `pow2_scope`s: outside any, nothing is registered


def mark_pow2(s: Any) -> Any:
    """Register the traced scale ``s`` as an exact power of two (returns ``s``) for the
    rest of the enclosing `pow2_scope` (outside one, a no-op). Only for values with no
    gradient path that `ratio_of` would drop: its reciprocal is built from bits, so a
    divisor must be constant to autodiff (see `aligned_scale`)."""
    if _POW2_DEPTH[0] and not is_static(s):
        # The reciprocal is built here, in the trace that made ``s``: every operand
        # aligned to ``s`` shares it, also from inside a loop body traced later.
        _register_pow2(s, pow2_reciprocal(s))
    return s


def _register_pow2(s: Any, inv: Any) -> None:
    """Record the traced power of two ``s`` with its reciprocal ``inv`` for the rest of
    the enclosing `pow2_scope` (outside one, a no-op)."""
    if _POW2_DEPTH[0]:
        _POW2_SCALES[id(s)] = (s, inv)


def exact_reciprocal(s: Any) -> Optional[Any]:
    """``1 / s`` when it is exact and needs no division: ``s`` a static normal power of
    two (NumPy), or a traced one registered by `mark_pow2` (its shared reciprocal).
    None otherwise."""
    if is_static(s):
        v = np.asarray(s)
        normal = np.all(v >= np.finfo(v.dtype).tiny) if v.dtype.kind == "f" else False
        return pow2_reciprocal(v) if normal and np.all(pow2_round_down(v) == v) else None
    entry = _POW2_SCALES.get(id(s))
    return entry[1] if entry is not None and entry[0] is s else None


def known_pow2(s: Any) -> bool:
    """True when ``s`` is known at trace time to be an exact (normal) power of two."""
    return exact_reciprocal(s) is not None


@contextlib.contextmanager
def pow2_scope() -> Iterator[None]:
    """Context of one `scalify` trace: registrations last until it exits, so that the
    registry never outlives (or keeps alive) a trace's tracers. Nested scopes restore
    the outer scope's registrations."""
    outer = dict(_POW2_SCALES)
    _POW2_DEPTH[0] += 1
    try:
        yield
    finally:
        _POW2_DEPTH[0] -= 1
        _POW2_SCALES.clear()
        _POW2_SCALES.update(outer)


def computed_once(s: Any) -> Any:
    """The traced scalar scale ``s``, marked for XLA to compute once: ``rem(s, inf)``,
    which is exactly ``s`` (a power-of-two registration and its reciprocal carried over).

    Why: XLA copies cheap scalar producers into every kernel that uses them, so each
    scale's whole computation (back to the inputs, through every rule before it) would
    be inlined into every kernel touching a tensor at that scale. In a deep unrolled
    model the copies grow with depth times the number of kernels, and kernels that are
    identical in the plain program become distinct, each compiled on its own (a
    two-block Flax NNX transformer step compiled 10x slower than plain JAX, with 50x the
    HLO instructions). A float remainder is an operation XLA never copies into several
    consumers, so each rule's output scale is computed once, in a small kernel of its
    own, and consumers read it: kernels stay identical and are compiled once.
    """
    if is_static(s) or np.shape(s) != ():
        return s
    inf = np.asarray(np.inf, s.dtype)
    inv = exact_reciprocal(s)
    out = jax.lax.rem(s, inf)
    if inv is not None:  # registered reciprocals are traced too
        _register_pow2(out, jax.lax.rem(inv, inf))
    return out


def aligned_scale(s: Any) -> Any:
    """The scale operands are aligned to, from the candidate ``s`` (their largest scale).

    With a rounding mode (not NONE) a traced candidate is rounded down to a power of two
    (`pow2_floor`: exact powers unchanged, three bit operations) and registered, so that aligning
    to it multiplies by an exact reciprocal instead of dividing (`ratio_of`). It carries
    no gradient: the aligned value ``(x.data * sx / s) * s`` does not depend on ``s``, and
    the reciprocal built from bits has no derivative either, so both sides agree. Static
    candidates and NONE mode return ``s`` unchanged.
    """
    if is_static(s) or get_config().rounding_mode == Pow2RoundMode.NONE:
        return s
    if known_pow2(s):
        return s
    f, inv = pow2_floor_and_reciprocal(s)
    _register_pow2(f, inv)
    return f


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
    for x in xs:
        sx = scale_of(x)
        if sx is not None and is_static(x):
            sx = sx * _headroom(np.asarray(x).dtype)
        if sx is not None:
            scales.append(sx)
    if not scales:
        return one()
    return _aligned_largest(_largest(scales), scales)


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
    total = sum((s / m) ** 2 for s in scales)
    return aligned_scale(pow2_round(m * mod.sqrt(total)))


def out_dtype(*xs: Any) -> np.dtype:
    """Result dtype of operands the jaxpr already made consistent: the dtype of the first
    non-static operand (literals may be weakly typed)."""
    for x in xs:
        if not is_static(x):
            return np.dtype(x.dtype)
    return np.asarray(xs[0]).dtype


# --------------------------------------------------------------------------------------
# Scale arithmetic with range clamping: products and quotients of scales as
# ``(scale, residual)``. A scale must stay a finite, non-zero power of two, so a product
# outside the normal range of the scale dtype is clamped to it and the excess (the
# residual) is multiplied into the data instead.
# --------------------------------------------------------------------------------------


def scale_bounds(dtype: Any) -> Tuple[float, float, int, int]:
    """Smallest normal and largest power of two of a scale dtype, and their exponents."""
    fi = jnp.finfo(dtype)
    return float(fi.tiny), float(2.0 ** (fi.maxexp - 1)), int(fi.minexp), int(fi.maxexp - 1)


def scales_dtype(*scales: Any) -> np.dtype:
    """The dtype scale arithmetic on ``scales`` computes in."""
    # Python numbers are weakly typed: they take the dtype of the arrays beside them.
    dtypes = [np.asarray(s).dtype if is_static(s) else s.dtype
              for s in scales if not isinstance(s, (int, float))]
    return np.dtype(jnp.result_type(*dtypes)) if dtypes else scale_dtype()


def clip_scale(x: Any, lo: float, hi: float) -> Any:
    """``clamp(lo, x, hi)`` of a traced scalar (bounds cast to its dtype)."""
    return jax.lax.clamp(np.asarray(lo, x.dtype), x, np.asarray(hi, x.dtype))


def _is_one(s: Any) -> bool:
    return is_static(s) and bool(np.asarray(s) == 1)


def _static_clamped(p: float, dtype: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A static scale value ``p`` (exact, float64) as (scale clamped to range, residual)."""
    lo, hi, _, _ = scale_bounds(dtype)
    s = min(max(p, lo), hi)
    with np.errstate(over="ignore", under="ignore"):
        r = None if s == p else np.asarray(p / s, np.float32)
    return np.asarray(s, dtype), r


def scale_product(a: Any, b: Any) -> Tuple[Any, Optional[Any]]:
    """``a * b`` as ``(scale, residual)``: ``scale`` is the product clamped to the normal
    range of the scale dtype and ``residual = a * b / scale`` (None when exactly 1) must be
    multiplied into the data. Static scales fold in NumPy; the residual is exact for
    powers of two."""
    if _is_one(a):
        return b, None
    if _is_one(b):
        return a, None
    dtype = scales_dtype(a, b)
    if is_static(a) and is_static(b):
        return _static_clamped(float(a) * float(b), dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    if np.shape(a) == () and np.shape(b) == ():
        return _traced_scale_product(a, b)
    return _clamped_product(a, b)


def _clamped_product(a: Any, b: Any) -> Tuple[Any, Any]:
    """The traced body of `scale_product`: ``(clamp(a * b), residual)``."""
    dtype = np.dtype(a.dtype)
    lo, hi, _, _ = scale_bounds(dtype)
    p = jax.lax.mul(a, b)
    s = clip_scale(p, lo, hi)
    # residual = a * b / s when clamped, with no division (it would be a scalar kernel
    # of its own: XLA never duplicates a division into its consumers). Dividing by the
    # bound s (a power of two) is an exact shift of one factor's exponent bits, taken
    # where it stays normal: over the top, max(a, b) > sqrt(hi), so max(a, b) / hi
    # is normal; under the bottom, min(a, b) < sqrt(lo), so min(a, b) / lo is normal.
    # (Multiplying by constant powers of two instead is not safe: XLA reassociates
    # constant factors into one, a subnormal that is flushed to zero.)
    fi = jnp.finfo(dtype)
    itype = int_dtype(dtype)

    def shift(x: Any, k: int) -> Any:  # x * 2**k, for x * 2**k normal
        # Bits carry no gradient (as in the pow2 helpers): stopped explicitly, since
        # `bitcast_convert_type` has no transpose rule.
        x = jax.lax.stop_gradient(x)
        bits = jax.lax.add(jax.lax.bitcast_convert_type(x, itype), itype(k << int(fi.nmant)))
        return jax.lax.bitcast_convert_type(bits, dtype)

    small, big = jax.lax.min(a, b), jax.lax.max(a, b)
    over = jax.lax.mul(shift(big, -int(np.log2(hi))), small)
    under = jax.lax.mul(shift(small, -int(np.log2(lo))), big)
    r = jax.lax.select(jax.lax.gt(p, s), over, jax.lax.select(jax.lax.lt(p, s), under, np.ones((), dtype)))
    return s, r


# Scalar scales (all of them, in practice): one `jit` equation per product, whose body
# is traced once per dtype instead of ~15 primitives traced at every rule.
_traced_scale_product = jax.jit(_clamped_product)


def scale_quotient(a: Any, b: Any) -> Tuple[Any, Optional[Any]]:
    """``a / b`` as ``(scale, residual)``, as `scale_product`. A divisor known to be a
    power of two (static, or `known_pow2`) multiplies by its exact reciprocal instead
    (no division: see `ratio_of`)."""
    if _is_one(b):
        return a, None
    dtype = scales_dtype(a, b)
    if is_static(a) and is_static(b):
        return _static_clamped(float(a) / float(b), dtype)
    inv = exact_reciprocal(b)
    if inv is not None:
        return scale_product(a, cast(inv, dtype))
    lo, hi, _, _ = scale_bounds(dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    p = jax.lax.div(a, b)
    s = clip_scale(p, lo, hi)
    r = jax.lax.select(jax.lax.eq(p, s), np.ones((), dtype), jax.lax.div(jax.lax.div(a, s), b))
    return s, r
