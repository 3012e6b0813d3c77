"""Scaled rules of call primitives: nested ``jit``, ``closed_call``/``call``, ``remat``
(``jax.checkpoint``) and ``checkpoint_name``.

A call's body is interpreted with the scaled rules. Plain function calls are inlined;
a nested ``jit`` is re-wrapped in ``jax.jit`` so that its name, donation, shardings and
compiler options survive (a ScaledArray's data takes its operand's donation and
sharding; its scalar scale is never donated and is replicated), and ``remat`` is bound
again on the scalified body so that its saving policy applies to the scalified
computation.

The re-wrapped ``jit`` is cached (`_JIT_CACHE`), keyed by the inner jaxpr, the
operands' kinds and static leaves, and the call's parameters: eager calls of a scalified
function then reuse the compiled inner function instead of compiling it at every call.

An elementwise chain's float32 result (`scalify.core.wide.Wide`) crosses a nested
``jit``, a ``closed_call`` or a ``call`` unrounded, both ways: into the body (a ``jnp.where`` or ``jnp.clip`` reads it
as the next elementwise rule would) and out of it (a body that ends in an elementwise
rule hands its float32 result on). A nested ``jit`` passes it as its float32 data and
scale, its static description (`_wide_meta`) closed over. So such a call, which only
names a piece of the program, rounds nothing that the same program without it would
not. (``remat`` still rounds its operands and results: its saving policy decides what
is stored, in the data format.)
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, List, Sequence, Tuple

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.extend.core import primitives as P

from scalify import _jax_compat
from scalify.core import interpreter
from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray
from scalify.core.interpreter import eval_closed_jaxpr, eval_jaxpr
from scalify.core.operands import as_jax
from scalify.core.pow2 import is_static
from scalify.core.registry import register_scaled_op
from scalify.core.wide import Wide
from scalify.rules.control_flow.leaves import Split, mk

# Nested `jit`s re-wrapped in `jax.jit`, keyed by jaxpr, operand kinds and parameters,
# so that eager calls of a scalified function reuse the compiled inner function (the
# jaxpr of a `jax.jit`-decorated function is cached by JAX, hence the same object).
_JIT_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_JIT_CACHE_SIZE = 256
# The cache is shared by every thread (its entries depend only on their key, the config
# included), so its least-recently-used bookkeeping is done under a lock.
_JIT_CACHE_LOCK = threading.Lock()


def _cached(key: Any) -> Any:
    """The cached entry of ``key`` (None: no key, or not cached), marked recently used."""
    if key is None:
        return None
    with _JIT_CACHE_LOCK:
        entry = _JIT_CACHE.get(key)
        if entry is not None:
            _JIT_CACHE.move_to_end(key)
        return entry


def _cache(key: Any, entry: Any) -> None:
    """Cache ``entry`` under ``key``, evicting the least recently used beyond the size."""
    with _JIT_CACHE_LOCK:
        _JIT_CACHE[key] = entry
        while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
            _JIT_CACHE.popitem(last=False)


def _replicated(sharding: Any) -> Any:
    """The sharding of a scale next to data sharded as ``sharding``: replicated."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


_KEEP = (Wide,)  # the deferred kind that crosses call boundaries


def _wide_meta(x: Any) -> Any:
    """The static description of a `Wide` value that can cross a ``jit`` boundary as
    its float32 data and scale (None for any other value, and for a selection of max/min,
    whose registered operands are tracers of the caller's trace)."""
    if not isinstance(x, Wide) or x.selection is not None:
        return None
    return (x.dtype, x.guard, x.hi, x.lo, x.band, x.spread, x.top)


def _crossing(x: Any, meta: Any) -> Any:
    """``x`` as it crosses a ``jit`` boundary: a `Wide` value that ``meta`` describes as
    its float32 data and scale, any other `Wide` value materialised, the rest as is."""
    if meta is not None:
        return mk(x.data, x.scale)
    return x.materialise() if isinstance(x, Wide) else x


def _to_wide(x: Any, meta: Any) -> Any:
    """``x`` (a ScaledArray of float32 data) as the `Wide` value ``meta`` describes."""
    if meta is None:
        return x
    dtype, guard, hi, lo, band, spread, top = meta
    return Wide(x.data, x.scale, dtype, guard, hi, lo, band=band, spread=spread, top=top)


