"""Shared test helpers: plain float32 JAX is the oracle."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import scalify as sfy
from scalify.core import walker
from scalify.core.pow2 import is_pow2

# Relative tolerance of a result held in data of each dtype (a few ulps of the format,
# since rules compute in float32 and round once).
RTOL = {
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 4e-3,
    np.dtype(jnp.bfloat16): 3e-2,
    np.dtype(ml_dtypes.float8_e4m3fn): 1.5e-1,
    np.dtype(ml_dtypes.float8_e5m2): 3e-1,
}


def rtol_of(dtype: Any) -> float:
    return RTOL[np.dtype(dtype)]


def scaled(values: Any, scale: float, dtype: Any = np.float16) -> sfy.ScaledArray:
    """A ScaledArray holding ``values * scale`` with ``values`` as data in ``dtype``."""
    return sfy.ScaledArray(jnp.asarray(values, dtype=dtype), jnp.asarray(scale, jnp.float32))


def oracle(fn: Any, *args: Any) -> Any:
    """``fn`` on the float32 values of ``args`` (ScaledArrays unscaled in float32)."""
    return fn(*sfy.asarray(args, dtype=jnp.float32))


def assert_close(out: Any, expected: Any, dtype: Any = np.float32, atol: float = 0.0) -> None:
    """``out`` (ScaledArray or array) equals ``expected`` within the tolerance of ``dtype``."""
    got = np.asarray(sfy.asarray(out, dtype=jnp.float32) if isinstance(out, sfy.ScaledArray) else out, np.float64)
    want = np.asarray(expected, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol_of(dtype), atol=atol)


def assert_pow2_scales(tree: Any) -> None:
    """Every ScaledArray in ``tree`` has an exact power-of-two scale, or scale 0 with
    all-zero data (the zero tensor)."""
    for leaf in jax.tree.leaves(tree, is_leaf=sfy.core.is_scaled_leaf):
        if isinstance(leaf, sfy.ScaledArray):
            s = np.asarray(leaf.scale)
            if s == 0:
                assert np.all(np.asarray(leaf.data, np.float32) == 0), "scale 0 on non-zero data"
                continue
            assert bool(is_pow2(s)), f"scale {leaf.scale} is not a power of two"


def assert_finite(tree: Any) -> None:
    for leaf in jax.tree.leaves(sfy.asarray(tree, dtype=jnp.float32)):
        assert np.all(np.isfinite(np.asarray(leaf))), "non-finite values"


def both(f: Any) -> list:
    """The scalified function, eagerly and under jit."""
    return [sfy.scalify(f), jax.jit(sfy.scalify(f))]


def primitive_names(fn: Any, *args: Any) -> set:
    """Names of the primitives in ``fn``'s jaxpr, nested jaxprs included (scalify binds
    its scalar scale helpers as `jit` equations)."""
    names = set()

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            subs = jax.tree.leaves(eqn.params, is_leaf=lambda v: hasattr(v, "eqns") or hasattr(v, "jaxpr"))
            for sub in subs:
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def count_eqns(jaxpr: Any, name: str) -> int:
    """Occurrences of primitive ``name`` in a jaxpr and all its sub-jaxprs."""
    return sum(
        (eqn.primitive.name == name) + sum(count_eqns(sub, name) for sub in walker.sub_jaxprs(eqn.params))
        for eqn in jaxpr.eqns
    )


def assert_gathered_scale(out: Any, dtype: Any, *scales: float) -> None:
    """The scale of a rule that gathers the elements of operands read at distinct
    scales ``scales`` (concatenate, stack, pad, scatter, dynamic_update_slice, docs/
    design.md): in a narrow format (float16, float8) the max-abs of the data at the top
    of the format's guard band (the zero tensor at scale 0); in a wide one the largest
    operand scale."""
    from scalify.core.formats import is_narrow
    from scalify.core.range_guard import guard_band

    if is_narrow(np.dtype(dtype)) and len(scales) > 1:
        _, hi, _ = guard_band(np.dtype(dtype))
        top = float(np.max(np.abs(np.asarray(out.data, np.float32))))
        assert (top == 0 and float(out.scale) == 0) or hi / 2 <= top < hi, (top, float(out.scale))
        assert_pow2_scales(out)
    else:
        assert float(out.scale) == max(scales), (float(out.scale), scales)
