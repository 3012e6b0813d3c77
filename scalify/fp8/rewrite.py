"""`autocast`: a function's matmuls rewritten as float8 custom VJPs.

The rewrite acts on the function *before* it is differentiated: it traces the function
to a jaxpr and evaluates it again (a `scalify.core.walker` client), binding every
equation as it is except the targeted matmuls, which become the custom VJPs of
`scalify.fp8.kernels`. So the forward and the two backward products of every matmul
are told apart, and `jax.grad` of the result differentiates through float8 products.
The bodies of jit, scan, while, cond, remat and custom_jvp/custom_vjp functions are
rewritten the same way, into copies of the same signature.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from scalify import _jax_compat
from scalify.core import walker
from scalify.core.datatype import ScaledArray, is_scaled_leaf
from scalify.core.interpreter import scalify
from scalify.fp8.kernels import fp8_matmul
from scalify.fp8.policy import E4M3, E5M2, MatmulInfo, _as_keep

# Dtypes of the matmuls the policy targets: a float64 product is a deliberate request
# for precision, a float8 one is already float8.
_WIDE = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True)
class _Policy:
    fwd_dtype: np.dtype
    bwd_dtype: np.dtype
    keep: Optional[Callable[[MatmulInfo], bool]]
    conv: bool
    rescale: Optional[str]
    keep_output: bool = True
    # Per trace: ids of the output matmuls that `keep_output` keeps (`_output_matmuls`).
    kept: frozenset = frozenset()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix and name else (prefix or name)


def _info(eqn: Any, name: str) -> MatmulInfo:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    return MatmulInfo(
        primitive=eqn.primitive.name,
        lhs_shape=tuple(lhs.shape),
        rhs_shape=tuple(rhs.shape),
        out_shape=tuple(out.shape),
        lhs_dtype=np.dtype(lhs.dtype),
        rhs_dtype=np.dtype(rhs.dtype),
        out_dtype=np.dtype(out.dtype),
        name=name,
        source=_jax_compat.source_line(eqn),
        params=dict(eqn.params),
    )


def _is_target(eqn: Any, policy: _Policy, name: str) -> bool:
    prim = eqn.primitive
    if prim is not lax.dot_general_p and not (policy.conv and prim is lax.conv_general_dilated_p):
        return False
    try:
        dtypes = [np.dtype(v.aval.dtype) for v in (*eqn.invars[:2], eqn.outvars[0])]
    except TypeError:  # extended dtypes
        return False
    if not all(d in _WIDE for d in dtypes):
        return False
    if id(eqn) in policy.kept:
        return False
    return not (policy.keep is not None and policy.keep(_info(eqn, name)))


def _is_matmul(eqn: Any, policy: _Policy) -> bool:
    return eqn.primitive is lax.dot_general_p or (policy.conv and eqn.primitive is lax.conv_general_dilated_p)


def _count_matmuls(jaxpr: Jaxpr, policy: _Policy) -> int:
    """The number of matmul equations in ``jaxpr`` and its sub-jaxprs (each body once)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += _is_matmul(eqn, policy)
        n += sum(_count_matmuls(body, policy) for body in walker.sub_jaxprs(eqn.params))
    return n


def _output_matmuls(jaxpr: Jaxpr, outvars: Sequence[Any], policy: _Policy) -> set:
    """Ids of the matmul equations from which one of ``outvars`` is reached with no other
    matmul in between: the output projection (the logits of a language model, a
    classifier's last layer). The search goes back through every other equation, and
    into the bodies of calls whose outputs are the body's (jit, remat, custom
    derivatives); loops and conditionals are passed through to their inputs."""
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    found: set = set()
    seen: set = set()
    stack = [v for v in outvars if not isinstance(v, Literal)]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        eqn = producer.get(v)
        if eqn is None:
            continue
        if _is_matmul(eqn, policy):
            found.add(id(eqn))
            continue
        bodies = [b for _, b in walker.jaxpr_params(eqn.params) if isinstance(b, (ClosedJaxpr, Jaxpr))]
        if len(bodies) == 1 and len(walker.unpack(bodies[0])[0].outvars) == len(eqn.outvars):
            body = walker.unpack(bodies[0])[0]
            inner = _output_matmuls(body, [body.outvars[eqn.outvars.index(v)]], policy)
            if inner:
                found |= inner
                continue
        stack.extend(x for x in eqn.invars if not isinstance(x, Literal))
    return found


