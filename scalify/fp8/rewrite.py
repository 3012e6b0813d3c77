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
from scalify.fp8.policy import E4M3, E5M2, Fp8Policy, MatmulInfo

# Dtypes of the matmuls the policy targets: a float64 product is a deliberate request
# for precision, a float8 one is already float8.
_WIDE = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


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


def _aval_spec(aval: Any) -> Any:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    """The rewrite of one traced function: a policy, and what it decided for this trace.

    ``prefix`` arguments are the name stack of the enclosing equations: a sub-jaxpr's
    equations have names relative to the equation that holds it, and ``keep`` filters
    see the full path."""

    policy: Fp8Policy
    # Ids of the output matmuls that `keep_output` keeps in this trace (`output_matmuls`).
    kept: frozenset = frozenset()

    def is_matmul(self, eqn: Any) -> bool:
        prim = eqn.primitive
        return prim is lax.dot_general_p or (self.policy.conv and prim is lax.conv_general_dilated_p)

    def is_target(self, eqn: Any, name: str) -> bool:
        """True for a matmul that runs in float8: one of wide floats that no ``keep``
        filter keeps."""
        if not self.is_matmul(eqn):
            return False
        try:
            dtypes = [np.dtype(v.aval.dtype) for v in (*eqn.invars[:2], eqn.outvars[0])]
        except TypeError:  # extended dtypes
            return False
        if not all(d in _WIDE for d in dtypes):
            return False
        if id(eqn) in self.kept:
            return False
        keep = self.policy.keep
        return not (keep is not None and keep(_info(eqn, name)))

    def count_matmuls(self, jaxpr: Jaxpr) -> int:
        """The number of matmul equations in ``jaxpr`` and its sub-jaxprs (each body once)."""
        n = 0
        for eqn in jaxpr.eqns:
            n += self.is_matmul(eqn)
            n += sum(self.count_matmuls(body) for body in walker.sub_jaxprs(eqn.params))
        return n

    def output_matmuls(self, jaxpr: Jaxpr, outvars: Sequence[Any]) -> set:
        """Ids of the matmul equations from which one of ``outvars`` is reached with no
        other matmul in between: the output projection (the logits of a language model,
        a classifier's last layer). The search goes back through every other equation,
        and into the bodies of calls whose outputs are the body's (jit, remat, custom
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
            if self.is_matmul(eqn):
                found.add(id(eqn))
                continue
            bodies = [b for _, b in walker.jaxpr_params(eqn.params) if isinstance(b, (ClosedJaxpr, Jaxpr))]
            if len(bodies) == 1 and len(walker.unpack(bodies[0])[0].outvars) == len(eqn.outvars):
                body = walker.unpack(bodies[0])[0]
                inner = self.output_matmuls(body, [body.outvars[eqn.outvars.index(v)]])
                if inner:
                    found |= inner
                    continue
            stack.extend(x for x in eqn.invars if not isinstance(x, Literal))
        return found

    def has_target(self, jaxpr: Jaxpr, prefix: str) -> bool:
        for eqn in jaxpr.eqns:
            name = _join(prefix, _jax_compat.name_stack(eqn))
            if self.is_target(eqn, name):
                return True
            if any(self.has_target(body, name) for body in walker.sub_jaxprs(eqn.params)):
                return True
        return False

    def sub(self, sub: Any, prefix: str) -> Any:
        """A rewritten copy of a sub-jaxpr (same input and output avals), or ``sub``
        itself when it holds no target."""
        jaxpr, consts = walker.unpack(sub)
        if not isinstance(sub, ClosedJaxpr) and jaxpr.constvars:
            raise NotImplementedError("an open sub-jaxpr with constants")
        if not self.has_target(jaxpr, prefix):
            return sub

        def fn(*args: Any) -> List[Any]:
            return self.eval(jaxpr, consts, args, prefix)

        new = jax.make_jaxpr(fn)(*[_aval_spec(v.aval) for v in jaxpr.invars])
        if isinstance(sub, ClosedJaxpr):
            return new
        if new.consts:
            raise NotImplementedError("the rewritten body of an open sub-jaxpr captured constants")
        return new.jaxpr

    def params(self, eqn: Any, name: str) -> Optional[Dict[str, Any]]:
        """``eqn``'s parameters with rewritten sub-jaxprs, or None when none changed."""
        subs = list(walker.jaxpr_params(eqn.params))
        if not subs:
            return None
        params = dict(eqn.params)
        changed = False
        try:
            for k, v in subs:
                if isinstance(v, (tuple, list)):
                    new = type(v)(self.sub(b, name) if isinstance(b, (ClosedJaxpr, Jaxpr)) else b for b in v)
                    changed |= any(a is not b for a, b in zip(new, v))
                else:
                    new = self.sub(v, name)
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

    def replace(self, eqn: Any, invals: Sequence[Any]) -> Any:
        """The targeted matmul ``eqn`` on ``invals``, as a float8 product."""
        p = self.policy
        dtypes = (eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, eqn.outvars[0].aval.dtype)
        return fp8_matmul(
            eqn.primitive, eqn.params, *invals,
            dtypes=dtypes, fwd_dtype=p.fwd_dtype, bwd_dtype=p.bwd_dtype, rescale=p.rescale,
        )

    def eval(self, jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], prefix: str) -> List[Any]:
        """Evaluate ``jaxpr`` binding every equation as it is, except the targeted
        matmuls (float8 custom VJPs) and the sub-jaxprs that contain some (rewritten
        copies). Each equation is bound under its own source line and name stack:
        scalify's errors and telemetry, and the ``keep`` filters of a later trace, still
        name the user's code."""

        def evaluate(eqn: Any, invals: List[Any]) -> List[Any]:
            name = _join(prefix, _jax_compat.name_stack(eqn))
            if self.is_target(eqn, name):
                return [self.replace(eqn, invals)]
            return walker.bind(eqn, invals, self.params(eqn, name))

        return walker.eval_jaxpr(jaxpr, consts, args, evaluate, source_context=True)


