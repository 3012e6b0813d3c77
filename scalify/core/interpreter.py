"""The scalify transform: trace to a jaxpr, then re-interpret every equation.

The interpreter knows no primitive by name. For each equation it:

1. calls the primitive's registered scaled rule when any operand is a ScaledArray, or
   when the primitive, or one inside its sub-jaxprs (control flow), is registered
   ``always_scaled`` (and raises `UnsupportedPrimitiveError` naming the primitive, the
   operands and the user's source line when there is none). A scale the rule newly
   computed is marked `computed_once`, so that XLA computes it once rather than copying
   its arithmetic into every kernel that reads it;
2. folds the equation at trace time when every operand is static (NumPy literals and
   constants, or earlier folds), so that ``zeros_like``, ``full(-inf)`` masks and
   constant scalars keep their values for the rules that meet them later. A primitive's
   registered NumPy evaluator (`register_static_impl`) computes the fold; others run
   eagerly through XLA;
3. otherwise binds the primitive unchanged: plain arrays stay plain, except floats
   narrower than float32 made from booleans alone (indicators), which come out as
   ScaledArrays at scale 1 (`_indicators`).

A rule may return a `Deferred` value (`scalify.core.deferred`: a scan's output whose
scale varies per step, a float32 contraction whose division is pending, an elementwise
result not rounded to its narrow dtype yet) that only rules registered
``takes_deferred`` for its kind read as it is; the interpreter materialises it as a
ScaledArray for any other rule, for observers and at the end of every jaxpr. It knows
no kind by name: it reads them through the base class's protocol.

Observers (`observe`, `observing`) and the trace's other state are per thread, like the
`ScalifyConfig` stack: two threads tracing at once never see each other's.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable, Iterator, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from scalify import _jax_compat
from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray, is_float_dtype, is_scaled_leaf
from scalify.core.deferred import Deferred, materialise
from scalify.core.operands import (
    as_jax, computed_once, in_scale, is_scale_free, one, pow2_scope, promote, static_scale,
    static_uniform_value,
)
from scalify.core.pow2 import is_static
from scalify.core.trace_state import exact_of, register_exact
from scalify.core.registry import (
    UnsupportedPrimitiveError,
    argument_checks,
    deferred_kinds,
    get_scaled_rule,
    get_static_impl,
    is_always_scaled,
)
from scalify.core import walker
from scalify.core.walker import bind, sub_jaxprs

# Folding materialises an equation's result on the host at trace time: above this many
# elements it is skipped (the equation is bound as usual) unless its operands are all
# scalars broadcast (then the result is checked for uniformity and kept as a view).
_FOLD_MAX_SIZE = 1 << 22


def _describe(x: Any) -> str:
    if isinstance(x, ScaledArray):
        return f"ScaledArray({x.dtype}{list(x.shape)})"
    if hasattr(x, "dtype"):
        kind = "static" if is_static(x) else "array"
        return f"{kind}({np.dtype(x.dtype)}{list(np.shape(x))})"
    return type(x).__name__


def _unsupported(eqn: Any, invals: Sequence[Any]) -> UnsupportedPrimitiveError:
    operands = ", ".join(_describe(x) for x in invals)
    return UnsupportedPrimitiveError(
        f"scalify has no scaled rule for primitive '{eqn.primitive.name}' "
        f"(operands: {operands}), at {_jax_compat.source_line(eqn)}. "
        "Convert the operand with `scalify.asarray` before this operation, or register a "
        "rule with `scalify.core.register_scaled_op`."
    )


def _is_foldable(eqn: Any, invals: Sequence[Any]) -> bool:
    if eqn.effects or not all(is_static(x) for x in invals):
        return False
    for v in eqn.outvars:
        aval = v.aval
        if not isinstance(getattr(aval, "dtype", None), np.dtype):
            return False  # tokens, PRNG keys and other extended dtypes
        if int(np.prod(aval.shape, dtype=np.int64)) > _FOLD_MAX_SIZE:
            return False
    return True


def _to_static(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.size > 1:
        first = a.reshape(-1)[0]
        if np.all(a == first):
            # Keep a uniform result as a zero-copy broadcast view: cheap to hold, and
            # recognised as uniform by the rules without another pass.
            return np.broadcast_to(first, a.shape)
    return a


def _fold_in_numpy(eqn: Any, invals: Sequence[Any]) -> Any:
    """The equation's results from its registered NumPy evaluator (cast to the jaxpr's
    dtypes), or None when it has none or declines."""
    impl = get_static_impl(eqn.primitive)
    if impl is None:
        return None
    with np.errstate(all="ignore"):  # inf/NaN results (and casts to inf) are values, as in XLA
        outs = impl(*invals, **eqn.params)
        if outs is NotImplemented:
            return None
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        result = []
        for o, v in zip(outs, eqn.outvars):
            if not is_static(o):
                return None
            o = np.asarray(o)
            if o.shape != tuple(v.aval.shape):
                return None
            folded = _to_static(o.astype(v.aval.dtype, copy=False))
            if _lost_in_cast(o, folded):
                register_exact(folded, o)
            result.append(folded)
    return result


def _lost_in_cast(exact: np.ndarray, cast: np.ndarray) -> bool:
    """True when casting the finite float ``exact`` to ``cast``'s narrower float dtype
    flushed a non-zero element below the normal range (to 0 or a subnormal): the value a
    float32 program would compute is then recorded beside the fold (`register_exact`),
    for scaled rules to read at its own scale.

    Overflow to infinity is left as JAX computes it: a constant that overflows is a
    mask fill (``-1e9`` cast to float16 is ``-inf``), which a selection must keep as an
    infinity (read at its own scale, it would set the scale of the selection and flush
    the values it is not selected against)."""
    if not (is_float_dtype(exact.dtype) and is_float_dtype(cast.dtype)
            and exact.dtype.itemsize > cast.dtype.itemsize) or not np.all(np.isfinite(exact)):
        return False
    c = np.abs(cast.astype(exact.dtype))
    return bool(np.any((exact != 0) & (c < np.finfo(cast.dtype).tiny)))


def _exact_operand(x: Any) -> Any:
    """A static operand as a scaled rule reads it: a fold that its dtype could not hold
    (`_lost_in_cast`) as a ScaledArray of its recorded value at its own power-of-two
    scale, in the same dtype; any other operand unchanged.

    Why only for scaled rules: a plain computation reading the fold stays plain and
    computes what JAX does (docs/design.md, contract item 6); a scaled one can carry the
    value, as it carries every other magnitude outside the narrow format's range."""
    if not isinstance(x, np.ndarray):
        return x
    exact = exact_of(x)
    if exact is None:
        return x
    s = static_scale(exact)
    return ScaledArray(as_jax(in_scale(exact, s, x.dtype)), s)


