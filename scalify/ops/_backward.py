"""`map_on_backward`: identity on the forward pass, a function of the cotangents on the
backward pass.

A single primitive, ``scalify_map_on_backward``, returns its operands unchanged. Its
JVP rule emits the same primitive on the tangents, and its transpose applies ``fn`` to
the cotangents. So under `jax.grad` *inside* `scalify`, ``fn`` is traced into the
backward part of the jaxpr (where scalify's rules then act on scaled cotangents), while
a forward-only `scalify` meets the primitive itself, whose scaled rule is the identity.
(A `jax.custom_vjp` would do the same under `grad`, but a forward-only `scalify` would
then need a rule for `custom_vjp_call`; the primitive needs nothing else.)

Differentiating a scalified function from the *outside* (``jax.grad(scalify(f))``)
does not see the primitive (the rule returns its operands): take `jax.grad` inside
`scalify` to act on gradients.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.interpreters import ad

from scalify.core.datatype import ScaledArray
from scalify.core.registry import register_scaled_op
from scalify.lax._primitive import define_primitive


def _impl(*xs: Any, fn: Callable) -> Any:
    return list(xs)


def _abstract(*avals: Any, fn: Callable) -> Any:
    return list(avals)


def _batch(args: Any, dims: Any, *, fn: Callable) -> Any:
    return map_on_backward_p.bind(*args, fn=fn), list(dims)


map_on_backward_p = define_primitive(
    "scalify_map_on_backward", _impl, _abstract, multiple_results=True, batching_rule=_batch
)


def _jvp(primals: Any, tangents: Any, *, fn: Callable) -> Any:
    out = map_on_backward_p.bind(*primals, fn=fn)
    if all(type(t) is ad.Zero for t in tangents):
        return out, list(tangents)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return out, map_on_backward_p.bind(*tangents, fn=fn)


def _transpose(cts: Any, *args: Any, fn: Callable) -> Any:
    if all(type(ct) is ad.Zero for ct in cts):
        return list(cts)
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    out = list(fn(cts))
    if len(out) != len(args):
        raise ValueError(f"map_on_backward: fn returned {len(out)} cotangents for {len(args)} operands.")
    return out


ad.primitive_jvps[map_on_backward_p] = _jvp
ad.primitive_transposes[map_on_backward_p] = _transpose


@register_scaled_op(map_on_backward_p)
def _map_on_backward_rule(*xs: Any, fn: Callable, **params: Any) -> Any:
    """Identity on the forward pass: operands (scaled or not) are returned unchanged;
    ``fn`` only acts on cotangents, through the transpose rule."""
    return list(xs)


def map_on_backward(fn: Callable[[Sequence[Any]], Sequence[Any]], args: Sequence[Any]) -> list:
    """Return ``args`` unchanged; on the backward pass, their cotangents (a list, in the
    order of the flattened ``args``, ScaledArrays as ``data``/``scale`` pairs outside
    scalify) become ``fn(cotangents)``.

    ``fn`` receives a list of plain cotangent arrays and returns a list of the same
    shapes and dtypes. Outside `scalify`, a ScaledArray operand is passed through as its
    ``data`` and ``scale`` leaves.
    """
    leaves, tree = jax.tree.flatten(list(args))
    if not leaves:
        return list(args)
    out = map_on_backward_p.bind(*leaves, fn=fn)
    return jax.tree.unflatten(tree, out)


def map_on_backward_data(fn: Callable[[Any], Any], x: Any) -> Any:
    """``x`` unchanged; on the backward pass its cotangent becomes ``fn(cotangent)``.

    Outside `scalify` on a ScaledArray, ``fn`` acts on the cotangent of ``x.data`` and
    the scale's cotangent passes through.
    """
    if isinstance(x, ScaledArray):
        (data,) = map_on_backward_p.bind(x.data, fn=_ListFn(fn))
        return ScaledArray(data, x.scale)
    (out,) = map_on_backward_p.bind(x, fn=_ListFn(fn))
    return out


class _ListFn:
    """``fn`` of one cotangent as a function of a one-element list (hashable by ``fn``)."""


    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, cts: Sequence[Any]) -> list:
        return [self.fn(cts[0])]

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _ListFn) and other.fn == self.fn

    def __repr__(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)!r}"


class bound:
    """``fn`` with trailing static arguments, ``bound(fn, a)(x) == fn(x, a)``, equal and
    hashed by value so that equal primitive parameters compare equal."""


    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn = fn
        self.args = args

    def __call__(self, x: Any) -> Any:
        return self.fn(x, *self.args)

    def __hash__(self) -> int:
        return hash((self.fn, self.args))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, bound) and (other.fn, other.args) == (self.fn, self.args)

    def __repr__(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}{self.args!r}"


__all__ = ["map_on_backward", "map_on_backward_data", "map_on_backward_p", "bound"]