def autocast(
    fn: Optional[Callable] = None,
    policy: Optional[Fp8Policy] = None,
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
      policy: an `Fp8Policy`: all the options below in one value. When it is given,
        they must be left at their defaults.
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
        softmax directly, where E4M3's 3-bit mantissa costs most (a Llama-style model's
        untied head in float8 trains to a measurably higher validation loss:
        `benchmarks/train_gpt.py --model llama`). One matmul per model;
        False runs it in float8 too. A function whose only matmuls are its output
        projection runs them in float8.

    Returns:
      A function with ``fn``'s signature. It traces ``fn`` as `scalify` does (ScaledArray
      arguments as their data's shape and dtype; Python numbers and other arguments
      that are not arrays static) and re-evaluates the jaxpr with
      every targeted matmul -- one whose operands and result are float32, bfloat16 or
      float16 -- replaced by a float8 ``jax.custom_vjp``. Every other equation is bound
      unchanged; the bodies of jit, scan, while, cond, remat and custom_jvp/custom_vjp
      functions are rewritten the same way (same signature). Matmuls inside the
      *derivative rules* of custom_jvp/custom_vjp functions keep their precision. Called
      with ScaledArray arguments outside `scalify`, the function runs through `scalify`.

    The result composes with `jax.jit`, `jax.grad`, `jax.vmap`, `scalify`, `lax.scan`,
    `jax.checkpoint`, Flax and Equinox models.
    """
    options = Fp8Policy(
        fwd_dtype=fwd_dtype, bwd_dtype=bwd_dtype, keep=keep, conv=conv, rescale=rescale, keep_output=keep_output
    )
    if policy is None:
        policy = options
    elif not isinstance(policy, Fp8Policy):
        raise TypeError(f"autocast: policy must be an Fp8Policy, got {policy!r}.")
    elif options != Fp8Policy():
        raise TypeError("autocast: give either a policy or its options as keyword arguments, not both.")
    if fn is None:
        return functools.partial(autocast, policy=policy)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_scaled_leaf)
        traced = walker.trace(fn, leaves, treedef)
        closed = traced.jaxpr

        rewrite = _Rewrite(policy)
        if policy.keep_output:
            kept = rewrite.output_matmuls(closed.jaxpr, closed.jaxpr.outvars)
            # A function that is only its output projection (one matmul) runs in float8.
            if rewrite.count_matmuls(closed.jaxpr) > len(kept):
                rewrite = _Rewrite(policy, frozenset(kept))

        def run(*flat: Any) -> Any:
            return traced.rebuild(rewrite.eval(closed.jaxpr, closed.consts, flat, ""))

        if any(isinstance(x, ScaledArray) for x in traced.args):
            return scalify(run)(*traced.args)
        return run(*traced.args)

    return wrapped

