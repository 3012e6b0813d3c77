"""Deferred narrow rounding: elementwise chains hand on float32 results (`Wide`).

Why: rounding every result of an elementwise chain to float16 costs a round trip per
rule, and range-guarding every risky one a max-abs reduction per rule. A `Wide` value is
an elementwise rule's float32 result at its static scale, with static bounds on its
data's magnitude; the next elementwise rule reads it unrounded, and the chain rounds (and
range-guards, where one of its rules needed it) once, where a rule that is not
elementwise, an observer or the function's output reads the value.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.formats import format_bounds, is_narrow, saturating_cast
from scalify.core.pow2 import is_static
from scalify.core.range_guard import fit_to_format
from scalify.core.deferred import Deferred
from scalify.core.static import as_jax, is_scale_free, static_scale, static_uniform_value
from scalify.core.trace_state import computed_once, register_selection, register_unrounded

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


    def __init__(self, data: Any, scale: Any, dtype: Any, guard: bool, hi: int, lo: int,
                 band: Any = None, spread: bool = False, selection: Optional[tuple] = None,
                 top: bool = False):
        self.data, self.scale, self.dtype = data, scale, np.dtype(dtype)
        self.guard, self.hi, self.lo = bool(guard), int(hi), int(lo)
        self.band = self.dtype if band is None else np.dtype(band)
        # A selection among operands of distinct scales: rounded with the guard's
        # ``spread`` (its max-abs at the top of the format, the range below it left to
        # the smaller elements), and, for max/min, ``(kind, operands)`` registered for
        # the rounded data (`register_selection`) so that max's derivative compares
        # the operands, not the rounded result.
        self.spread, self.selection = bool(spread), selection
        # ``top``: a chain that read such a selection is rounded with the same
        # placement (its elements may span as many binades), and nothing else of the
        # selection's (it is eager, and compared as rounded).
        self.top = bool(top)

    @property
    def eager(self) -> bool:  # type: ignore[override]
        """`Deferred.eager`: True (materialised at once when some reader will need it
        anyway), except for a spread selection: where one reader needs it
        rounded (a matmul; a comparison in a derivative), the elementwise rules still
        read the float32 data (a derivative dividing by it must not see its small
        elements flushed), and comparisons read it too (`register_unrounded`), so that
        all of them see the same value."""
        return not self.spread

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    def _materialise(self) -> ScaledArray:
        if not self.guard:
            return ScaledArray(saturating_cast(self.data, self.dtype), self.scale)
        out = fit_to_format(self.data, self.scale, self.dtype, spread=self.spread or self.top, band=self.band)
        if out.scale is not self.scale and get_config().scales_computed_once:
            out = ScaledArray(out.data, computed_once(out.scale))  # as the interpreter does
        if self.spread:
            register_unrounded(out.data, self)
        if self.selection is not None:
            register_selection(out.data, *self.selection)
        return out

    def with_data(self, data: Any, scale: Any = None) -> "Wide":
        """The same kind of value (dtype, guard, bounds, spread) with other data: for
        exact operations that keep the bounds (negation, data movement, selection). The
        selection a value records stays with its own data only."""
        scale = self.scale if scale is None else scale
        selection = self.selection if data is self.data else None
        return Wide(data, scale, self.dtype, self.guard, self.hi, self.lo, self.band, self.spread, selection,
                    self.top)

    def map_layout(self, fn: Any) -> "Wide":
        """`Deferred.map_layout`: a same-scale operation commutes with the pending
        rounding and guard, and keeps the data bounds."""
        return self.with_data(fn(self.data))

    def replace_scale(self, scale: Any) -> "Wide":
        """`Deferred.replace_scale`."""
        return self.with_data(self.data, scale)


def materialised(x: Any) -> Any:
    """``x``, or the ScaledArray of a `Wide` ``x``."""
    return x.materialise() if isinstance(x, Wide) else x


def deferring(dtype: Any) -> bool:
    """True when a rule with a result of ``dtype`` returns it `Wide`:
    `ScalifyConfig.defer_rounding` on and ``dtype`` narrow (float16, float8)."""
    return get_config().defer_rounding and is_narrow(dtype)


def data_bounds(x: Any) -> Tuple[int, int]:
    """``(hi, lo)`` bounds on ``log2 |data|`` of an operand read at its scale (see
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
        s = float(static_scale(x))
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


def wide_result(data: Any, scale: Any, dtype: Any, guard: bool, bounds: Tuple[int, int],
                operands: Sequence[Any] = ()) -> Any:
    """A deferring rule's result: ``Wide`` when its bounds are within the limits, else
    rounded at once (`fit_to_format` when ``guard``, else a saturating cast), as a rule
    that does not defer. A result computed from a selection among distinct scales (a
    `Wide` operand with ``spread`` or ``top``, in ``operands``) is rounded as the
    selection would be, its max-abs at the top of the guard band.

    Why: the selection's elements may span more binades than unit placement leaves
    below the largest (``where(m, tanh(x), 2**39 * y)``); ``+ 0`` or ``* 2`` does not
    change that, so the chain's one rounding, wherever it happens, keeps the
    selection's placement."""
    top = any(isinstance(x, Wide) and (x.spread or x.top) for x in operands)
    if deferring(dtype) and within_wide_bounds(*bounds):
        return Wide(data, scale, dtype, guard or top, *bounds, top=top)
    if guard or top:
        return fit_to_format(data, scale, dtype, spread=top)
    return ScaledArray(saturating_cast(as_jax(data), dtype), scale)
