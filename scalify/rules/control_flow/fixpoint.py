"""Which outputs of a loop body or branch are scaled: a fixpoint over their kinds.

A carry that enters a loop plain may come out of the body scaled (``acc + x`` with a
scaled ``x``), but a JAX loop needs the carry's type fixed before the body is traced.
The rules therefore guess the kinds (those of the initial values), trace, and when an
output needs more ScaledArray carries than assumed, raise `Retrace` and trace again with
the union. Kinds only grow, so this ends after at most one retrace per carry.
``cond``/``switch`` uses the same fixpoint over its branches' outputs.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from scalify.rules.control_flow.leaves import as_kind, kind_of


class Retrace(Exception):
    """Raised while tracing a loop body or branch whose outputs need more ScaledArray
    carries than assumed; the rule traces again with ``kinds``."""

    def __init__(self, owner: object, kinds: List[Optional[np.dtype]]):
        super().__init__("scalify: retrace with promoted carries")
        self.owner = owner
        self.kinds = kinds


def fixpoint(attempt: Callable[..., Any], kinds: List[Optional[np.dtype]]) -> Any:
    owner = object()
    for _ in range(len(kinds) + 2):  # kinds only grow: at most one retrace per entry
        try:
            return attempt(list(kinds), owner)
        except Retrace as r:
            if r.owner is not owner:
                raise
            kinds = r.kinds
    raise AssertionError("scalify: loop carry kinds did not converge")  # pragma: no cover


def merge_kinds(kinds: List[Optional[np.dtype]], outs: Sequence[Any]) -> List[Optional[np.dtype]]:
    return [k if k is not None else kind_of(o) for k, o in zip(kinds, outs)]


def carry_out(outs: Sequence[Any], kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
    """Body outputs as the carry kinds; retrace if a plain carry came out scaled."""
    new = merge_kinds(kinds, outs)
    if new != kinds:
        raise Retrace(owner, new)
    return [as_kind(o, k) for o, k in zip(outs, kinds)]