# `_SCALES_INSIDE` and `_READERS` cache facts about a jaxpr (which primitives it holds,
# which kinds its equations read): they depend on the jaxpr and the registry only, not
# on the trace, so every thread shares them (a race computes the same value twice).
_SCALES_INSIDE: "weakref.WeakKeyDictionary[Jaxpr, bool]" = weakref.WeakKeyDictionary()


def _scales_inside(jaxpr: Jaxpr) -> bool:
    """True when ``jaxpr`` (or a sub-jaxpr, at any depth) holds an always-scaled
    primitive: then an equation holding it needs its rule even on plain operands."""
    known = _SCALES_INSIDE.get(jaxpr)
    if known is None:
        known = any(
            is_always_scaled(e.primitive) or any(_scales_inside(j) for j in sub_jaxprs(e.params))
            for e in jaxpr.eqns
        )
        _SCALES_INSIDE[jaxpr] = known
    return known


def _needs_rule(eqn: Any, invals: Sequence[Any]) -> bool:
    return (
        any(isinstance(x, (ScaledArray, Deferred)) for x in invals)
        or is_always_scaled(eqn.primitive)
        or (get_scaled_rule(eqn.primitive) is not None
            and any(_scales_inside(j) for j in sub_jaxprs(eqn.params)))
    )


