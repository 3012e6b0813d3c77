"""Scaled rules of ``custom_jvp_call`` and ``custom_vjp_call``: the user's rule holds
when ``scalify(f)`` is differentiated.

When `jax.grad` runs *inside* ``scalify`` the jaxpr already contains the user's rule, so
these primitives mostly appear when ``scalify(f)`` is itself differentiated (or not
differentiated at all). Both rules then rebuild a ``jax.custom_vjp``/``jax.custom_jvp``
whose primal is the scalified ``call_jaxpr`` and whose rule is the user's rule
interpreted under scalify.

Why not inline ``call_jaxpr``: a gradient of ``scalify(f)`` would then differentiate
the primal's implementation instead of the user's rule (``relu``'s ``max(x, 0)`` gives
1/2 at 0 instead of 0; a rule written for stability or a surrogate gradient is lost).

JAX speaks of tangents and cotangents of the leaves ``(data, scale)``; the user's rule
speaks of those of the *value* ``data * scale``. The rules map between the two with the
chain rule of ``data * scale`` (see `custom_jvp_call` and `custom_vjp_call`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr
from jax.extend.core import primitives as P

from scalify import _jax_compat
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.interpreter import eval_closed_jaxpr, eval_jaxpr, scalify
from scalify.core.operands import as_jax, compute_dtype
from scalify.core.registry import register_scaled_op
from scalify.rules.control_flow.leaves import Split, as_kind, dynamic, is_float, kind_of, mk, times


class _OutKinds:
    """Output kinds shared by a custom rule's primal and forward functions: whichever
    JAX traces first sets them, the other conforms (JAX requires identical types)."""

    def __init__(self) -> None:
        self.kinds: Optional[List[Optional[np.dtype]]] = None

    def conform(self, outs: Sequence[Any]) -> List[Any]:
        if self.kinds is None:
            self.kinds = [kind_of(o) for o in outs]
        return [as_kind(o, k) for o, k in zip(outs, self.kinds)]


def _value_tangent(x: Any, tdata: Any, tscale: Any) -> Any:
    """Tangent of the value ``data * scale`` from tangents of the leaves (None: zero):
    ``d(data * scale) = (tdata + data * tscale / scale) * scale``, as a ScaledArray at
    the primal's scale."""
    if not isinstance(x, ScaledArray):
        return tdata
    if tdata is None and tscale is None:
        return None
    cd = compute_dtype(x.dtype)
    t = jnp.zeros(x.shape, cd) if tdata is None else as_jax(tdata).astype(cd)
    if tscale is not None:
        t = t + as_jax(x.data).astype(cd) * (tscale / x.scale).astype(cd)
    return mk(t.astype(x.dtype), x.scale)


def _zero_tangent(x: Any) -> Any:
    """An instantiated zero tangent for the value of ``x`` (float0 for integers)."""
    if not is_float(x):
        return np.zeros(np.shape(x), jax.dtypes.float0)
    return jnp.zeros(np.shape(x), x.dtype)


def _leaf_tangent(p: Any, t: Any) -> Any:
    """Tangents of the leaves of output ``p`` given the tangent ``t`` of its value (None:
    zero). The scale's tangent is zero, the data's is ``t / scale``."""
    if isinstance(p, ScaledArray):
        d = jnp.zeros(p.shape, p.dtype) if t is None else times(t, 1 / p.scale, p.dtype)
        return mk(d, jnp.zeros_like(p.scale))
    if not is_float_dtype(p.dtype):
        return np.zeros(p.shape, jax.dtypes.float0)
    if t is None:
        return jnp.zeros(p.shape, p.dtype)
    return times(t, 1, p.dtype)


@register_scaled_op(P.custom_jvp_call_p)
def custom_jvp_call(*operands: Any, call_jaxpr: ClosedJaxpr, jvp_jaxpr_fun: Any,
                    num_consts: int, symbolic_zeros: bool = False, **params: Any) -> List[Any]:
    """A ``jax.custom_jvp`` whose primal is the scalified ``call_jaxpr`` and whose JVP is
    the user's rule (``jvp_jaxpr_fun``) interpreted under scalify.

    Inlining ``call_jaxpr`` would be correct when `jax.grad` ran inside scalify, but a
    gradient of ``scalify(f)`` would then differentiate the primal's implementation
    instead of the user's rule: ``relu``'s ``max(x, 0)`` gives 1/2 at 0 instead of 0, and
    a rule written for stability or with a surrogate gradient would be lost.

    The value tangent fed to the rule is ``tdata * scale + data * tscale`` (held at the
    primal's scale); an output tangent ``t`` becomes ``t / scale`` on the data and zero
    on the scale. Consistent because the rule's scales depend on primals only, so the
    scalified JVP stays linear in the tangents and JAX can transpose it."""
    split = Split(operands)
    kinds = _OutKinds()

    @jax.custom_jvp
    def fun(*leaves: Any) -> List[Any]:
        return kinds.conform(eval_closed_jaxpr(call_jaxpr, *split.rebuild(leaves)))

    def fun_jvp(primals: Any, tangents: Any) -> Any:
        ops = split.rebuild(primals)
        t_of = {}
        for (i, field), t in zip(split.owner, tangents):
            if is_float(ops[i]):
                t_of[(i, field)] = t
        tans = []
        for i, x in enumerate(ops):
            if isinstance(x, ScaledArray):
                tans.append(_value_tangent(x, t_of.get((i, "data")), t_of.get((i, "scale"))))
            else:
                tans.append(t_of.get((i, "value")))
        args, targs = ops[num_consts:], tans[num_consts:]
        if not symbolic_zeros:  # the user's rule expects zero tangents instantiated
            targs = [_zero_tangent(a) if t is None else t for a, t in zip(args, targs)]
        in_zeros = tuple(t is None for t in targs)
        jaxpr, consts, out_zeros = _jax_compat.call_wrapped(jvp_jaxpr_fun, *in_zeros)
        outs = eval_jaxpr(jaxpr, consts, *args, *[t for t in targs if t is not None])
        n = len(out_zeros)
        p_out = kinds.conform(outs[:n])
        nz = iter(outs[n:])
        t_out = [_leaf_tangent(p, None if z else next(nz)) for p, z in zip(p_out, out_zeros)]
        return p_out, t_out

    fun.defjvp(fun_jvp)
    return list(fun(*split.leaves))


