"""`ScalifyConfig`: trace-time options of the scalify transform.

The configuration is read when a function is *traced* (by `scalify`, or by `jax.jit` of a
scalified function), not when the compiled function runs: change it before tracing.
"""
from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np


class Pow2RoundMode(enum.IntEnum):
    """How a positive scale is rounded to a power of two.

    - ``NONE``: no rounding; scales are whatever the rule computes.
    - ``DOWN``: the largest power of two ``<= x`` (the default: data then grows by at most
      2x above the target norm, never shrinks towards the subnormals).
    - ``UP``: the smallest power of two ``>= x``.
    - ``STOCHASTIC``: ``DOWN`` or ``UP`` with probability proportional to the distance,
      so that rounding is unbiased on average. The random draw is a hash of the value's
      bits: deterministic for a given value, needing no PRNG key, and identical eagerly,
      under ``jit`` and at trace time.

    An exact power of two is returned unchanged by every mode.
    """

    NONE = 0
    DOWN = 1
    UP = 2
    STOCHASTIC = 3


@dataclasses.dataclass(frozen=True)
class ScalifyConfig:
    """Options of the scalify transform, used as a context manager::

        with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
            out = jax.jit(sfy.scalify(f))(x)   # traced here: UP rounding applies

    Attributes:
      rounding_mode: how rules round the scales they compute (`Pow2RoundMode`).
      scale_dtype: dtype of the scales rules create (float32 by default; float16 or
        bfloat16 scales save nothing measurable and lose range, so prefer float32).
      scales_computed_once: compute each rule's output scale once, in a small kernel of
        its own, instead of letting XLA copy it into every kernel that uses it (see
        `scalify.core.trace_state.computed_once`). True by default: deep unrolled models
        compile much faster, at the cost of one small scalar kernel per scale per step at
        run time (the measurements are in the README's overhead results). False trades
        back.
      range_guard: keep the data of every rule whose static scale estimate can be wrong
        by more than the format's range (products, powers, quotients, ``exp`` and other
        unbounded functions, contractions) inside a narrow data format (float16,
        float8): the result's max-abs is measured and, when it leaves a safe band, the
        scale takes the excess (`scalify.core.range_guard.fit_to_format`). True by
        default; False keeps the static unit-scaling estimates only (data can then
        overflow where float32 would not).
      defer_rounding: let chains of elementwise rules with float16/float8 results hand
        their float32 results on to the next elementwise rule, unrounded and unguarded,
        and round (and range-guard, where a rule of the chain needed it) once, where a
        rule that is not elementwise, or the function's output, reads the value
        (`scalify.core.wide.Wide`). A layer norm or a GELU then measures one max-abs
        instead of one per product, and its intermediate values keep float32 precision,
        as XLA's excess precision does in plain float16 JAX. A static bound on each
        value's data keeps float32 from over- or underflowing inside a chain. True by
        default; False rounds and guards every rule's result at once.
      narrow_contractions: let a contraction of float16 data with a float16 result leave
        its ``dot_general`` in float16 (float32 accumulation inside it, the operand
        prescaled by a measured headroom so no partial sum overflows), instead of a
        float32 output rounded afterwards. XLA's SPMD partitioner sums a contraction
        split across devices (every weight gradient under data parallelism) in the dot's
        output dtype, so this halves the bytes of gradient reductions; on one device it
        only costs the measurements and the prescale. None (the default) decides when
        tracing: on when more than one device is visible (``jax.device_count() > 1``).
        Contractions of float8 or bfloat16 data leave in bfloat16 either way (no
        prescale needed: bfloat16 has float32's range). See
        `scalify.rules.linalg._reduction_dtype`.
      measured_min_reduced: ``reduce_sum`` over at least this many elements measures
        its output scale (the power of two of the sum's RMS) instead of the static
        ``pow2(sqrt(N))`` estimate (see `scalify.rules.reductions.reduce_sum`). Smaller
        reductions, whose output is nearly as large as their input, keep the static
        estimate, so that measuring never costs a pass over a large tensor. 16 by
        default; a huge value makes every sum static (benchmarks/overhead.py does, to
        show what measuring costs).
    """

    rounding_mode: Pow2RoundMode = Pow2RoundMode.DOWN
    scale_dtype: Any = np.float32
    scales_computed_once: bool = True
    range_guard: bool = True
    defer_rounding: bool = True
    narrow_contractions: Optional[bool] = None
    measured_min_reduced: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.rounding_mode, Pow2RoundMode):
            raise TypeError(
                f"ScalifyConfig.rounding_mode must be a Pow2RoundMode, got {self.rounding_mode!r}."
            )
        dtype = np.dtype(self.scale_dtype)
        if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
            raise TypeError(f"ScalifyConfig.scale_dtype must be a float dtype, got {dtype}.")
        object.__setattr__(self, "scale_dtype", dtype)
        if not isinstance(self.range_guard, bool):
            raise TypeError(f"ScalifyConfig.range_guard must be a bool, got {self.range_guard!r}.")
        if not isinstance(self.defer_rounding, bool):
            raise TypeError(f"ScalifyConfig.defer_rounding must be a bool, got {self.defer_rounding!r}.")
        if self.narrow_contractions is not None and not isinstance(self.narrow_contractions, bool):
            raise TypeError(
                f"ScalifyConfig.narrow_contractions must be None or a bool, got {self.narrow_contractions!r}."
            )
        n = self.measured_min_reduced
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise TypeError(f"ScalifyConfig.measured_min_reduced must be a positive int, got {n!r}.")
        object.__setattr__(self, "measured_min_reduced", int(n))
        if not isinstance(self.scales_computed_once, bool):
            raise TypeError(
                f"ScalifyConfig.scales_computed_once must be a bool, got {self.scales_computed_once!r}."
            )

    def __enter__(self) -> "ScalifyConfig":
        _stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stack().pop()


_local = threading.local()
_DEFAULT = ScalifyConfig()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def get_config() -> ScalifyConfig:
    """The innermost active `ScalifyConfig` (the default one outside any `with`)."""
    stack = _stack()
    return stack[-1] if stack else _DEFAULT


def narrow_contractions() -> bool:
    """Whether contractions and measured sums of 16-bit data leave their ``dot_general``
    in 16 bits (`ScalifyConfig.narrow_contractions`, resolved: by default when more than
    one device is visible, where XLA may split a contraction across devices)."""
    on = get_config().narrow_contractions
    if on is None:
        import jax  # imported here: the configuration module starts no backend

        return jax.device_count() > 1
    return on


def device_groups(n: int) -> int:
    """How many groups a dimension of size ``n`` that devices may share (a batch) splits
    into for a sum whose partial results cross devices in 16 bits: the largest divisor
    of ``n`` that divides the device count (1 on one device)."""
    import jax  # imported here: the configuration module starts no backend

    return int(np.gcd(int(n), jax.device_count()))

