"""Evaluating a jaxpr one equation at a time: the walk that scalify's transforms share.

Three parts of scalify trace a function to a jaxpr and evaluate it again, each giving
some equations a meaning of its own: the scalify interpreter (scaled rules, trace-time
folding), the float8 rewrite of `scalify.fp8` (matmuls replaced by float8 custom VJPs)
and the float32 widening of user computations in `scalify.rules.indexing`. What does not
depend on that meaning lives here, once:

- `trace`: which arguments of a transformed function are traced (`is_traced_leaf`, one
  policy for every transform) and the jaxpr of the function on them;
- `eval_jaxpr`: the environment of a jaxpr -- literals, variables, results bound to
  ``_`` that nothing reads -- with a client's ``evaluate(eqn, invals)`` called for each
  equation in order;
- `bind`: an equation bound as it is, with the parameters JAX binds it with;
- `jaxpr_params`, `sub_jaxprs`, `unpack`: the sub-jaxprs of control flow and calls.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, JaxprEqn, Literal

from scalify import _jax_compat
from scalify.core.datatype import ScaledArray

# --------------------------------------------------------------------------------------
# Arguments: what is traced.
# --------------------------------------------------------------------------------------


def is_traced_leaf(x: Any) -> bool:
    """True for the leaves of a transformed function's arguments (and results) that are
    traced: arrays -- ScaledArrays, JAX arrays and tracers, NumPy arrays and scalars.

    Python numbers and every other object (functions, an Equinox model's static fields)
    are static: the trace closes over them, as `eqx.filter_jit` does. Why numbers too:

    - a flag such as a model's ``inference: bool`` stays a Python bool that Python code
      can branch on; traced, ``if inference:`` would raise a tracer conversion error;
    - a constant such as a learning rate or a loss weight is then a literal, whose
      power-of-two scale the scalify rules derive exactly at trace time rather than
      measure at run time.

    Nothing is lost: these transforms trace the function anew at each call, and under
    `jax.jit` every argument reaches them as a tracer anyway.
    """
    return isinstance(x, (ScaledArray, jax.Array, np.ndarray, np.generic))


def _abstract(x: Any) -> Any:
    """What a traced leaf is traced as: a ScaledArray as its data's type."""
    if isinstance(x, ScaledArray):
        if isinstance(x.data, jax.Array):
            # Keep the array's type, as for a plain array argument: its sharding (in
            # explicit-sharding meshes) and, inside `shard_map`, the mesh axes over
            # which it varies, which decide the collectives JAX traces (psum of a
            # varying value, or pvary + psum of a replicated one).
            return _jax_compat.strong_aval(x.data)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


class Traced(NamedTuple):
    """A function traced on its arguments' traced leaves (see `trace`)."""

    jaxpr: ClosedJaxpr
    args: List[Any]  # the traced leaves, in order: the jaxpr's arguments
    rebuild: Callable[[Sequence[Any]], Any]  # the jaxpr's results -> the function's result


def trace(fun: Callable, leaves: Sequence[Any], treedef: Any) -> Traced:
    """Trace ``fun(*args, **kwargs)``, where ``(args, kwargs)`` is ``treedef`` unflattened
    on ``leaves`` (flattened with `is_scaled_leaf`, so a ScaledArray is one leaf).

    The leaves that `is_traced_leaf` selects become the jaxpr's arguments, a ScaledArray
    as its data's type; the others are closed over. In the result, leaves that are not
    arrays (an Equinox model's functions, a Python number) are returned as they are,
    through ``rebuild``."""
    is_traced = [is_traced_leaf(x) for x in leaves]
    traced = [x for x, t in zip(leaves, is_traced) if t]
    out: Dict[str, Any] = {}

    def flat_fun(*flat: Any) -> List[Any]:
        it = iter(flat)
        args, kwargs = jax.tree.unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, is_traced)])
        out_leaves, out["tree"] = jax.tree.flatten(fun(*args, **kwargs))
        out["traced"] = [is_traced_leaf(x) for x in out_leaves]
        out["static"] = [None if t else x for x, t in zip(out_leaves, out["traced"])]
        return [x for x, t in zip(out_leaves, out["traced"]) if t]

    closed = jax.make_jaxpr(flat_fun)(*[_abstract(x) for x in traced])

    def rebuild(outs: Sequence[Any]) -> Any:
        it = iter(outs)
        return jax.tree.unflatten(
            out["tree"], [next(it) if t else x for x, t in zip(out["static"], out["traced"])]
        )

    return Traced(closed, traced, rebuild)


