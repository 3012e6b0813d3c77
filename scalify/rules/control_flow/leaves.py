"""ScaledArrays as leaves of a JAX transform.

The control-flow rules rebuild ``jax.jit``, ``lax.scan``, ``lax.while_loop``,
``lax.switch``, ``jax.custom_vjp``/``custom_jvp`` and ``remat`` around a scalified
sub-jaxpr. Those transforms take and return pytrees of arrays, so a ScaledArray crosses
them as its two leaves, ``data`` and ``scale``. This module holds what every such rule
needs for that crossing:

- the *kind* of a value (`kind_of`): plain, or scaled with a scale of a given dtype.
  A transform's types must match on both sides (a loop carry, the branches of a
  ``switch``), so values are converted to an agreed kind (`as_kind`);
- `Split`: leaves known at trace time (NumPy values: static scales, folded constants)
  are closed over rather than passed as arguments, so they stay static inside the
  sub-jaxpr, where the rules fold them;
- `times`: the value of a ScaledArray or plain operand times a scalar, rounded once
  (tangents, cotangents and batched selections are built with it).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.operands import as_jax, compute_dtype, is_scale_free, promote, scale_dtype
from scalify.core.pow2 import is_static

_SCALED_TREEDEF = jax.tree.structure(ScaledArray(np.zeros((), np.float32), np.float32(1)))


def mk(data: Any, scale: Any) -> ScaledArray:
    """A ScaledArray from leaves, unchecked (tracers, cotangents, negative ct scales)."""
    return jax.tree.unflatten(_SCALED_TREEDEF, [data, scale])


def is_float(x: Any) -> bool:
    return isinstance(x, ScaledArray) or is_float_dtype(getattr(x, "dtype", np.dtype(type(x))))


def kind_of(x: Any) -> Optional[np.dtype]:
    """The *kind* of a value: its scale dtype if it is a ScaledArray, else None."""
    if isinstance(x, ScaledArray):
        return np.dtype(getattr(x.scale, "dtype", scale_dtype()))
    return None


def as_kind(x: Any, sdtype: Optional[np.dtype]) -> Any:
    """``x`` as a JAX value of a given kind: a ScaledArray whose scale is a JAX array of
    dtype ``sdtype``, or (``sdtype=None``) a plain array of the same value.

    A scale-free constant (0, +-inf, NaN: an accumulator's initial zeros, JAX's zero
    cotangents) promoted to a traced ScaledArray takes the smallest normal scale, the
    nearest to "no scale": ``acc + x`` then gets ``x``'s scale (``hypot(tiny, sx) = sx``)
    instead of being pulled towards 1, which would underflow a tiny ``x``."""
    if sdtype is None:
        return x.to_array() if isinstance(x, ScaledArray) else as_jax(x)
    if not isinstance(x, ScaledArray) and is_scale_free(x):
        return mk(as_jax(x), jnp.asarray(jnp.finfo(sdtype).tiny, sdtype))
    x = promote(x)
    return mk(as_jax(x.data), jnp.asarray(x.scale, sdtype))


def dynamic(x: Any) -> Any:
    """``x`` with every static leaf turned into a JAX array."""
    if isinstance(x, ScaledArray):
        return mk(as_jax(x.data), jnp.asarray(x.scale))
    return as_jax(x)


def times(x: Any, factor: Any, dtype: Any) -> Any:
    """The value of ``x`` (ScaledArray or plain) times a scalar ``factor``, as ``dtype``;
    computed in float32 (or wider) and rounded once."""
    cd = compute_dtype(dtype)
    if isinstance(x, ScaledArray):
        data, factor = x.data, jnp.asarray(x.scale, cd) * jnp.asarray(factor, cd)
    else:
        data = x
    return (as_jax(data).astype(cd) * jnp.asarray(factor, cd)).astype(dtype)


class Split:
    """Operands split into dynamic leaves, passed through a JAX transform as arguments,
    and static leaves (NumPy values), closed over so they stay known at trace time.

    ``owner[k] = (i, field)`` says which operand ``i`` and which part (``"data"``,
    ``"scale"`` or ``"value"`` for plain operands) dynamic leaf ``k`` is.
    """

    def __init__(self, operands: Sequence[Any]):
        self.template: List[Any] = []  # per operand: [data, scale] or value; None if dynamic
        self.scaled: List[bool] = []
        self.leaves: List[Any] = []
        self.owner: List[Tuple[int, str]] = []
        for i, x in enumerate(operands):
            self.scaled.append(isinstance(x, ScaledArray))
            parts = [("data", x.data), ("scale", x.scale)] if self.scaled[-1] else [("value", x)]
            entry = []
            for field, v in parts:
                if is_static(v):
                    entry.append(v)
                else:
                    entry.append(None)
                    self.leaves.append(v)
                    self.owner.append((i, field))
            self.template.append(entry)

    def rebuild(self, leaves: Sequence[Any]) -> List[Any]:
        entries = [list(e) for e in self.template]
        for (i, field), v in zip(self.owner, leaves):
            entries[i][1 if field == "scale" else 0] = v
        return [mk(*e) if s else e[0] for e, s in zip(entries, self.scaled)]

    def key(self) -> Optional[tuple]:
        """A hashable description of kinds, dynamic positions and static values; None
        when a static leaf is too large to key on."""
        out = []
        for entry, s in zip(self.template, self.scaled):
            for v in entry:
                if v is None:
                    out.append(None)
                    continue
                a = np.asarray(v)
                if a.size > 1:
                    return None
                out.append((a.dtype.str, a.shape, a.tobytes()))
            out.append(s)
        return tuple(out)

