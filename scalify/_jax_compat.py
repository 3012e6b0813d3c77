"""The one module of scalify that touches JAX internals or version-specific API.

Everything here has a public-API fallback or a narrow purpose; when a JAX release moves
one of these names, this is the only file to mend.
"""
from __future__ import annotations

import os
from typing import Any

import jax

try:  # Source locations of jaxpr equations, as "file.py:12:4 (fn)".
    from jax._src import source_info_util as _source_info_util
except ImportError:  # pragma: no cover - depends on the JAX release
    _source_info_util = None


def source_line(eqn: Any) -> str:
    """The user's source line that produced a jaxpr equation, or '<unknown>'."""
    if _source_info_util is None:  # pragma: no cover
        return "<unknown>"
    try:
        return _source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort for error messages only
        return "<unknown>"


def exclude_from_tracebacks(path: str) -> None:
    """Skip frames of `path` when JAX attributes an equation to a source line, so that
    errors point at the user's code rather than at scalify's."""
    if _source_info_util is not None and hasattr(_source_info_util, "register_exclusion"):
        _source_info_util.register_exclusion(path)


exclude_from_tracebacks(os.path.dirname(os.path.abspath(__file__)) + os.sep)


def call_wrapped(fun: Any, *args: Any) -> Any:
    """Call a `linear_util.WrappedFun` (the `bwd`/`jvp_jaxpr_fun` params of custom
    derivative primitives) or a plain callable."""
    if hasattr(fun, "call_wrapped"):
        return fun.call_wrapped(*args)
    return fun(*args)


def is_unspecified(sharding: Any) -> bool:
    """True for JAX's 'no sharding given' sentinel in `jit` params."""
    return sharding is None or type(sharding).__name__ == "UnspecifiedValue"


def is_tracer(x: Any) -> bool:
    """True for a value being traced (by `jit`, `grad`, `vmap`...): its value is not known
    here. The one place scalify names `jax.core.Tracer`."""
    return isinstance(x, jax.core.Tracer)


def is_symbolic_zero(x: Any) -> bool:
    """True for the symbolic zeros (`Zero`, `SymbolicZero`) that JAX's flattened custom
    derivative rules may return in place of an array."""
    return type(x).__name__ in ("Zero", "SymbolicZero") and hasattr(x, "aval")


def name_stack(eqn: Any) -> str:
    """The name stack of a jaxpr equation as a string, e.g. ``"Model/head"`` (Flax module
    paths and `jax.named_scope` names), or ``""`` when unknown. Inside a sub-jaxpr (jit,
    scan, ...) it is relative to the enclosing equation."""
    try:
        return str(eqn.source_info.name_stack)
    except Exception:  # pragma: no cover - best effort
        return ""


def equation_context(eqn: Any) -> Any:
    """A context manager that re-binds under ``eqn``'s source line, name stack (appended
    to the current one) and equation context, as `jax.core.eval_jaxpr` does, so that
    equations re-traced by a jaxpr rewrite keep their names and lines."""
    import contextlib

    @contextlib.contextmanager
    def manager() -> Any:
        try:
            stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
            user = _source_info_util.user_context(eqn.source_info.traceback, name_stack=stack)
        except Exception:  # pragma: no cover - depends on the JAX release
            user = contextlib.nullcontext()
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
        with user, (ctx if ctx is not None else contextlib.nullcontext()):
            yield

    return manager()


def internal_primitive(module: str, name: str) -> Any:
    """The primitive ``jax._src.<module>.<name>``, or None when this JAX release has no
    such name. For primitives JAX does not export publicly but that scalify gives a rule:
    ``shard_map`` itself and the collectives that only appear inside it
    (``psum_invariant``, ``pvary``, ``reduce_scatter``, ...)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"jax._src.{module}"), name)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX release
        return None


def varying_axes(x: Any) -> Any:
    """The manual mesh axes over which ``x`` varies inside ``shard_map`` (its type's
    "varying manual axes", tracked when ``check_vma=True``) as a frozenset; empty when
    JAX does not track them (``check_vma=False``, outside shard_map); None when unknown."""
    try:
        aval = jax.typeof(x)
    except Exception:  # pragma: no cover - not an array
        return None
    mat = getattr(aval, "mat", None)  # jax >= 0.9: ManualAxisType(varying=...)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    vma = getattr(aval, "vma", None)  # older releases
    return None if vma is None else frozenset(vma)


def strong_aval(x: Any) -> Any:
    """The abstract value of an array or tracer (shape, dtype, sharding and the varying manual
    axes of ``shard_map``), not weakly typed: what `jax.make_jaxpr` should trace with
    for a ScaledArray's traced data."""
    aval = jax.typeof(x)
    if getattr(aval, "weak_type", False):
        aval = aval.update(weak_type=False)
    return aval
