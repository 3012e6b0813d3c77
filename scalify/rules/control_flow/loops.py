"""Scaled rules of loops: ``scan`` and ``while`` (``fori_loop`` is either).

**Loops carry both data and scale.** A carried ScaledArray is loop state
``(data, scale)`` with a traced scale (a static scale at entry becomes a traced value of
the same dtype, as the carry's type must not change). Which carries are scaled is a
fixpoint (`scalify.rules.control_flow.fixpoint`): a plain carry that the body turns into
a ScaledArray is promoted at loop entry (at scale 1, or at the smallest normal scale for
initial zeros, see `as_kind`) and the body is traced again; a body returning a plain
value for a scaled carry has it promoted at the end of the body.

Why carry the scale rather than rescale to a loop-invariant scale at the boundary: a
body that multiplies its carry by 2 (or 0.5) on each step then moves only the scale,
exactly, and the data never drifts out of its narrow format, however many steps run
(within the float32 range of the scale). Rescaling to a fixed scale would push the
drift into the data.

**Stacked scan outputs** (``ys``) keep a scale fixed at trace time. A scale that varies
per step is stacked beside the data (`PerStepScaled`): a later scan reads such ``ys`` as
``xs`` step by step, each at its own scale (exact, and no pass over the stack: in a
training step the backward scan reads the forward scan's residuals this way), while
every other rule gets one array aligned to the largest per-step scale, like
``concatenate`` (much smaller steps may lose low bits).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr
from jax.extend.core import primitives as P

from scalify.core.datatype import ScaledArray
from scalify.core.deferred import Deferred, materialise
from scalify.core.interpreter import eval_closed_jaxpr
from scalify.core.operands import as_jax, cast, compute_dtype
from scalify.core.pow2 import is_static
from scalify.core.registry import register_scaled_op
from scalify.rules.control_flow.fixpoint import carry_out, fixpoint
from scalify.rules.control_flow.leaves import as_kind, kind_of, mk, times


class PerStepScaled(Deferred):
    """A scan's stacked output whose scale varies per step: ``data`` (steps on axis 0)
    and ``scales`` (one per step). As a ScaledArray, every step is aligned to the largest
    per-step scale (exact when they are all equal; much smaller steps may lose low bits,
    as in ``concatenate``)."""

    def __init__(self, data: Any, scales: Any):
        self.data, self.scales = data, scales

    def steps(self) -> Tuple[Any, Any]:
        """`Deferred.steps`: the stacked data and its per-step scales, as they are."""
        return self.data, self.scales

    def _materialise(self) -> ScaledArray:
        data, scales = self.data, self.scales
        if scales.shape[0] == 0:
            return mk(data, np.ones((), scales.dtype))
        top = lax.reduce_max(scales, (0,))
        cd = compute_dtype(data.dtype)
        # all steps zero (scale 0): ratios 0 / 1, not 0 / 0
        nonzero = lax.select(lax.eq(top, np.zeros((), top.dtype)), np.ones((), top.dtype), top)
        ratio = lax.broadcast_in_dim(cast(lax.div(scales, nonzero), cd), data.shape, (0,))
        return mk(cast(lax.mul(cast(data, cd), ratio), data.dtype), top)


@register_scaled_op(P.scan_p, takes_deferred=(PerStepScaled,))
def scan(*operands: Any, jaxpr: ClosedJaxpr, num_consts: int, num_carry: int, length: int,
         reverse: bool = False, unroll: Any = 1, **params: Any) -> List[Any]:
    """``lax.scan`` of the scalified body, carrying ``(data, scale)`` of scaled carries.

    Consts are closed over (static scales stay static in the body); a scaled ``xs`` is
    sliced on its data while its scale, shared by all steps, is closed over (a
    `PerStepScaled` ``xs``, whose per-step form `Deferred.steps` gives, has its scales
    sliced beside its data instead). Scaled ``ys`` keep a scale fixed at trace time, or
    come out as `PerStepScaled` (data and one scale per step) when their scale varies
    per step: another scan reads them as
    ``xs`` step by step at each step's own scale, and any other rule gets them aligned to
    the largest per-step scale (see the module docstring). In a training step this is
    what the backward scan does with the forward scan's residuals, which then need no
    alignment pass."""
    consts = [materialise(x) for x in operands[:num_consts]]
    init = [materialise(x) for x in operands[num_consts:num_consts + num_carry]]
    operands_xs = operands[num_consts + num_carry:]
    # A deferred ``xs`` that has a per-step form (`Deferred.steps`) is sliced as it is,
    # its scales beside its data; every other one is read materialised.
    stepped = [x.steps() if isinstance(x, Deferred) else None for x in operands_xs]
    xs = [x if st is not None else materialise(x) for x, st in zip(operands_xs, stepped)]
    xs_data = [
        as_jax(st[0] if st is not None else x.data if isinstance(x, ScaledArray) else x)
        for x, st in zip(xs, stepped)
    ]
    xs_scale = [x.scale if isinstance(x, ScaledArray) else None for x in xs]
    per_step = [i for i, st in enumerate(stepped) if st is not None]
    num_xs = len(xs)
    xs_data += [stepped[i][1] for i in per_step]  # sliced beside the data, step by step
    extra = {k: v for k, v in params.items() if k == "_split_transpose" and v}

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        ys_kind: List[Any] = []  # per y: None (plain), a static scale, or "stacked"

        def body(carry: List[Any], x: List[Any]) -> Tuple[List[Any], List[Any]]:
            scales = list(xs_scale)
            for i, s in zip(per_step, x[num_xs:]):
                scales[i] = s
            xv = [d if s is None else mk(d, s) for d, s in zip(x[:num_xs], scales)]
            outs = eval_closed_jaxpr(jaxpr, *consts, *carry, *xv)
            new_carry = carry_out(outs[:num_carry], kinds, owner)
            ys_kind.clear()
            ys = []
            for y in outs[num_carry:]:
                if not isinstance(y, ScaledArray):
                    ys_kind.append(None)
                    ys.append(as_jax(y))
                elif is_static(y.scale):
                    ys_kind.append(y.scale)
                    ys.append(as_jax(y.data))
                else:
                    ys_kind.append("stacked")
                    ys.append((as_jax(y.data), y.scale))
            return new_carry, ys

        carry0 = [as_kind(c, k) for c, k in zip(init, kinds)]
        carry, ys = lax.scan(body, carry0, xs_data, length=length, reverse=reverse,
                             unroll=unroll, **extra)
        return list(carry) + [_stacked(y, k) for y, k in zip(ys, ys_kind)]

    return fixpoint(attempt, [kind_of(c) for c in init])


def _stacked(y: Any, kind: Any) -> Any:
    """A stacked scan output: plain, at a static scale, or `PerStepScaled`."""
    if kind is None:
        return y
    if not (isinstance(kind, str) and kind == "stacked"):
        return mk(y, kind)
    return PerStepScaled(*y)


@register_scaled_op(P.while_p)
def while_loop(*operands: Any, cond_jaxpr: ClosedJaxpr, body_jaxpr: ClosedJaxpr,
               cond_nconsts: int, body_nconsts: int, **params: Any) -> List[Any]:
    """``lax.while_loop`` of the scalified predicate and body, carrying ``(data, scale)``
    of scaled carries (a dynamic-trip ``fori_loop`` is a while loop).

    A batched predicate (``scalify(jax.vmap(f))`` of a data-dependent loop) runs while
    any element's predicate holds and keeps finished elements unchanged, as JAX's own
    lowering does; a scaled carry then shares one scale across the batch: old and new
    data are aligned to the larger of the two scales before the per-element select."""
    cconsts = operands[:cond_nconsts]
    bconsts = operands[cond_nconsts:cond_nconsts + body_nconsts]
    init = operands[cond_nconsts + body_nconsts:]
    batched = cond_jaxpr.out_avals[0].shape != ()

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        def pred_of(carry: List[Any]) -> Any:
            (pred,) = eval_closed_jaxpr(cond_jaxpr, *cconsts, *carry)
            return as_jax(pred)

        def body_fn(carry: List[Any]) -> List[Any]:
            new = carry_out(eval_closed_jaxpr(body_jaxpr, *bconsts, *carry), kinds, owner)
            if batched:
                pred = pred_of(carry)
                new = [_select_leading(pred, n, o) for n, o in zip(new, carry)]
            return new

        cond_fn = (lambda c: jnp.any(pred_of(c))) if batched else pred_of
        carry0 = [as_kind(c, k) for c, k in zip(init, kinds)]
        return list(lax.while_loop(cond_fn, body_fn, carry0))

    return fixpoint(attempt, [kind_of(c) for c in init])


def _select_leading(pred: Any, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` (over the leading axes) holds, else ``old``; ScaledArrays
    are aligned to the larger scale first."""
    shape = np.shape(new.data if isinstance(new, ScaledArray) else new)
    mask = jnp.broadcast_to(pred.reshape(pred.shape + (1,) * (len(shape) - pred.ndim)), shape)
    if not isinstance(new, ScaledArray):
        return jnp.where(mask, new, old)
    top = jnp.maximum(new.scale, old.scale)
    cd = compute_dtype(new.dtype)
    data = jnp.where(mask, times(new, 1 / top, cd), times(old, 1 / top, cd))
    return mk(data.astype(new.dtype), top)

