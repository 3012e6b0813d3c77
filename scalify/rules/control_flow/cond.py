"""Scaled rule of ``cond`` (``lax.cond``, ``lax.switch``).

A static branch index selects the branch at trace time: only that branch is
interpreted, and its static scales stay static. Otherwise the branches become a
``lax.switch`` of scalified branches, which must agree on which outputs are scaled: the
union is used, plain results of the other branches promoted (the fixpoint of
`scalify.rules.control_flow.fixpoint`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr
from jax.extend.core import primitives as P

from scalify.core.interpreter import eval_closed_jaxpr
from scalify.core.pow2 import is_static
from scalify.core.registry import register_scaled_op
from scalify.rules.control_flow.fixpoint import carry_out, fixpoint, merge_kinds


@register_scaled_op(P.cond_p)
def cond(index: Any, *operands: Any, branches: Sequence[ClosedJaxpr], **params: Any) -> List[Any]:
    """``lax.switch`` over the scalified branches (``lax.cond`` is a two-branch switch).

    A static index picks its branch at trace time. Otherwise every branch returns the
    same kinds: the first branch traced sets them, a later branch with more scaled
    outputs makes the rule trace again with the union (plain results promoted)."""
    if is_static(index):
        i = int(np.clip(np.asarray(index), 0, len(branches) - 1))
        return eval_closed_jaxpr(branches[i], *operands)

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        state = {"kinds": kinds, "set": any(k is not None for k in kinds)}

        def make(branch: ClosedJaxpr) -> Callable[[], List[Any]]:
            def fn() -> List[Any]:
                outs = eval_closed_jaxpr(branch, *operands)
                if not state["set"]:
                    state["kinds"], state["set"] = merge_kinds(state["kinds"], outs), True
                return carry_out(outs, state["kinds"], owner)

            return fn

        return list(lax.switch(index, [make(b) for b in branches]))

    return fixpoint(attempt, [None] * len(branches[0].out_avals))

