"""A small factory for scalify's own JAX primitives.

Every user-callable scaling operation (``set_scaling``, ``cast_on_forward``,
``dynamic_rescale_l2``, ...) is a JAX primitive so that it survives tracing: inside
`scalify` the user's function is traced with plain tracers, and the interpreter later
meets the primitive in the jaxpr and calls its registered scaled rule on the ScaledArray.
Outside `scalify` (eagerly, under `jit`, `grad` or `vmap`) the primitive runs its
*plain* implementation, written with `jax.numpy`/`jax.lax` and lowered through
`mlir.lower_fun`, so it needs no lowering of its own.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

# JAX's marker of an unbatched operand in `vmap` rules (`batching.not_mapped`, not
# exported by `jax.interpreters.batching`): None.
NOT_MAPPED = None


def define_primitive(
    name: str,
    impl: Callable[..., Any],
    abstract_eval: Callable[..., Any],
    *,
    multiple_results: bool = False,
    batching_rule: Optional[Callable[..., Any]] = None,
    elementwise: bool = False,
) -> Primitive:
    """A primitive named ``name`` whose eager evaluation and lowering are ``impl``.

    Args:
      impl: ``impl(*arrays, **params)`` in `jax.numpy`/`jax.lax`, on plain arrays: used
        eagerly and, through `mlir.lower_fun`, for the compiled program.
      abstract_eval: ``abstract_eval(*avals, **params)`` returning the output aval(s).
      multiple_results: whether ``impl`` returns a sequence of arrays.
      batching_rule: a `jax.vmap` rule ``(args, dims, **params) -> (out, out_dims)``.
      elementwise: the primitive acts elementwise on its first operand: its `jax.vmap`
        rule is `elementwise_batching` (instead of ``batching_rule``).

    Differentiation rules (a JVP, a transpose) are the caller's to add: they depend on
    what the primitive means.
    """
    if elementwise and batching_rule is not None:
        raise ValueError(f"define_primitive({name!r}): elementwise=True gives the batching rule.")
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=multiple_results))
    if elementwise:
        batching_rule = elementwise_batching(prim)
    if batching_rule is not None:
        batching.primitive_batchers[prim] = batching_rule
    return prim


def elementwise_batching(prim: Primitive) -> Callable[..., Any]:
    """`vmap` rule of a primitive acting elementwise on its first operand, whose other
    operands (if any) must not be batched: the batch dimension passes through."""

    def rule(args: Any, dims: Any, **params: Any) -> Any:
        if any(d is not NOT_MAPPED for d in dims[1:]):
            raise NotImplementedError(
                f"scalify: '{prim.name}' under jax.vmap needs its extra operands unbatched."
            )
        out = prim.bind(*args, **params)
        if prim.multiple_results:
            return out, [dims[0]] * len(out)
        return out, dims[0]

    return rule