def _has_target(jaxpr: Jaxpr, policy: _Policy, prefix: str) -> bool:
    for eqn in jaxpr.eqns:
        name = _join(prefix, _jax_compat.name_stack(eqn))
        if _is_target(eqn, policy, name):
            return True
        if any(_has_target(body, policy, name) for body in walker.sub_jaxprs(eqn.params)):
            return True
    return False


def _aval_spec(aval: Any) -> Any:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def _rewrite_sub(sub: Any, policy: _Policy, prefix: str) -> Any:
    """A rewritten copy of a sub-jaxpr (same input and output avals)."""
    jaxpr, consts = walker.unpack(sub)
    if not isinstance(sub, ClosedJaxpr) and jaxpr.constvars:
        raise NotImplementedError("an open sub-jaxpr with constants")
    if not _has_target(jaxpr, policy, prefix):
        return sub

    def fn(*args: Any) -> List[Any]:
        return _eval(jaxpr, consts, args, policy, prefix)

    new = jax.make_jaxpr(fn)(*[_aval_spec(v.aval) for v in jaxpr.invars])
    if isinstance(sub, ClosedJaxpr):
        return new
    if new.consts:
        raise NotImplementedError("the rewritten body of an open sub-jaxpr captured constants")
    return new.jaxpr


def _rewrite_params(eqn: Any, policy: _Policy, name: str) -> Optional[Dict[str, Any]]:
    subs = list(walker.jaxpr_params(eqn.params))
    if not subs:
        return None
    params = dict(eqn.params)
    changed = False
    try:
        for k, v in subs:
            if isinstance(v, (tuple, list)):
                new = type(v)(
                    _rewrite_sub(b, policy, name) if isinstance(b, (ClosedJaxpr, Jaxpr)) else b for b in v
                )
                changed |= any(a is not b for a, b in zip(new, v))
            else:
                new = _rewrite_sub(v, policy, name)
                changed |= new is not v
            params[k] = new
    except Exception as e:  # e.g. shard_map bodies that need their mesh axes in scope
        warnings.warn(
            f"scalify.fp8.autocast: could not rewrite the body of '{eqn.primitive.name}' "
            f"({type(e).__name__}: {e}); its matmuls keep their precision. Apply autocast "
            "inside it instead (e.g. to the loss inside the shard_map).",
            stacklevel=3,
        )
        return None
    return params if changed else None


def _replace(eqn: Any, invals: Sequence[Any], policy: _Policy) -> Any:
    """The targeted matmul ``eqn`` on ``invals``, as a float8 product."""
    dtypes = (eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, eqn.outvars[0].aval.dtype)
    return fp8_matmul(
        eqn.primitive, eqn.params, *invals,
        dtypes=dtypes, fwd_dtype=policy.fwd_dtype, bwd_dtype=policy.bwd_dtype, rescale=policy.rescale,
    )


def _eval(
    jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], policy: _Policy, prefix: str
) -> List[Any]:
    """Evaluate ``jaxpr`` binding every equation as it is, except the targeted matmuls
    (float8 custom VJPs) and the sub-jaxprs that contain some (rewritten copies). Each
    equation is bound under its own source line and name stack: scalify's errors and
    telemetry, and the ``keep`` filters of a later trace, still name the user's code."""

    def evaluate(eqn: Any, invals: List[Any]) -> List[Any]:
        name = _join(prefix, _jax_compat.name_stack(eqn))
        if _is_target(eqn, policy, name):
            return [_replace(eqn, invals, policy)]
        return walker.bind(eqn, invals, _rewrite_params(eqn, policy, name))

    return walker.eval_jaxpr(jaxpr, consts, args, evaluate, source_context=True)


def _float_dtype(name: str, dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"autocast: {name} must be a floating dtype, got {d}.")
    return d


