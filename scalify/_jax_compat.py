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
    return isinstance(x, jax.core.Tracer)