# --------------------------------------------------------------------------------------
# Equations: the environment and binding.
# --------------------------------------------------------------------------------------


def literal_value(v: Literal, static: bool) -> Any:
    """A literal's value: with ``static``, a NumPy array of the literal's dtype (for an
    evaluator that treats NumPy values as known at trace time); else the value as JAX
    wrote it, whose type (a weak type included) binding reproduces exactly."""
    return np.asarray(v.val, dtype=v.aval.dtype) if static else v.val


def eval_jaxpr(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    evaluate: Callable[[JaxprEqn, List[Any]], Sequence[Any]],
    *,
    static_literals: bool = False,
    source_context: bool = False,
) -> List[Any]:
    """Evaluate ``jaxpr`` on ``consts`` and ``args``: ``evaluate(eqn, invals)`` gives the
    values of each equation's results, in order; returns the jaxpr's outputs.

    Args:
      static_literals: read literals as NumPy arrays of their dtype (`literal_value`).
      source_context: call ``evaluate`` under the equation's source line and name stack
        (`_jax_compat.equation_context`), so that what it binds is attributed to the
        user's code and named like the original. A transform whose output is evaluated
        again wants it: scalify's errors (an unsupported primitive), its telemetry and
        `scalify.fp8`'s ``keep`` filters name equations by those.
    """
    if len(args) != len(jaxpr.invars):
        raise TypeError(f"jaxpr expects {len(jaxpr.invars)} arguments, got {len(args)}.")
    env: Dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return literal_value(v, static_literals) if isinstance(v, Literal) else env[v]

    def write(v: Any, val: Any) -> None:
        if not isinstance(v, DropVar):  # an unused result: nothing reads it
            env[v] = val

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c)
    for v, a in zip(jaxpr.invars, args):
        write(v, a)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        context = _jax_compat.equation_context(eqn) if source_context else contextlib.nullcontext()
        with context:
            outs = evaluate(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            write(v, o)
    return [read(v) for v in jaxpr.outvars]


def bind(eqn: JaxprEqn, invals: Sequence[Any], params: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Bind ``eqn``'s primitive on ``invals`` with ``params`` (default: the equation's
    own), as a list of results. The parameters go through `Primitive.get_bind_params`,
    as JAX's own evaluation does: a call primitive binds its body as a function."""
    prim = eqn.primitive
    out = prim.bind(*invals, **prim.get_bind_params(eqn.params if params is None else params))
    return list(out) if prim.multiple_results else [out]


# --------------------------------------------------------------------------------------
# Sub-jaxprs.
# --------------------------------------------------------------------------------------

SubJaxpr = Union[ClosedJaxpr, Jaxpr]


def jaxpr_params(params: Dict[str, Any]) -> Iterator[Tuple[str, Any]]:
    """The parameters of an equation that hold sub-jaxprs, as ``(name, value)``: a
    ClosedJaxpr or Jaxpr (a loop's body, a call's function) or a tuple of them
    (``cond``'s branches)."""
    for k, v in params.items():
        if isinstance(v, (ClosedJaxpr, Jaxpr)):
            yield k, v
        elif isinstance(v, (tuple, list)) and any(isinstance(b, (ClosedJaxpr, Jaxpr)) for b in v):
            yield k, v


def sub_jaxprs(params: Dict[str, Any]) -> Iterator[Jaxpr]:
    """Every sub-jaxpr in an equation's parameters (one level down), as a Jaxpr."""
    for _, v in jaxpr_params(params):
        for b in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(b, (ClosedJaxpr, Jaxpr)):
                yield unpack(b)[0]


def unpack(j: SubJaxpr) -> Tuple[Jaxpr, Sequence[Any]]:
    """A sub-jaxpr as ``(jaxpr, consts)``: an open Jaxpr has no constants."""
    return (j.jaxpr, j.consts) if isinstance(j, ClosedJaxpr) else (j, ())