def _constant_scales(eqn: Any, invals: Sequence[Any]) -> Sequence[Any]:
    """Static float constants that carry the only float magnitude into a traced
    equation, as ScaledArrays at their own power-of-two scale.

    The case that matters is autodiff's seed: ``mean``'s cotangent is a constant
    ``1/N`` broadcast, scattered into a one-hot by integer labels (the backward of
    ``take_along_axis`` in every cross-entropy). Bound plainly, that one-hot would come
    out at scale 1 with data ``1/N``, and every gradient downstream would inherit data
    ``N`` times below unit size: float16 gradients then lose their small elements to
    subnormals. Promoted, the one-hot comes out with unit data at scale ``pow2(1/N)``.

    Only broadcast constants (more than one element; scalar literals such as the ``0``
    of ``max(x, 0)`` stay literals), finite and non-zero (0 and inf are scale-free),
    and only when no traced float operand is present: a plain float operand means a
    plain computation, which stays plain (docs/design.md, contract item 6).
    """
    if get_scaled_rule(eqn.primitive) is None:
        return invals
    candidates = []
    for i, x in enumerate(invals):
        if not is_static(x):
            if is_float_dtype(x.dtype):
                return invals  # a plain float computation
            continue
        if np.size(x) > 1 and is_float_dtype(np.asarray(x).dtype) and not is_scale_free(x):
            if static_uniform_value(x) is not None:
                candidates.append(i)
    if not candidates:
        return invals
    out = list(invals)
    for i in candidates:
        out[i] = promote(invals[i])  # data c / pow2(|c|), scale pow2(|c|)
        out[i] = ScaledArray(as_jax(out[i].data), out[i].scale)
    return out


def _scales_of(x: Any) -> Iterator[Any]:
    """The scales an operand carries: a ScaledArray's; a `Deferred`'s own one and, once
    materialised, its ScaledArray's."""
    if isinstance(x, ScaledArray):
        yield x.scale
    elif isinstance(x, Deferred):
        yield x.scale
        if x.materialised is not None:
            yield x.materialised.scale


def _scale_computed_once(out: Any, invals: Sequence[Any]) -> Any:
    """A rule's output (a ScaledArray, or a `Deferred` with one scale) with a newly
    computed traced scale marked `computed_once` (an input's scale passed through
    unchanged stays as it is)."""
    scale = out.scale if isinstance(out, (ScaledArray, Deferred)) else None
    if scale is None or is_static(scale) or not get_config().scales_computed_once:
        return out
    if any(s is scale for x in invals for s in _scales_of(x)):
        return out
    if isinstance(out, Deferred):
        return out.replace_scale(computed_once(scale))
    return ScaledArray(out.data, computed_once(scale))


def eval_equation(eqn: Any, invals: Sequence[Any]) -> List[Any]:
    """Evaluate one jaxpr equation on ScaledArray / plain / static operands (and
    `Deferred` ones for a rule registered ``takes_deferred``)."""
    needs_rule = _needs_rule(eqn, invals)
    foldable = not needs_rule and _is_foldable(eqn, invals)
    if not needs_rule and not foldable:
        promoted = _constant_scales(eqn, invals)
        needs_rule = promoted is not invals  # a promoted constant is a ScaledArray
        invals = promoted
    if needs_rule:
        rule = get_scaled_rule(eqn.primitive)
        if rule is None:
            raise _unsupported(eqn, invals)
        invals = [_exact_operand(x) for x in invals]
        try:
            out = rule(*invals, **eqn.params)
        except UnsupportedPrimitiveError:
            raise
        except Exception as e:  # name the primitive and line of a failing rule
            e.add_note(
                f"(in scalify's rule for '{eqn.primitive.name}' at {_jax_compat.source_line(eqn)})"
            )
            raise
        outs = list(out) if eqn.primitive.multiple_results else [out]
        if next(sub_jaxprs(eqn.params), None) is not None:
            return outs  # control flow, calls: their bodies' rules marked the scales
        return [_scale_computed_once(o, invals) for o in outs]
    # Operand-free equations (``iota``) fold only through a NumPy evaluator, which
    # decides how large a constant it is worth embedding.
    if foldable and (invals or get_static_impl(eqn.primitive)):
        folded = _fold_in_numpy(eqn, invals)
        if folded is not None:
            return folded
        if not invals:
            return bind(eqn, invals)
        try:
            with jax.ensure_compile_time_eval():
                outs = bind(eqn, invals)
            return [_to_static(o) for o in outs]
        except Exception:
            # Some primitives cannot run outside their trace context (collectives such
            # as `pvary` of a literal need the enclosing shard_map): bind them as usual.
            pass
    outs = bind(eqn, [as_jax(x) if isinstance(x, np.ndarray) else x for x in invals])
    return _indicators(invals, outs)


def _is_bool(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)  # PRNG keys' extended dtypes are not NumPy's
    return isinstance(dtype, np.dtype) and dtype == np.bool_


