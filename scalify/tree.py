"""ScaledArray-aware tree utilities: `jax.tree` functions where a ScaledArray is a leaf.

A ScaledArray is a JAX pytree of ``(data, scale)``, so plain `jax.tree.map` would visit
its data and scale separately; the functions here stop at ScaledArrays instead::

    sfy.tree.map(lambda x: x.shape, {"w": ScaledArray(...), "b": jnp.zeros(3)})
    sfy.tree.astype(params, jnp.float16)   # ScaledArray data cast, scale kept
"""
from __future__ import annotations

import builtins
from typing import Any, Callable, List, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from scalify.core.datatype import ScaledArray, is_float_dtype, is_scaled_leaf

__all__ = ["astype", "map", "leaves", "flatten", "unflatten", "structure", "all"]


def astype(tree: Any, dtype: Any, floating_only: bool = True) -> Any:
    """Cast the leaves of ``tree`` to ``dtype``.

    A ScaledArray leaf has its data cast and its scale kept (same value, up to the
    rounding of the cast). With ``floating_only`` (the default), only floating leaves
    are cast: integer and boolean leaves (step counters, masks, PRNG data) are kept.
    Python floats are floating leaves; other non-array leaves (None, strings, Python
    ints) are kept.
    """
    def cast(x: Any) -> Any:
        if isinstance(x, ScaledArray):
            if not is_float_dtype(dtype):
                raise TypeError(f"scalify.tree.astype: ScaledArray data must stay floating, got {dtype}.")
            return x.astype(dtype)
        if isinstance(x, float):  # a Python float is a floating leaf too
            x = jnp.asarray(x)
        if not hasattr(x, "dtype"):
            return x
        if floating_only and not is_float_dtype(x.dtype):
            return x
        return jnp.asarray(x).astype(dtype)

    return jax.tree.map(cast, tree, is_leaf=is_scaled_leaf)


def map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` with ScaledArrays as leaves: ``f`` receives them whole."""
    return jax.tree.map(f, tree, *rest, is_leaf=is_scaled_leaf)


def leaves(tree: Any) -> List[Any]:
    """`jax.tree.leaves` with ScaledArrays as leaves."""
    return jax.tree.leaves(tree, is_leaf=is_scaled_leaf)


def flatten(tree: Any) -> Tuple[List[Any], PyTreeDef]:
    """`jax.tree.flatten` with ScaledArrays as leaves: ``(leaves, treedef)``."""
    return jax.tree.flatten(tree, is_leaf=is_scaled_leaf)


def unflatten(treedef: PyTreeDef, leaves: Any) -> Any:
    """`jax.tree.unflatten`: rebuild a tree from `flatten`'s treedef and leaves."""
    return jax.tree.unflatten(treedef, leaves)


def structure(tree: Any) -> PyTreeDef:
    """`jax.tree.structure` with ScaledArrays as leaves."""
    return jax.tree.structure(tree, is_leaf=is_scaled_leaf)


def all(tree: Any) -> bool:
    """`jax.tree.all` with ScaledArrays as leaves: True when every leaf is truthy. A
    ScaledArray leaf is judged by its value (``bool(x.to_array())``); as for
    `jax.tree.all`, an array leaf of more than one element is ambiguous (an error)."""
    for leaf in leaves(tree):
        if isinstance(leaf, ScaledArray):
            leaf = leaf.to_array()
        if not builtins.bool(leaf):
            return False
    return True