def autocast(
    fn: Optional[Callable] = None,
    *,
    fwd_dtype: Any = E4M3,
    bwd_dtype: Any = E5M2,
    keep: Any = None,
    conv: bool = False,
    rescale: Optional[str] = "grad",
    keep_output: bool = True,
) -> Callable:
    """Run the matrix products of ``fn`` as float8 ``dot_general``\\ s.

    Args:
      fn: the function, typically a loss ``loss(params, batch)``; apply `autocast`
        *before* `jax.grad` (``jax.value_and_grad(autocast(loss))``) so that the
        backward products are float8 too. ``autocast(keep=...)`` without ``fn`` returns a
        decorator.
      fwd_dtype: the operands' format on the forward pass (default E4M3).
      bwd_dtype: the output cotangent's format on the backward pass (default E5M2); the
        operand gradients are ``bwd_dtype x fwd_dtype`` products.
      keep: matmuls to keep in their own precision: a callable ``MatmulInfo -> bool``
        (e.g. ``lambda m: m.out_shape[-1] == vocab``), a name or a list of names
        (`keep_names`: Flax module paths, `jax.named_scope` names).
      conv: also run ``conv_general_dilated`` in float8 (forward float8 convolution;
        gradients from float8-rounded operands and cotangent).
      rescale: inside `scalify`, which float8 casts first bring the data to unit RMS
        by moving its norm into the (power-of-two) scale (`scalify.ops.
        dynamic_rescale_l2`, one reduction per tensor): ``"grad"`` (default) the output
        cotangents before their E5M2 cast -- the rules' static scales let gradient data
        drift from unit scale through deep backward passes (layer norms, softmax,
        residual sums), and E5M2 would flush what drifts below ~2^-16; ``"all"`` the
        forward operands too; ``None`` none (plain casts: the cheapest program, exactly
        as the rules propagate scales). Plain arrays outside scalify are never rescaled.
      keep_output: keep the output projection in its own precision (default True): the
        matmuls from which ``fn``'s outputs are reached with no other matmul in between
        (a language model's logits, a classifier's last layer). Their results feed the
        softmax directly, where E4M3's 3-bit mantissa costs most: a Llama-style model's
        untied head in float8 trained to a 3% higher validation loss on
        `benchmarks/train_gpt.py`, within 0.01% of float32 kept. One matmul per model;
        False runs it in float8 too. A function whose only matmuls are its output
        projection runs them in float8.

    Returns:
      A function with ``fn``'s signature. It traces ``fn`` (ScaledArray arguments as
      their data's shape and dtype, as `scalify` does) and re-evaluates the jaxpr with
      every targeted matmul -- one whose operands and result are float32, bfloat16 or
      float16 -- replaced by a float8 ``jax.custom_vjp``. Every other equation is bound
      unchanged; the bodies of jit, scan, while, cond, remat and custom_jvp/custom_vjp
      functions are rewritten the same way (same signature). Matmuls inside the
      *derivative rules* of custom_jvp/custom_vjp functions keep their precision. Called
      with ScaledArray arguments outside `scalify`, the function runs through `scalify`.

    The result composes with `jax.jit`, `jax.grad`, `jax.vmap`, `scalify`, `lax.scan`,
    `jax.checkpoint`, Flax and Equinox models.
    """
    if fn is None:
        return functools.partial(
            autocast, fwd_dtype=fwd_dtype, bwd_dtype=bwd_dtype, keep=keep, conv=conv, rescale=rescale,
            keep_output=keep_output,
        )
    if rescale not in (None, "grad", "all"):
        raise ValueError(f"autocast: rescale must be None, 'grad' or 'all', got {rescale!r}.")
    policy = _Policy(
        fwd_dtype=_float_dtype("fwd_dtype", fwd_dtype),
        bwd_dtype=_float_dtype("bwd_dtype", bwd_dtype),
        keep=_as_keep(keep),
        conv=bool(conv),
        rescale=rescale,
        keep_output=bool(keep_output),
    )

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_scaled_leaf)
        traced = walker.trace(fn, leaves, treedef)
        closed = traced.jaxpr

        traced_policy = policy
        if policy.keep_output:
            kept = _output_matmuls(closed.jaxpr, closed.jaxpr.outvars, policy)
            # A function that is only its output projection (one matmul) runs in float8.
            if _count_matmuls(closed.jaxpr, policy) > len(kept):
                traced_policy = dataclasses.replace(policy, kept=frozenset(kept))

        def run(*flat: Any) -> Any:
            return traced.rebuild(_eval(closed.jaxpr, closed.consts, flat, traced_policy, ""))

        if any(isinstance(x, ScaledArray) for x in traced.args):
            return scalify(run)(*traced.args)
        return run(*traced.args)

    return wrapped

