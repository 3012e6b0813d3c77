"""Deferred values: a rule's result kept in a form that some rules read more cheaply
than its ScaledArray.

Why: some rules' results have work still to do (a rounding, a division, an alignment of
per-step scales) that the next rule can skip, fold into its own kernel, or carry
through. A rule may then return a `Deferred` value instead of a ScaledArray. Its
``materialise()`` is the ScaledArray; a rule registered ``takes_deferred`` for its kind
(`scalify.core.registry.register_scaled_op`) reads it as it is; the interpreter
materialises it for every other rule, for observers and at the end of every jaxpr.

Rules read a deferred operand through the small protocol below rather than by testing
its class, so that a rule taking every kind (``takes_deferred=True``) also takes a kind
added later without being edited:

- `Deferred.materialise`: the ScaledArray (computed once, then shared);
- `Deferred.map_layout`: a same-scale data operation (a transpose, a reshape, a
  negation: see `map_layout`) applied to the pending value, which stays pending, or
  None when the kind cannot carry it (the rule then materialises);
- `Deferred.steps`: stacked data with one scale per step, for a reader that takes the
  value step by step (a scan's ``xs``), or None;
- `Deferred.scale` and `Deferred.replace_scale`: the value's one scale, which the
  interpreter marks computed once as it does a ScaledArray's;
- `Deferred.eager`: materialise as soon as some reader will take it materialised.

The kinds live beside the rules whose arithmetic they defer:
`scalify.core.wide.Wide` (an elementwise chain's float32 result, not rounded to its
narrow dtype yet), `scalify.rules.linalg.Rescaled` (a float32 contraction whose division
by ``pow2(sqrt(K))`` is still to do) and `scalify.rules.control_flow.loops.PerStepScaled`
(a scan's stacked output whose scale varies per step). docs/design.md ("Deferred
values") says why each exists.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple


class Deferred:
    """A rule's result kept in a form that some rules consume more cheaply than its
    `ScaledArray`: `materialise` gives the ScaledArray (computed once, then reused).

    A kind subclasses it and implements `_materialise`; it overrides `map_layout`,
    `steps` and `replace_scale` for the operations it can carry, and sets ``scale``
    when the value has one scale. The base class's defaults decline every operation, so
    a reader falls back to the materialised ScaledArray: a new kind is correct before it
    is cheap."""

    _value: Any = None
    # The value's one scale, when it has one (the interpreter marks it `computed_once`).
    scale: Any = None
    # Materialise at once when some reader of the value takes it materialised anyway
    # (see `scalify.core.interpreter.eval_jaxpr`), rather than only where it is read:
    # its other readers then share that ScaledArray instead of computing on from the
    # deferred form beside it.
    eager: bool = False

    def materialise(self) -> Any:
        """The ScaledArray of the value (computed on the first call, then the same
        object, so that every reader shares one computation)."""
        if self._value is None:
            self._value = self._materialise()
        return self._value

    @property
    def materialised(self) -> Any:
        """The ScaledArray if `materialise` ran already, else None."""
        return self._value

    def _materialise(self) -> Any:
        raise NotImplementedError

    def map_layout(self, fn: Callable[[Any], Any]) -> Optional["Deferred"]:
        """The same kind of deferred value with ``fn`` applied to its pending data, or
        None when the kind cannot carry ``fn`` (the caller then materialises).

        ``fn`` acts on the data alone and commutes with multiplying by any positive
        scalar: it moves, copies, selects or drops elements, or flips their sign
        (``transpose``, ``reshape``, ``broadcast_in_dim``, ``neg``, ``reduce_max``...;
        the primitives of `scalify.rules.same_scale`). Such an operation commutes with a
        pending division by a power of two and with a pending rounding, so a kind
        whose pending work is of that sort applies ``fn`` and keeps the work pending."""
        return None

    def steps(self) -> Optional[Tuple[Any, Any]]:
        """``(data, scales)``: the value as stacked data (steps along axis 0) with one
        scale per step, for a reader that takes it step by step (a scan's ``xs``), or
        None when the kind has no such form (the reader then materialises).

        Why: aligning every step to one scale is a pass over the whole stack that a
        step-by-step reader does not need."""
        return None

    def replace_scale(self, scale: Any) -> "Deferred":
        """The same deferred value with another (equal) ``scale``: the interpreter marks
        a newly computed scale `computed_once` through it. Only for kinds with one
        ``scale``."""
        raise NotImplementedError


def materialise(x: Any) -> Any:
    """``x``, or the ScaledArray of a `Deferred` ``x``: how a rule reads an operand it
    does not take deferred."""
    return x.materialise() if isinstance(x, Deferred) else x
