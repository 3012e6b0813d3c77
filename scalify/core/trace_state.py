"""Trace-scoped knowledge that a traced scale is a power of two.

A ratio of scales whose divisor is a power of two needs no division (`ratio_of` in
`scalify.core.operands`): it is a multiplication by the reciprocal built from exponent
bits. The scales rules align operands to (`hypot_scale`, `common_scale`) are rounded to
powers of two (`aligned_scale`) and registered here while a `scalify` trace runs.

Why a registry scoped to the trace: whether a traced value is a power of two is not
visible in its type, and the rules that know it (the one that rounded the scale) are
not the rules that divide by it. The registry holds the tracer itself (so its id cannot
be reused while registered) and is emptied when the trace ends (`pow2_scope`), so it
never outlives or keeps alive a trace's tracers; it is per thread, so that two threads
tracing at once keep their registrations apart. A scale missing from it is only
divided: the registry never decides a value, only which exact formula computes it.

`computed_once` belongs here too: it keeps a traced scale's registration across the
``rem`` that marks it for XLA to compute once.

Selections are recorded the same way (`register_selection`, `selection_of`): the data of
``max``/``min`` of operands at distinct scales, with those operands. Such a result is
rounded to one scale, which may flush the smaller operand's elements, so comparing an
operand with it (as ``max``'s derivative does) would be wrong there; the comparison
rules answer it from the operands instead. Where such a selection was handed on
unrounded, its rounded data are recorded with the unrounded value (`register_unrounded`),
which comparisons read, so that they agree with the elementwise rules reading it.

Static values folded into a narrow dtype that cannot hold them are recorded too
(`register_exact`, `exact_of`): ``tol**2`` computed in float32 and cast to float16 (as
``jax.scipy.sparse.linalg.cg`` does) is 0 there, while scaled rules can carry it at its
own scale.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import jax
import numpy as np

from scalify.core.config import Pow2RoundMode, get_config
from scalify.core.pow2 import is_static, pow2_floor_and_reciprocal, pow2_reciprocal, pow2_round_down


# This thread's registrations (``id(s) -> (s, reciprocal)``) and number of open
# `pow2_scope`s (outside any, nothing is registered). Per thread, as the config stack
# (`scalify.core.config`): a trace runs in one thread, and two threads tracing at once
# must neither see nor clear each other's registrations.
_local = threading.local()


# The facts recorded per trace, one table each: ``id(key) -> (key, fact)``.
_TABLES = ("pow2", "selections", "exacts", "unrounded")


def _state() -> threading.local:
    if not hasattr(_local, "tables"):
        _local.tables, _local.depth = {t: {} for t in _TABLES}, 0
    return _local


def _record(table: str, key: Any, fact: Any) -> None:
    """Record ``fact`` about ``key`` in ``table`` for the rest of the enclosing
    `pow2_scope` (outside one, a no-op). The table holds ``key`` itself, so that its id
    cannot be reused while the fact is recorded."""
    state = _state()
    if state.depth:
        state.tables[table][id(key)] = (key, fact)


def _recorded(table: str, key: Any) -> Optional[Any]:
    """The fact recorded about ``key`` in ``table``, else None."""
    entry = _state().tables[table].get(id(key))
    return entry[1] if entry is not None and entry[0] is key else None


def registered_pow2() -> dict:
    """A copy of this thread's registrations, ``id(s) -> (s, 1 / s)`` (empty outside
    any `pow2_scope`): for tests and debugging."""
    return dict(_state().tables["pow2"])


def mark_pow2(s: Any) -> Any:
    """Register the traced scale ``s`` as an exact power of two (returns ``s``) for the
    rest of the enclosing `pow2_scope` (outside one, a no-op). Only for values with no
    gradient path that `ratio_of` would drop: its reciprocal is built from bits, so a
    divisor must be constant to autodiff (see `aligned_scale`)."""
    if _state().depth and not is_static(s):
        # The reciprocal is built here, in the trace that made ``s``: every operand
        # aligned to ``s`` shares it, also from inside a loop body traced later.
        register_pow2(s, pow2_reciprocal(s))
    return s


def register_pow2(s: Any, inv: Any) -> None:
    """Record the traced power of two ``s`` with its reciprocal ``inv`` for the rest of
    the enclosing `pow2_scope` (outside one, a no-op)."""
    _record("pow2", s, inv)


def exact_reciprocal(s: Any) -> Optional[Any]:
    """``1 / s`` when it is exact and needs no division: ``s`` a static normal power of
    two (NumPy), or a traced one registered by `mark_pow2` (its shared reciprocal).
    None otherwise."""
    if is_static(s):
        v = np.asarray(s)
        normal = np.all(v >= np.finfo(v.dtype).tiny) if v.dtype.kind == "f" else False
        return pow2_reciprocal(v) if normal and np.all(pow2_round_down(v) == v) else None
    return _recorded("pow2", s)


def known_pow2(s: Any) -> bool:
    """True when ``s`` is known at trace time to be an exact (normal) power of two."""
    return exact_reciprocal(s) is not None


@contextlib.contextmanager
def pow2_scope() -> Iterator[None]:
    """Context of one `scalify` trace: registrations last until it exits, so that the
    registry never outlives (or keeps alive) a trace's tracers. Nested scopes restore
    the outer scope's registrations."""
    state = _state()
    outer = {t: dict(table) for t, table in state.tables.items()}
    state.depth += 1
    try:
        yield
    finally:
        state.depth -= 1
        for t, table in state.tables.items():
            table.clear()
            table.update(outer[t])


