"""Trace-time evaluation of static equations in NumPy.

When every operand of an equation is known at trace time (literals, ``zeros_like``,
``full(-inf)`` masks, constant scalars such as the ``1/N`` of a mean), the interpreter
folds it so that the rules meeting the result later still see a static value. Running
such an equation through XLA compiles a small program for each primitive and shape
(tens of milliseconds each, paid again after ``jax.clear_caches``); the evaluators here
compute the same values in NumPy instead.

Each evaluator covers only operands whose NumPy semantics equal XLA's and returns
``NotImplemented`` otherwise (the interpreter then falls back to XLA): integer division
and float-to-integer conversion, for instance, round differently in NumPy. The result is
cast to the equation's dtype by the interpreter. Elementwise float arithmetic on one
operation is correctly rounded in both, so folded values are the values XLA computes.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from scalify.core.datatype import is_float_dtype
from scalify.core.pow2 import is_static
from scalify.core.registry import register_static_impl


def _dtype(x: Any) -> np.dtype:
    return np.asarray(x).dtype


def _numeric(x: Any) -> bool:
    """Floats, and integers/bools whose wrap-around arithmetic NumPy shares with XLA."""
    d = _dtype(x)
    return is_float_dtype(d) or np.issubdtype(d, np.integer) or d == np.bool_


def _elementwise(fn: Callable[..., Any], floats_only: bool = False) -> Callable[..., Any]:
    def impl(*xs: Any, **params: Any) -> Any:
        ok = (lambda x: is_float_dtype(_dtype(x))) if floats_only else _numeric
        if not all(ok(x) for x in xs):
            return NotImplemented
        return fn(*(np.asarray(x) for x in xs))

    return impl


for _prim, _fn in [
    (lax.add_p, np.add),
    (lax.sub_p, np.subtract),
    (lax.mul_p, np.multiply),
    (lax.neg_p, np.negative),
    (lax.max_p, np.maximum),  # both propagate NaN
    (lax.min_p, np.minimum),
    (lax.eq_p, np.equal),
    (lax.ne_p, np.not_equal),
    (lax.lt_p, np.less),
    (lax.le_p, np.less_equal),
    (lax.gt_p, np.greater),
    (lax.ge_p, np.greater_equal),
    (lax.and_p, np.bitwise_and),  # logical on bools, bitwise on integers: as lax
    (lax.or_p, np.bitwise_or),
    (lax.not_p, np.invert),
]:
    register_static_impl(_prim)(_elementwise(_fn))

# Integer division truncates in XLA and floors in NumPy: floats only.
register_static_impl(lax.div_p)(_elementwise(np.divide, floats_only=True))
register_static_impl(lax.abs_p)(_elementwise(np.abs, floats_only=True))
register_static_impl(lax.sqrt_p)(_elementwise(np.sqrt, floats_only=True))


@register_static_impl(lax.select_n_p)
def select_n(which: Any, *cases: Any, **params: Any) -> Any:
    """``cases[which]`` elementwise (``which`` boolean or integer, scalar or full)."""
    return np.choose(np.asarray(which).astype(np.int32), [np.asarray(c) for c in cases])


@register_static_impl(lax.convert_element_type_p)
def convert_element_type(x: Any, *, new_dtype: Any, **params: Any) -> Any:
    """Casts to a float dtype (or between bools and integers) round as XLA does; a cast
    of floats to integers (NumPy leaves out-of-range values undefined) falls back.

    A float narrowed to a smaller float is returned as it is: the interpreter rounds it
    to the equation's dtype, and records the wider value where that rounding flushes it
    (for scaled rules to read at its own scale)."""
    src, dst = _dtype(x), np.dtype(new_dtype)
    if not (is_float_dtype(dst) or src == np.bool_ or (
            np.issubdtype(src, np.integer) and np.issubdtype(dst, np.integer))):
        return NotImplemented
    if is_float_dtype(src) and src.itemsize > dst.itemsize:
        return np.asarray(x)
    return np.asarray(x).astype(dst)


@register_static_impl(lax.broadcast_in_dim_p)
def broadcast_in_dim(x: Any, *dyn: Any, shape: Any, broadcast_dimensions: Any,
                     **params: Any) -> Any:
    """A zero-copy NumPy broadcast view (static shapes only)."""
    if dyn:
        return NotImplemented
    x = np.asarray(x)
    expanded = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
        expanded[d] = x.shape[i]
    return np.broadcast_to(x.reshape(expanded), tuple(shape))


@register_static_impl(lax.reshape_p)
def reshape(x: Any, *dyn: Any, new_sizes: Any, dimensions: Any = None, **params: Any) -> Any:
    if dyn or dimensions is not None:
        return NotImplemented
    return np.reshape(np.asarray(x), tuple(new_sizes))


@register_static_impl(lax.squeeze_p)
def squeeze(x: Any, *, dimensions: Any, **params: Any) -> Any:
    return np.squeeze(np.asarray(x), axis=tuple(dimensions))


@register_static_impl(lax.transpose_p)
def transpose(x: Any, *, permutation: Any, **params: Any) -> Any:
    return np.transpose(np.asarray(x), tuple(permutation))


@register_static_impl(lax.iota_p)
def iota(*dyn: Any, dtype: Any, shape: Any, dimension: int, **params: Any) -> Any:
    """Small integer ranges only (positions for a causal mask): a large one stays an
    ``iota`` in the program rather than becoming an embedded constant."""
    if dyn or int(np.prod(shape)) > _IOTA_MAX_SIZE or not _numeric(np.zeros((), dtype)):
        return NotImplemented
    r = np.arange(shape[dimension], dtype=dtype)
    expanded = [1] * len(shape)
    expanded[dimension] = shape[dimension]
    return np.broadcast_to(r.reshape(expanded), tuple(shape))


_IOTA_MAX_SIZE = 1 << 16


@register_static_impl(P.jit_p)
def jit(*operands: Any, jaxpr: Any, **params: Any) -> Any:
    """A nested ``jit`` of static operands (``jnp.tril`` masks, ``zeros_like``...): its
    equations are folded one by one by the interpreter, NumPy evaluators first."""
    from scalify.core.interpreter import eval_closed_jaxpr  # the interpreter imports rules

    outs = eval_closed_jaxpr(jaxpr, *operands)
    if not all(is_static(o) for o in outs):
        return NotImplemented
    return outs
