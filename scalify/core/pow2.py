"""Power-of-two helpers.

Scales are powers of two so that rescaling data (multiplying by a ratio of scales) is
exact. Every helper here works on NumPy values (folded at trace time: the result stays
NumPy) and on JAX arrays or tracers (the result is a JAX array), so that scales known at
trace time never reach the device.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config


def is_static(x: Any) -> bool:
    """True for values known at trace time: NumPy arrays/scalars and Python numbers."""
    return isinstance(x, (np.ndarray, np.generic, int, float, bool))


def xnp(*xs: Any):
    """`numpy` when every argument is static, else `jax.numpy`."""
    return np if all(is_static(x) for x in xs) else jnp


_INT_OF = {2: np.int16, 4: np.int32, 8: np.int64}


def int_dtype(dtype: Any) -> Any:
    """The signed integer dtype of the same width as the float ``dtype``."""
    return _INT_OF[np.dtype(dtype).itemsize]


def exponent(s: Any) -> Any:
    """``floor(log2(s))`` (int32) of a traced positive normal float, from its exponent
    bits (exact; subnormals read as the smallest normal exponent minus one). No
    gradient."""
    lax = jax.lax
    fi = jnp.finfo(s.dtype)
    itype = int_dtype(s.dtype)
    bits = lax.bitcast_convert_type(lax.stop_gradient(s), itype)
    biased = lax.bitwise_and(lax.shift_right_logical(bits, itype(fi.nmant)), itype((1 << fi.nexp) - 1))
    return lax.sub(lax.convert_element_type(biased, np.int32), np.int32(fi.maxexp - 1))


def mantissa(s: Any) -> Any:
    """``s / 2**max(exponent(s), emin)`` of a traced positive float: in ``[1, 2)`` for a
    normal ``s`` (its mantissa bits under the exponent of 1), ``s * 2**-emin`` in
    ``(0, 1)`` for a subnormal one (0 where XLA flushes subnormals to zero, as on CPU,
    like the division it replaces). Exact, no division, no gradient."""
    lax = jax.lax
    fi = jnp.finfo(s.dtype)
    itype, mask = _exponent_mask(s.dtype)
    s = lax.stop_gradient(s)
    one_bits = itype((fi.maxexp - 1) << fi.nmant)
    normal = _from_bits(lax.bitwise_or(lax.bitwise_and(_bits(s, itype), ~mask), one_bits), s.dtype)
    # 2**-emin is a normal number (emin = -126 in float32: 2**126), and so is the product.
    sub = lax.mul(s, np.asarray(2.0 ** -int(fi.minexp), s.dtype))
    return lax.select(lax.ge(s, np.asarray(fi.tiny, s.dtype)), normal, sub)


def exp2_int(k: Any, dtype: Any) -> Any:
    """``2**k`` for a traced integer ``k`` in the normal exponent range of ``dtype``,
    built from its exponent bits (exact)."""
    lax = jax.lax
    fi = jnp.finfo(dtype)
    itype = int_dtype(dtype)
    k = lax.convert_element_type(k, itype)
    bits = lax.shift_left(lax.add(k, itype(fi.maxexp - 1)), itype(fi.nmant))
    return lax.bitcast_convert_type(bits, np.dtype(dtype))


def _exponent_mask(dtype: Any):
    """Integer dtype of the same width and the mask of the exponent bits of ``dtype``."""
    fi = jnp.finfo(dtype)
    itype = int_dtype(dtype)
    return itype, itype(((1 << fi.nexp) - 1) << fi.nmant)


def _bits(x: Any, itype: Any) -> Any:
    if is_static(x):
        return np.asarray(x).view(itype)
    return jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x), itype)


def _from_bits(b: Any, dtype: Any) -> Any:
    if is_static(b):
        return np.asarray(b).view(dtype)
    return jax.lax.bitcast_convert_type(b, dtype)


def pow2_round_down(x: Any) -> Any:
    """Largest power of two ``<= x`` for positive normal ``x`` (exact powers unchanged).

    Computed by clearing the mantissa bits: three integer operations, exact. Zero,
    subnormals, infinities and NaN pass through unchanged.
    """
    dtype = _dtype_of(x)
    itype, mask = _exponent_mask(dtype)
    if is_static(x):
        x = np.asarray(x, dtype)
        down = _from_bits(_bits(x, itype) & mask, dtype)
        return np.where(_special(x) | (down == 0), x, down)
    # Traced: clearing the mantissa already maps inf to inf; only zero, subnormals
    # (both clear to 0) and NaN (which would become inf) keep their value. `lax`
    # rather than `jax.numpy`: four scalar ops, and no nested `jit` dispatch to trace.
    lax = jax.lax
    x = x if x.dtype == dtype else lax.convert_element_type(x, dtype)
    down = pow2_floor(x)
    keep = lax.bitwise_or(lax.eq(down, np.zeros((), dtype)), lax.ne(x, x))
    return lax.select(keep, x, down)


def pow2_floor(x: Any) -> Any:
    """Largest power of two ``<= x`` for a traced positive normal ``x``: the mantissa bits
    cleared (three operations, exact, no gradient). Unlike `pow2_round_down`, zero and
    subnormals give 0 and NaN gives inf: for scales, which rules keep normal."""
    itype, mask = _exponent_mask(x.dtype)
    return _from_bits(jax.lax.bitwise_and(_bits(x, itype), mask), x.dtype)


def pow2_reciprocal(p: Any) -> Any:
    """``1 / p`` for a power of two ``p``, exact, with no division: its exponent bits
    negated around the bias (``bits(1/p) = 2 * bias << nmant - bits(p)``), and the
    subnormal ``2**-(emax)`` for the largest power of two ``2**emax``. Only for positive
    normal powers of two (anything else gives a wrong value); no gradient."""
    if is_static(p):
        with np.errstate(divide="ignore", over="ignore"):
            return np.asarray(1 / np.asarray(p), _dtype_of(p))
    lax = jax.lax
    fi = jnp.finfo(p.dtype)
    itype = int_dtype(p.dtype)
    bias = fi.maxexp - 1
    bits = lax.sub(itype((2 * bias) << fi.nmant), _bits(p, itype))
    return _from_bits(lax.max(bits, itype(1 << (fi.nmant - 1))), p.dtype)


def _floor_and_reciprocal(x: Any) -> Tuple[Any, Any]:
    f = pow2_floor(jax.lax.stop_gradient(x))
    return f, pow2_reciprocal(f)


# One `jit` equation per call, its body traced once per dtype: nine scalar primitives
# bound at every alignment cost trace time (each bind is a few tens of microseconds),
# and XLA inlines the call, so the compiled program is the same.
_traced_floor_and_reciprocal = jax.jit(_floor_and_reciprocal)


def pow2_floor_and_reciprocal(x: Any) -> Tuple[Any, Any]:
    """``(pow2_floor(x), 1 / pow2_floor(x))`` for a traced positive normal ``x``, exact,
    no gradient (see `pow2_floor` and `pow2_reciprocal`). A scalar ``x`` is one `jit`
    call whose body is traced once per dtype."""
    if np.shape(x) == ():
        return _traced_floor_and_reciprocal(x)
    return _floor_and_reciprocal(x)


@jax.jit
def pow2_sqrt_down(s: Any) -> Tuple[Any, Any]:
    """``(p, 1 / p)`` with ``p = pow2_round_down(sqrt(s))`` of a traced positive normal
    scalar ``s``: ``p = 2**floor(floor(log2 s) / 2)``, from exponent bits (exact, no
    square root or division, which XLA would compile as kernels of their own), one `jit`
    equation traced once per dtype. No gradient."""
    k = jax.lax.shift_right_arithmetic(exponent(s), np.int32(1))  # floor(e / 2)
    return exp2_int(k, s.dtype), exp2_int(jax.lax.neg(k), s.dtype)


@jax.jit
def pow2_rsqrt_down(s: Any) -> Any:
    """``pow2_round_down(1 / sqrt(s))`` of a traced positive normal scalar ``s``:
    ``2**-ceil(ceil(log2 s) / 2)``, from exponent and mantissa bits, as `pow2_sqrt_down`."""
    lax = jax.lax
    itype, mask = _exponent_mask(s.dtype)
    fraction = lax.bitwise_and(_bits(s, itype), ~mask)  # non-zero: not a power of two
    up = lax.add(exponent(s), lax.convert_element_type(lax.ne(fraction, itype(0)), np.int32))
    # -ceil(log2(s) / 2) = -ceil(ceil(log2 s) / 2), and ceil(a / 2) = (a + 1) >> 1
    k = lax.neg(lax.shift_right_arithmetic(lax.add(up, np.int32(1)), np.int32(1)))
    return exp2_int(k, s.dtype)


def pow2_round_up(x: Any) -> Any:
    """Smallest power of two ``>= x`` for positive normal ``x`` (exact powers unchanged)."""
    down = pow2_round_down(x)
    mod = xnp(down)
    with np.errstate(over="ignore"):  # 2 * max finite -> inf, as for any value above it
        return mod.where((down == x) | _special(down), down, down * 2)


def pow2_round_stochastic(x: Any) -> Any:
    """`DOWN` or `UP` with probability ``(x - down) / down`` (unbiased in expectation).

    The uniform draw is a hash of ``x``'s bits (an integer multiplicative hash), so
    the result is a deterministic function of ``x``: no key to thread, same result
    eagerly, under `jit` and when folded at trace time.
    """
    mod = xnp(x)
    x32 = mod.asarray(x, dtype=np.float32)
    down = pow2_round_down(x32)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/inf/NaN: masked below
        p = x32 / down - 1.0  # in [0, 1)
    bits = x32.view(np.uint32) if mod is np else jax.lax.bitcast_convert_type(x32, jnp.uint32)
    with np.errstate(over="ignore"):  # uint32 wrap-around: murmur3's 32-bit finaliser
        h = bits ^ (bits >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        h = h ^ (h >> np.uint32(16))
    u = (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    with np.errstate(over="ignore"):
        out = mod.where(u < p, down * 2, down).astype(_dtype_of(x))
    return mod.where(_special(x), x, out)


def pow2_round(x: Any, mode: Optional[Pow2RoundMode] = None) -> Any:
    """Round positive scale(s) ``x`` to a power of two with ``mode`` (default: the active
    `ScalifyConfig`'s rounding mode)."""
    mode = get_config().rounding_mode if mode is None else Pow2RoundMode(mode)
    if mode == Pow2RoundMode.NONE:
        return x
    if mode == Pow2RoundMode.DOWN:
        return pow2_round_down(x)
    if mode == Pow2RoundMode.UP:
        return pow2_round_up(x)
    return pow2_round_stochastic(x)


def is_pow2(x: Any) -> Any:
    """Elementwise: is ``x`` an exact positive (normal) power of two?"""
    mod = xnp(x)
    x = mod.asarray(x)
    return (pow2_round_down(x) == x) & (x > 0) & mod.isfinite(x)


def get_mantissa(x: Any) -> Any:
    """``x / pow2_round_down(|x|)``: the mantissa in ``[1, 2)`` with the sign of ``x``."""
    mod = xnp(x)
    a = mod.abs(x)
    return mod.where(_special(a), x, x / pow2_round_down(a))


def _special(x: Any) -> Any:
    mod = xnp(x)
    return (mod.asarray(x) == 0) | ~mod.isfinite(x)


def _dtype_of(x: Any) -> Any:
    if isinstance(x, (int, bool, float)):
        return np.dtype(np.float32)
    return np.dtype(x.dtype)