@register_scaled_op(P.jit_p, takes_deferred=_KEEP)
def jit(*operands: Any, jaxpr: ClosedJaxpr, name: str = "jit", inline: bool = False,
        donated_invars: Sequence[bool] = (), in_shardings: Sequence[Any] = (),
        out_shardings: Sequence[Any] = (), keep_unused: bool = False,
        compiler_options_kvs: Sequence[Any] = (), **params: Any) -> List[Any]:
    """A nested ``jit``: the scalified inner function re-wrapped in ``jax.jit`` with the
    same name, donation (of the data of donated ScaledArrays, never of their scalar
    scales), in/out shardings (scales replicated) and compiler options; ``inline=True``
    is inlined. Layout parameters are not carried over.

    A plain ``jit`` (no donation, shardings or compiler options: ``jnp.where``,
    ``jax.nn.gelu``, most user jits inside a step) passes `Wide` operands and results
    through unrounded (see the module's docstring). One with any of them rounds them:
    there the boundary is a real one, whose buffers are donated or laid out as asked, in
    the data format."""
    if inline:
        return eval_closed_jaxpr(jaxpr, *operands, keep=_KEEP)
    n = len(operands)
    donated = tuple(donated_invars) or (False,) * n
    ins = tuple(in_shardings) or (None,) * n
    outs_sh = tuple(out_shardings)
    plain = not (any(donated) or compiler_options_kvs
                 or any(not _jax_compat.is_unspecified(s) for s in (*ins, *outs_sh)))
    in_meta = tuple(_wide_meta(x) if plain else None for x in operands)
    split = Split([_crossing(x, m) for x, m in zip(operands, in_meta)])
    cfg = get_config()
    skey = split.key()
    key = None
    # Observers (telemetry) must see the inner equations at each trace: no cache then.
    if skey is not None and not interpreter.observing():
        options = tuple(compiler_options_kvs)
        # The leaves' types too: `inner` is traced once per type signature, and the
        # description of its `Wide` results (out_meta) must be that of this one.
        types = tuple(jax.typeof(x) for x in split.leaves)
        key = (jaxpr, skey, in_meta, types, donated, ins, outs_sh, name, keep_unused, options, cfg)
        try:
            hash(key)
        except TypeError:
            key = None
    entry = _cached(key)
    if entry is None:
        entry = _make_jit(
            jaxpr, split, in_meta, plain, name, donated, ins, outs_sh, keep_unused, compiler_options_kvs
        )
        if key is not None:
            _cache(key, entry)
    fn, out_tree, out_meta = entry
    out = fn(*split.leaves)
    out = list(out) if out_tree is None else jax.tree.unflatten(out_tree, out)
    return [_to_wide(x, m) for x, m in zip(out, out_meta)]


def _make_jit(jaxpr: ClosedJaxpr, split: Split, in_meta: Sequence[Any], plain: bool, name: str,
              donated: Sequence[bool],
              ins: Sequence[Any], outs_sh: Sequence[Any], keep_unused: bool,
              compiler_options_kvs: Sequence[Any]) -> Tuple[Callable[..., Any], Any, List[Any]]:
    template = Split.__new__(Split)  # keep no reference to this call's tracers
    template.template, template.scaled, template.owner = split.template, split.scaled, split.owner
    # The static description of each `Wide` result, written when `inner` is traced
    # (the same at every trace: it depends on the key's jaxpr, operand kinds and config).
    out_meta: List[Any] = [None] * len(jaxpr.out_avals)

    def inner(*leaves: Any) -> List[Any]:
        ops = [_to_wide(x, m) for x, m in zip(template.rebuild(leaves), in_meta)]
        outs = eval_closed_jaxpr(jaxpr, *ops, keep=_KEEP if plain else ())
        out_meta[:] = [_wide_meta(o) for o in outs]
        return [_crossing(o, m) for o, m in zip(outs, out_meta)]

    inner.__name__ = inner.__qualname__ = name
    kw: dict = {"keep_unused": keep_unused}
    if compiler_options_kvs:
        kw["compiler_options"] = dict(compiler_options_kvs)
    donate = [k for k, (i, f) in enumerate(split.owner) if donated[i] and f != "scale"]
    if donate:
        kw["donate_argnums"] = tuple(donate)
    if any(not _jax_compat.is_unspecified(s) for s in ins):
        kw["in_shardings"] = tuple(
            (_replicated(ins[i]) if f == "scale" else ins[i]) for i, f in split.owner
        )
    out_tree = None
    if any(not _jax_compat.is_unspecified(s) for s in outs_sh):
        shapes = jax.eval_shape(inner, *split.leaves)
        flat_sh = []
        for s, sh in zip(shapes, outs_sh):
            flat_sh += [sh, _replicated(sh)] if isinstance(s, ScaledArray) else [sh]
        out_tree = jax.tree.structure(shapes)
        kw["out_shardings"] = tuple(flat_sh)

        def flat_inner(*leaves: Any) -> Tuple[Any, ...]:
            return tuple(jax.tree.leaves(inner(*leaves)))

        flat_inner.__name__ = flat_inner.__qualname__ = name
        return jax.jit(flat_inner, **kw), out_tree, out_meta
    return jax.jit(inner, **kw), None, out_meta