def _indicators(invals: Sequence[Any], outs: Sequence[Any]) -> Sequence[Any]:
    """Floats narrower than float32 made from booleans alone (``mask.astype(x.dtype)``,
    the location indicators of ``max``'s derivative) as ScaledArrays at scale 1.

    Why: scalify traces the user's program at the data dtype, so an indicator that was
    float32 in the program as written comes out float16 or float8, and a plain sum of
    it runs in that format: 26 tied maxima count 16 in float8 E4M3 (its integers stop
    at 16), and the derivative of ``max`` comes out 1.6 times too large. Its data are
    0 and 1 exactly; held scaled, the reductions and divisions reading it are the
    scaled rules, which compute in float32."""
    if not invals or not all(_is_bool(x) for x in invals):
        return outs
    return [
        ScaledArray(o, one()) if is_float_dtype(o.dtype) and np.dtype(o.dtype).itemsize < 4 else o
        for o in outs
    ]


# This thread's callables ``observer(eqn, invals, outvals)``, run after every
# interpreted equation at trace time (telemetry uses this to tap scales and
# statistics); see `observe`. Per thread, as the config stack: an observer entered in
# one thread never taps (nor slows) a trace running in another.
_local = threading.local()


def _observers() -> List[Callable[[Any, Sequence[Any], Sequence[Any]], None]]:
    if not hasattr(_local, "observers"):
        _local.observers = []
    return _local.observers


class observe:
    """Context manager: call ``observer(eqn, invals, outvals)`` after each equation that
    scalify interprets (sub-jaxprs of control flow included) while this thread traces.
    Operands and results are ScaledArrays or plain values: a `Deferred` one is
    materialised for the observer (so that, while one observes, the traced program
    computes it)."""

    def __init__(self, observer: Callable[[Any, Sequence[Any], Sequence[Any]], None]):
        self.observer = observer

    def __enter__(self) -> "observe":
        _observers().append(self.observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        _observers().remove(self.observer)


def observing() -> bool:
    """True while an `observe` context is active in this thread.

    Why public: a rule that would skip interpreting equations (the nested-``jit`` rule
    reuses an inner function traced earlier, `scalify.rules.control_flow.calls`) must
    not do so while observed, since observers must see every equation of each trace."""
    return bool(_observers())


_READERS: "weakref.WeakKeyDictionary[Jaxpr, dict]" = weakref.WeakKeyDictionary()


def _readers(jaxpr: Jaxpr, keep: tuple = ()) -> dict:
    """For each variable of ``jaxpr``, the `Deferred` kinds its readers take as they are:
    one tuple per reading equation (`deferred_kinds`), ``keep`` for a jaxpr output (the
    kinds `eval_jaxpr` hands on deferred)."""
    per_keep = _READERS.setdefault(jaxpr, {})
    known = per_keep.get(keep)
    if known is None:
        known = {}
        for e in jaxpr.eqns:
            kinds = deferred_kinds(e.primitive)
            for v in e.invars:
                if not isinstance(v, Literal):
                    known.setdefault(v, []).append(kinds)
        for v in jaxpr.outvars:
            if not isinstance(v, Literal):
                known.setdefault(v, []).append(keep)
        per_keep[keep] = known
    return known


def _read_materialised(x: Deferred, readers: Sequence[tuple]) -> bool:
    """True when some reader takes the deferred value ``x`` materialised."""
    return any(not isinstance(x, kinds) for kinds in readers) if readers else False


def eval_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any, keep: tuple = ()) -> List[Any]:
    """Interpret ``jaxpr`` on ScaledArray / plain arguments with the scaled rules.

    Literals are read as static NumPy values, which fold at trace time. A `Deferred`
    result of a kind marked ``eager`` (e.g. `scalify.core.wide.Wide`) is materialised at
    once when some reader will take it materialised anyway: its other readers then share
    that ScaledArray rather than computing on from the deferred form beside it. Outputs
    are materialised, except those of the `Deferred` kinds in ``keep`` (for a call rule
    whose caller's readers take them as they are)."""
    readers = _readers(jaxpr, keep)

    def evaluate(eqn: Any, invals: List[Any]) -> List[Any]:
        if any(isinstance(x, Deferred) for x in invals):
            kinds = deferred_kinds(eqn.primitive)
            # A value that an earlier reader materialised (a rule may do so, for its
            # own operand, where only its data bounds tell it to) is read materialised
            # by every later one too: all readers see the same value, so that
            # ``v + v * t`` with ``t = -1`` cancels exactly, as in the plain program. A
            # kind that is not ``eager`` keeps its deferred readers on the deferred form
            # (its rules see to the agreement: see `scalify.core.wide.Wide`'s spread).
            invals = [x if isinstance(x, kinds) and (x.materialised is None or not x.eager) else materialise(x)
                      for x in invals]
        outs = eval_equation(eqn, invals)
        observers = _observers()
        if observers:  # observers see ScaledArrays, as users do
            seen_in, seen_out = [materialise(x) for x in invals], [materialise(o) for o in outs]
            for obs in observers:
                obs(eqn, seen_in, seen_out)
        return [
            o.materialise() if isinstance(o, Deferred) and o.eager and _read_materialised(o, readers.get(v, ())) else o
            for v, o in zip(eqn.outvars, outs)
        ]

    outs = walker.eval_jaxpr(jaxpr, consts, args, evaluate, static_literals=True)
    return [o if isinstance(o, keep) and (o.materialised is None or not o.eager) else materialise(o)
            for o in outs]