@register_scaled_op(P.custom_vjp_call_p)
def custom_vjp_call(*operands: Any, call_jaxpr: ClosedJaxpr, fwd_jaxpr_thunk: Any, bwd: Any,
                    num_consts: int, out_trees: Callable[[], Any], symbolic_zeros: bool = False,
                    **params: Any) -> List[Any]:
    """A ``jax.custom_vjp`` whose primal is the scalified ``call_jaxpr``, whose forward
    pass is the scalified user ``fwd`` and whose backward pass is the user's ``bwd``
    interpreted under scalify, so the user's rule holds when ``scalify(f)`` is
    differentiated.

    Cotangents: an output ``(data, scale)`` with cotangent ``(ct_d, ct_s)`` gives the
    value cotangent ``ct_d / scale`` (the ScaledArray ``(ct_d, 1 / scale)``, exact);
    ``ct_s`` is redundant when the caller only uses the value ``data * scale`` and is
    ignored. The user's value cotangent ``ct`` for an input ``(data, scale)`` becomes
    ``ct * scale`` on its data and ``sum(ct * data)`` on its scale (the chain rule of
    ``data * scale``). Consts of the primal (closed-over values) get no cotangent, as
    in JAX; as with ``jax.grad(jax.jit(f))``, a ``fwd``/``bwd`` closing over a traced
    value cannot be re-traced later (use ``jax.closure_convert`` or nondiff_argnums)."""
    split = Split(operands)
    kinds = _OutKinds()

    @jax.custom_vjp
    def fun(*leaves: Any) -> List[Any]:
        return kinds.conform(eval_closed_jaxpr(call_jaxpr, *split.rebuild(leaves)))

    def fun_fwd(*leaves: Any) -> Any:
        ops = split.rebuild(leaves)
        dyn = {i for i, _ in split.owner}
        args = ops[num_consts:]
        perturbed = tuple(i + num_consts in dyn and is_float(a) for i, a in enumerate(args))
        fwd_jaxpr, fwd_consts = _jax_compat.call_wrapped(fwd_jaxpr_thunk, *perturbed)
        outs = eval_jaxpr(fwd_jaxpr, fwd_consts, *args)
        _, res_tree, input_fwds = out_trees()
        n_res = res_tree.num_leaves - sum(f is not None for f in input_fwds)
        res_iter = iter(outs[:n_res])
        res = [dynamic(next(res_iter) if f is None else ops[f]) for f in input_fwds]
        prim = kinds.conform(outs[n_res:])
        out_scales = [p.scale if isinstance(p, ScaledArray) else None for p in prim]
        return prim, (res, list(leaves), out_scales)

    def fun_bwd(saved: Any, cts: Any) -> Tuple[Any, ...]:
        res, leaves, out_scales = saved
        ops = split.rebuild(leaves)
        cts_v = [ct if s is None else mk(ct.data, 1 / s) for ct, s in zip(cts, out_scales)]

        def user_bwd(*a: Any) -> List[Any]:
            outs = _jax_compat.call_wrapped(bwd, *a)
            return [None if _jax_compat.is_symbolic_zero(o) else o for o in outs]

        cts_in = scalify(user_bwd)(*res, *cts_v)
        out: List[Any] = []
        for i, field in split.owner:
            x = ops[i]
            ct = cts_in[i - num_consts] if i >= num_consts else None
            if ct is None or not is_float(x):
                out.append(None)
            elif field == "value":
                out.append(times(ct, 1, x.dtype))
            elif field == "data":
                out.append(times(ct, x.scale, x.dtype))
            else:
                cd = compute_dtype(x.dtype)
                ct_s = jnp.sum(times(ct, 1, cd) * as_jax(x.data).astype(cd))
                out.append(ct_s.astype(jnp.asarray(x.scale).dtype))
        return tuple(out)

    fun.defvjp(fun_fwd, fun_bwd)
    return list(fun(*split.leaves))