def _call_jaxpr(call_jaxpr: Any, operands: Sequence[Any]) -> List[Any]:
    if isinstance(call_jaxpr, ClosedJaxpr):
        return eval_closed_jaxpr(call_jaxpr, *operands, keep=_KEEP)
    return eval_jaxpr(call_jaxpr, (), *operands, keep=_KEEP)


@register_scaled_op(P.closed_call_p, takes_deferred=_KEEP)
def closed_call(*operands: Any, call_jaxpr: Any, **params: Any) -> List[Any]:
    """A closed call is a function call: its scalified body is inlined (`Wide` values
    cross it unrounded)."""
    return _call_jaxpr(call_jaxpr, operands)


@register_scaled_op(P.call_p, takes_deferred=_KEEP)
def core_call(*operands: Any, call_jaxpr: Any, **params: Any) -> List[Any]:
    """A core call is a function call: its scalified body is inlined (`Wide` values
    cross it unrounded)."""
    return _call_jaxpr(call_jaxpr, operands)


@register_scaled_op(P.remat_p)
def remat(*operands: Any, jaxpr: Jaxpr, prevent_cse: Any = True, differentiated: bool = False,
          policy: Any = None, **params: Any) -> List[Any]:
    """``jax.checkpoint``: the scalified body traced to a jaxpr and bound to ``remat``
    again with the same ``policy``, ``prevent_cse`` (per argument when a tuple: a
    ScaledArray's data and scale take its entry) and ``differentiated`` flag, so
    rematerialisation and saving policies apply to the scalified computation.

    Binding the primitive rather than calling ``jax.checkpoint`` keeps what that public
    function cannot express: per-argument ``prevent_cse`` and ``differentiated=True``
    (set by `jax.grad` on the backward pass, where it places XLA's optimization barrier
    that stops the recomputation being merged with the forward pass)."""
    split = Split(operands)

    def inner(*leaves: Any) -> List[Any]:
        return eval_jaxpr(jaxpr, (), *split.rebuild(leaves))

    closed, shapes = jax.make_jaxpr(inner, return_shape=True)(*split.leaves)
    j = closed.jaxpr
    dbg = j.debug_info
    if dbg is not None and dbg.arg_names is not None:  # consts become leading arguments
        dbg = dbg._replace(arg_names=("",) * len(j.constvars) + tuple(dbg.arg_names))
    body = Jaxpr((), [*j.constvars, *j.invars], j.outvars, j.eqns, j.effects, dbg)
    if not isinstance(prevent_cse, bool):
        prevent_cse = (False,) * len(closed.consts) + tuple(prevent_cse[i] for i, _ in split.owner)
    out = P.remat_p.bind(*closed.consts, *split.leaves, jaxpr=body, prevent_cse=prevent_cse,
                         differentiated=differentiated, policy=policy, **params)
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


@register_scaled_op(P.name_p)
def checkpoint_name(x: Any, **params: Any) -> Any:
    """``checkpoint_name``: names data and (traced) scale alike, so a checkpoint policy
    saving that name keeps both."""
    if not isinstance(x, ScaledArray):
        return P.name_p.bind(as_jax(x), **params)
    scale = x.scale if is_static(x.scale) else P.name_p.bind(x.scale, **params)
    return ScaledArray(P.name_p.bind(as_jax(x.data), **params), scale)