def eval_closed_jaxpr(closed: ClosedJaxpr, *args: Any, keep: tuple = ()) -> List[Any]:
    """`eval_jaxpr` for a ClosedJaxpr (its consts included)."""
    return eval_jaxpr(closed.jaxpr, closed.consts, *args, keep=keep)


def _check_scaled_leaf(x: ScaledArray) -> ScaledArray:
    """``x`` validated; a one-element scale of another shape is reshaped to a scalar.

    Why the reshape: optax's ``init`` maps over a ScaledArray's children like any pytree,
    so a factored state (Adafactor's row/column statistics) of a scalar child has shape
    ``(1,)``: ``ScaledArray(zeros, zeros((1,)))``, a zero tensor whose scale only has a
    spurious axis."""
    s = x.scale
    if not hasattr(s, "dtype") or not is_float_dtype(s.dtype):
        raise TypeError(f"scalify: ScaledArray scale must be a floating scalar array, got {s!r}.")
    if np.shape(s) != ():
        if int(np.prod(np.shape(s), dtype=np.int64)) != 1:
            raise TypeError(
                f"scalify: ScaledArray scale must be a scalar array, got shape {np.shape(s)}."
            )
        s = s.reshape(())
    if not hasattr(x.data, "dtype") or not jnp.issubdtype(x.data.dtype, jnp.floating):
        raise TypeError(f"scalify: ScaledArray data must be a floating array, got {x.data!r}.")
    if isinstance(s, (np.ndarray, np.generic)) or (
        isinstance(s, jax.Array) and not _jax_compat.is_tracer(s)
    ):
        v = np.asarray(s)
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"scalify: ScaledArray scale must be finite and >= 0, got {v}.")
    return x if s is x.scale else type(x)(x.data, s)


def _finalise(x: Any) -> Any:
    """Outputs are JAX values: static results and scales become JAX arrays."""
    if isinstance(x, ScaledArray):  # its kind kept (a subclass marks, e.g., stored state)
        return type(x)(jnp.asarray(x.data), jnp.asarray(x.scale))
    if is_static(x):
        return jnp.asarray(x)
    return x


def scalify(fun: Callable) -> Callable:
    """Transform ``fun`` to propagate scales through every primitive.

    The returned function takes the same arguments as ``fun``, where any float array may
    be a `ScaledArray`. It traces ``fun`` with the ScaledArrays' data shapes and dtypes to
    a jaxpr and interprets each equation with its scaled rule; plain arrays stay plain
    unless combined with scaled ones. Python numbers and other leaves that are not arrays
    are static, closed over by the trace (`scalify.core.walker.is_traced_leaf` says
    why). Composes with `jax.jit` (outside or inside ``fun``),
    `jax.grad` (outside or inside), `jax.vmap` and `jax.lax` control flow.
    """

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_scaled_leaf)
        leaves = [_check_scaled_leaf(x) if isinstance(x, ScaledArray) else x for x in leaves]
        for check in argument_checks():
            check(args, kwargs)
        traced = walker.trace(fun, leaves, treedef)
        with pow2_scope():
            outs = eval_closed_jaxpr(traced.jaxpr, *traced.args)
        return traced.rebuild([_finalise(o) for o in outs])

    return wrapped