def register_selection(data: Any, kind: str, operands: Any) -> None:
    """Record that the traced ``data`` is the data of ``kind`` (``"max"`` or ``"min"``)
    of the two ScaledArray ``operands``, for the rest of the enclosing `pow2_scope`
    (outside one, a no-op)."""
    _record("selections", data, (kind, tuple(operands)))


def selection_of(data: Any) -> Optional[tuple]:
    """``(kind, operands)`` recorded for ``data`` by `register_selection`, else None."""
    return _recorded("selections", data)


def register_unrounded(data: Any, value: Any) -> None:
    """Record that the traced ``data`` is the rounding of the deferred ``value`` (a
    selection among operands of distinct scales, `scalify.core.wide.Wide`), whose
    unrounded data the comparison rules read instead, for the rest of the enclosing
    `pow2_scope` (outside one, a no-op)."""
    _record("unrounded", data, value)


def unrounded_of(data: Any) -> Optional[Any]:
    """The deferred value recorded for ``data`` by `register_unrounded`, else None."""
    return _recorded("unrounded", data)


def register_exact(value: Any, exact: Any) -> None:
    """Record that the static ``value`` is ``exact`` (a NumPy array in a wider dtype)
    rounded to a dtype that flushed some of its elements below its normal range, for
    the rest of the enclosing `pow2_scope` (outside one, a no-op)."""
    _record("exacts", value, exact)


def exact_of(value: Any) -> Optional[Any]:
    """The wider value recorded for the static ``value`` by `register_exact`, else None."""
    return _recorded("exacts", value)


def computed_once(s: Any) -> Any:
    """The traced scalar scale ``s``, marked for XLA to compute once: ``rem(s, inf)``,
    which is exactly ``s`` (a power-of-two registration and its reciprocal carried over).

    Why: XLA copies cheap scalar producers into every kernel that uses them, so each
    scale's whole computation (back to the inputs, through every rule before it) would
    be inlined into every kernel touching a tensor at that scale. In a deep unrolled
    model the copies grow with depth times the number of kernels, and kernels that are
    identical in the plain program become distinct, each compiled on its own (the
    README's overhead results give a measured case). A float remainder is an operation
    XLA never copies into several consumers, so each rule's output scale is computed once, in a small kernel of its
    own, and consumers read it: kernels stay identical and are compiled once.
    """
    if is_static(s) or np.shape(s) != ():
        return s
    inf = np.asarray(np.inf, s.dtype)
    inv = exact_reciprocal(s)
    out = jax.lax.rem(s, inf)
    if inv is not None:  # registered reciprocals are traced too
        register_pow2(out, jax.lax.rem(inv, inf))
    return out


def data_factor(f: Any) -> Any:
    """The traced scalar ``f`` that a rule multiplies its data by (a guard's measured
    power of two, a clamped product's residual), marked `computed_once` when
    `ScalifyConfig.scales_computed_once` is on.

    Why: such a factor is computed from a max-abs or from scales by a chain of some 20
    scalar operations, which XLA would copy into every kernel reading the data (and
    into the kernel computing the scale, which shares the chain). Computed once, the
    program holds one copy: the float16 GPT step of `tests/models/test_families.py`
    compiles to about a quarter fewer instructions, and its run time on XLA:CPU is
    unchanged (`benchmarks/overhead.py` measures both)."""
    if is_static(f) or np.shape(f) != () or not get_config().scales_computed_once:
        return f
    return computed_once(f)


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
    register_pow2(f, inv)
    return f
