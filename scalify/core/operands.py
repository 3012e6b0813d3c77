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

Scale arithmetic stays in NumPy when every scale is static, so it folds at trace time.
Operands aligned to a common scale are aligned to a power of two known as such at trace
time (`aligned_scale`), so the ratios of scales are multiplications by exact reciprocals,
never divisions (see `ratio_of` for why that matters to XLA).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.datatype import ScaledArray, compute_dtype, is_float_dtype  # noqa: F401
from scalify.core.pow2 import int_dtype, is_static, pow2_floor_and_reciprocal, pow2_reciprocal, pow2_round, pow2_round_down, xnp
from scalify.core.registry import Deferred


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
    """``cast(x, dtype)``, saturating finite values to the format's largest finite value
    for float8 formats (E4M3FN has no infinity: an overflowing cast would give NaN);
    infinities and NaN are cast as they are, so that they stay visible."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 and is_float_dtype(dtype):
        big = float(jnp.finfo(dtype).max)
        x = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)
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
    """The scale an operand is read with (None for scale-free constants); a traced plain
    float scalar is read at its power of two (`scalar_scale`)."""
    if isinstance(x, (ScaledArray, Wide)):
        return x.scale
    if not is_static(x) and np.shape(x) == () and is_float_dtype(x.dtype):
        return scalar_scale(x)
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


def scalar_scale(x: Any) -> Any:
    """``pow2_floor(|x|)`` of a traced float scalar, in the scale dtype: 0 for 0 (and
    subnormals), 1 for inf/NaN (kept visible in the data). Registered as a power of two,
    so aligning to it multiplies by an exact reciprocal. No gradient (as every scale)."""
    from scalify.core.pow2 import pow2_floor

    a = cast(jax.lax.abs(jax.lax.stop_gradient(x)), scale_dtype())
    f = pow2_floor(a)
    s = jax.lax.select(jax.lax.is_finite(a), f, np.ones((), f.dtype))
    _register_pow2(s, pow2_reciprocal(s))
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
    if p == 0:  # a zero factor (float64 products of normal float32 scales never underflow)
        return np.zeros((), dtype), None
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
    one_ = np.ones((), dtype)
    r = jax.lax.select(jax.lax.gt(p, s), over, jax.lax.select(jax.lax.lt(p, s), under, one_))
    # A zero factor (an all-zero operand): the product is the zero tensor, scale 0.
    zero = jax.lax.eq(small, np.zeros((), dtype))
    return jax.lax.select(zero, small, s), jax.lax.select(zero, one_, r)


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
        with np.errstate(divide="ignore", invalid="ignore"):
            return _static_clamped(float(np.float64(a) / np.float64(b)), dtype)
    inv = exact_reciprocal(b)
    if inv is not None:
        return scale_product(a, cast(inv, dtype))
    lo, hi, _, _ = scale_bounds(dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    p = jax.lax.div(a, b)
    s = clip_scale(p, lo, hi)
    one_ = np.ones((), dtype)
    r = jax.lax.select(jax.lax.eq(p, s), one_, jax.lax.div(jax.lax.div(a, s), b))
    zero = jax.lax.eq(a, np.zeros((), dtype))  # an all-zero dividend: scale 0
    return jax.lax.select(zero, a, s), jax.lax.select(zero, one_, r)


# --------------------------------------------------------------------------------------
# Range guard: data that a static scale estimate let leave a narrow format.
# --------------------------------------------------------------------------------------


def is_narrow(dtype: Any) -> bool:
    """True for float formats whose exponent range is narrower than float32's (float16,
    the float8 formats): there a static scale estimate that is off by the format's range
    overflows (or flushes) data whose value float32 holds. bfloat16 shares float32's
    exponent range, and rules compute in float32, so its data overflows only where the
    float32 computation itself would."""
    dtype = np.dtype(dtype)
    return is_float_dtype(dtype) and dtype.itemsize < 4 and int(jnp.finfo(dtype).maxexp) < 128


def guard_band(dtype: Any) -> Tuple[float, float, int]:
    """``(lo, hi, t)`` of the guard of ``dtype``: data whose max-abs lies in ``[lo, hi]``
    keeps its static scale; other data is rescaled to a max-abs in ``[2**t, 2**(t+1))``.

    ``hi`` is 16x below the format's largest power of two (float16: 2**11), so that the
    bounded growth of the rules that are not guarded (a sum doubles at most, a constant
    factor is below 2) never reaches the top; ``lo = 2**-4`` keeps unit-variance data
    (max-abs 2-5) untouched while data drifting towards the subnormals is lifted; the
    target ``2**t`` (float16: 8) is the max-abs of unit-variance data."""
    dtype = np.dtype(dtype)
    top = int(jnp.finfo(dtype).maxexp) - 1  # exponent of the largest power of two
    t = min(3, top - 5)
    return 2.0**-4, 2.0 ** (top - 4), t


def fit_to_format(data: Any, scale: Any, dtype: Any, spread: bool = False, band: Any = None) -> ScaledArray:
    """``ScaledArray(data cast to dtype, scale)``, range-guarded for narrow formats.

    ``data`` is a rule's result in the compute dtype (float32) at the rule's static
    ``scale``. For a narrow ``dtype`` (`is_narrow`) with `ScalifyConfig.range_guard`
    on, the max-abs ``a`` of ``data`` is measured (one reduction, no gradient): inside
    the band ``[lo, hi]`` of `guard_band` nothing changes; outside it the power of two
    ``m = pow2_floor(a) / 2**t`` moves from the data into the scale (exact), so the data
    is finite whenever its float32 value is and inside the scale range. An all-zero
    result gets scale 0 (the zero tensor); inf/NaN data keep the static scale (they stay
    visible). Wide formats (bfloat16, float32) are cast as they are.

    With ``spread`` the max-abs is always moved to ``[hi/2, hi)``, the top of the band:
    for results that gather elements of operands at very different scales (a selection),
    whose small elements need all the format's range below the largest.

    ``band`` (default ``dtype``) is the narrow format whose band applies when it is not
    ``dtype``: a float32 result that is to be guarded as if it were float16 (a `Wide`
    value converted to float32 before its guard: see `Wide`).
    """
    dtype = np.dtype(dtype)
    band = dtype if band is None else np.dtype(band)
    if not (is_narrow(band) and get_config().range_guard) or np.ndim(data) == 0 and is_static(data):
        return ScaledArray(saturating_cast(as_jax(data), dtype), scale)
    data = as_jax(data)
    cd = compute_dtype(dtype)
    data = cast(data, cd)
    lo, hi, t = guard_band(band)
    if spread:
        t = int(np.log2(hi)) - 1
        lo = hi = 0.0  # no band: always rescaled
    a = jax.lax.stop_gradient(jax.lax.reduce_max(jax.lax.abs(data), tuple(range(data.ndim))))
    a = cast(a, np.float32)
    m, inv = _guard_factor(a, np.float32(lo), np.float32(hi), t)
    if not is_static(scale):
        m = cast(m, scale.dtype)
    s, r = scale_product(scale, m)
    out = jax.lax.mul(data, cast(inv, cd))
    return ScaledArray(saturating_cast(times_residual(out, r), dtype), s)


@functools.partial(jax.jit, static_argnums=3)
def _guard_factor(a: Any, lo: Any, hi: Any, t: int) -> Tuple[Any, Any]:
    """``(m, 1/m)``: the power of two the guard moves from data to scale for a max-abs
    ``a`` (1 inside ``[lo, hi]`` or for inf/NaN; 0 for ``a == 0``, with ``1/m = 1``).
    One `jit` equation traced once, from exponent bits (exact, no division)."""
    from scalify.core.pow2 import exp2_int, exponent

    lax = jax.lax
    one_ = np.float32(1)
    k = lax.sub(exponent(a), np.int32(t))
    k = lax.clamp(np.int32(-125), k, np.int32(125))
    keep = lax.bitwise_or(lax.bitwise_and(lax.ge(a, lo), lax.le(a, hi)), lax.ne(a, a))
    keep = lax.bitwise_or(keep, lax.eq(a, np.float32(np.inf)))
    m = lax.select(keep, one_, exp2_int(k, np.float32))
    inv = lax.select(keep, one_, exp2_int(lax.neg(k), np.float32))
    zero = lax.eq(a, np.float32(0))
    return lax.select(zero, np.float32(0), m), lax.select(zero, one_, inv)


# --------------------------------------------------------------------------------------
# Deferred narrow rounding: elementwise chains hand on float32 results (`Wide`).
# --------------------------------------------------------------------------------------

# Limits of a `Wide` value's static data bounds (log2 of magnitudes in units of its
# scale): float32 holds 2**-126 to 2**128, and the margins cover what the bounds do not
# count (the final guard's rescaling, rounding of the last float32 operation).
WIDE_HI = 124
WIDE_LO = -124


class Wide(Deferred):
    """An elementwise rule's result kept in float32, not yet rounded to its narrow
    ``dtype`` (float16, float8) nor range-guarded: the value is ``data * scale`` with
    ``data`` float32 at the rule's static ``scale``.

    Why: rounding every result of an elementwise chain to float16 costs a round trip
    per rule, and range-guarding every risky one (products, powers, quotients) a max-abs
    reduction per rule. An elementwise rule registered ``takes_deferred`` reads a Wide
    operand's float32 data directly and returns a Wide again; any other rule, an
    observer and the jaxpr's outputs get the materialised ScaledArray (`materialise`):
    ``fit_to_format(data, scale, dtype)`` when ``guard`` (some rule of the chain needed
    the range guard), else the plain saturating cast. A layer norm or a GELU then
    measures one max-abs, not one per product, and its intermediate values keep float32
    precision (as XLA's excess precision does in plain float16 JAX).

    Safety inside a chain: ``hi`` and ``lo`` are static bounds on ``log2 |data|``:
    every element is below ``2**hi``, and every non-zero element that is a product,
    quotient or power of its operands' non-zero elements is at least ``2**lo`` (sums
    that cancel may go below it, as they do in float32 itself). A materialised narrow
    operand has its format's bounds (float16: 16 and -24); each rule derives its
    result's bounds from its operands' (`data_bounds`), and one whose result would leave
    ``[WIDE_LO, WIDE_HI]`` first materialises its Wide operands (`bounded_operands`):
    float32 never over- or underflows in a chain where the float32 value itself does
    not.

    ``band`` is the narrow format whose guard band applies: ``dtype``, except for a
    guarded chain converted to float32 (`convert_element_type`) whose guard is still to
    come, so that a ``mean`` of a product (converted to float32 and summed, as
    ``jnp.mean`` of float16 does) needs no guard at all: the sum measures its scale."""

    eager = True  # materialised at once when some reader will need it anyway

    def __init__(self, data: Any, scale: Any, dtype: Any, guard: bool, hi: int, lo: int,
                 band: Any = None):
        self.data, self.scale, self.dtype = data, scale, np.dtype(dtype)
        self.guard, self.hi, self.lo = bool(guard), int(hi), int(lo)
        self.band = self.dtype if band is None else np.dtype(band)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    def _materialise(self) -> ScaledArray:
        if not self.guard:
            return ScaledArray(saturating_cast(self.data, self.dtype), self.scale)
        out = fit_to_format(self.data, self.scale, self.dtype, band=self.band)
        if out.scale is not self.scale and get_config().scales_computed_once:
            out = ScaledArray(out.data, computed_once(out.scale))  # as the interpreter does
        return out

    def with_data(self, data: Any, scale: Any = None) -> "Wide":
        """The same kind of value (dtype, guard, bounds) with other data: for exact
        operations that keep the bounds (negation, data movement, selection)."""
        scale = self.scale if scale is None else scale
        return Wide(data, scale, self.dtype, self.guard, self.hi, self.lo, self.band)

    def map_layout(self, fn: Any) -> "Wide":
        return self.with_data(fn(self.data))

    def replace_scale(self, scale: Any) -> "Wide":
        return self.with_data(self.data, scale)


def materialised(x: Any) -> Any:
    """``x``, or the ScaledArray of a `Wide` ``x``."""
    return x.materialise() if isinstance(x, Wide) else x


def deferring(dtype: Any) -> bool:
    """True when a rule with a result of ``dtype`` returns it `Wide`:
    `ScalifyConfig.defer_rounding` on and ``dtype`` narrow (float16, float8)."""
    return get_config().defer_rounding and is_narrow(dtype)


@functools.lru_cache(maxsize=None)
def format_bounds(dtype: Any) -> Tuple[int, int]:
    """``(hi, lo)``: every finite value of ``dtype`` is below ``2**hi`` in magnitude and
    every non-zero one at least ``2**lo`` (float16: 16, -24; float8 E4M3: 9, -9)."""
    fi = jnp.finfo(np.dtype(dtype))
    hi = int(np.ceil(np.log2(float(fi.max))))
    lo = int(np.floor(np.log2(float(fi.smallest_subnormal))))
    return hi, lo


def data_bounds(x: Any) -> Tuple[int, int]:
    """``(hi, lo)`` bounds on ``log2 |data|`` of an operand read at `scale_of` (see
    `Wide`): a Wide value's own; a ScaledArray's or a plain array's format bounds; a
    static constant's data ``c / pow2(|c|)`` lies in ``[1, 2)``; a traced plain scalar's
    likewise (its lower bound left at -24 for subnormal scalars)."""
    if isinstance(x, Wide):
        return x.hi, x.lo
    if isinstance(x, ScaledArray):
        return format_bounds(x.dtype)
    if is_static(x):
        if is_scale_free(x):
            return 0, 0
        c = static_uniform_value(x)
        if c is not None:
            return 1, 0
        a = np.abs(np.asarray(x, np.float64))
        a = a[np.isfinite(a) & (a > 0)]
        if not a.size:
            return 0, 0
        s = float(scale_of(x))
        return 1, int(np.floor(np.log2(a.min() / s)))
    if np.shape(x) == () and is_float_dtype(x.dtype):
        return 1, -24
    return format_bounds(x.dtype)


def within_wide_bounds(hi: int, lo: int) -> bool:
    return hi <= WIDE_HI and lo >= WIDE_LO


def bounded_operands(xs: Sequence[Any], bounds: Any) -> Tuple[list, Tuple[int, int]]:
    """``(xs, (hi, lo))``: the result bounds ``bounds(*operand_bounds)`` of a rule, with
    the `Wide` operands materialised first when the result would leave the limits
    (``WIDE_LO``, ``WIDE_HI``) of a float32 chain."""
    xs = list(xs)
    b = bounds(*[data_bounds(x) for x in xs])
    if within_wide_bounds(*b) or not any(isinstance(x, Wide) for x in xs):
        return xs, b
    xs = [materialised(x) for x in xs]
    return xs, bounds(*[data_bounds(x) for x in xs])


def needs_guard(*xs: Any) -> bool:
    """True when an operand is a `Wide` value whose chain needs the range guard."""
    return any(isinstance(x, Wide) and x.guard for x in xs)


def wide_result(data: Any, scale: Any, dtype: Any, guard: bool, bounds: Tuple[int, int]) -> Any:
    """A deferring rule's result: ``Wide`` when its bounds are within the limits, else
    rounded at once (`fit_to_format` when ``guard``, else a saturating cast), as a rule
    that does not defer."""
    if deferring(dtype) and within_wide_bounds(*bounds):
        return Wide(data, scale, dtype, guard, *bounds)
    if guard:
        return fit_to_format(data, scale, dtype)
    return ScaledArray(saturating_cast(as_jax(data), dtype), scale)
