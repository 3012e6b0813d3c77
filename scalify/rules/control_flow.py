"""Scaled rules of control-flow and call primitives.

These rules interpret a primitive's sub-jaxpr(s) with the scaled rules and rebuild the
same control flow around the result with public JAX API (``jax.jit``, ``lax.scan``,
``lax.while_loop``, ``lax.switch``, ``jax.custom_vjp``/``custom_jvp``) or by binding the
primitive again on the scalified jaxpr (``remat``). A ScaledArray crosses a JAX
transform as its two leaves, ``data`` and ``scale``:

- Leaves known at trace time (NumPy values: static scales, folded constants) are closed
  over rather than passed as arguments, so they stay static inside the sub-jaxpr.
- **Loops carry both data and scale.** A carried ScaledArray is loop state
  ``(data, scale)`` with a traced scale (a static scale at entry becomes a traced value
  of the same dtype, as the carry's type must not change). Which carries are scaled is
  a fixpoint: a plain carry that the body turns into a ScaledArray is promoted at loop
  entry (at scale 1, or at the smallest normal scale for initial zeros, see `_as_kind`)
  and the body is traced again; a body returning a plain value for a scaled carry has
  it promoted at the end of the body. We carry the scale rather than
  rescale to a loop-invariant scale at the boundary because a body that multiplies its
  carry by 2 (or 0.5) on each step then moves only the scale, exactly: the data never
  drifts out of its narrow format, however many steps run (within the float32 range of
  the scale). Rescaling to a fixed scale would push the drift into the data.
- Stacked scan outputs (``ys``) keep a scale fixed at trace time. A scale that varies
  per step is stacked beside the data: a later scan reads such ``ys`` as ``xs`` step by
  step, each at its own scale (exact, and no pass over the stack: in a training step the
  backward scan reads the forward scan's residuals this way), while every other rule
  gets one array aligned to the largest per-step scale, like ``concatenate`` (much
  smaller steps may lose low bits). See `PerStepScaled`.
- ``cond``/``switch`` branches must agree on which outputs are scaled: the union is used
  (plain results of the other branches are promoted). A static branch index selects the
  branch at trace time.

Custom derivatives (DESIGN.md section 7): when `jax.grad` runs *inside* ``scalify`` the
jaxpr already contains the user's rule, so these primitives mostly appear when
``scalify(f)`` is itself differentiated (or not differentiated at all). Both rules then
rebuild a ``jax.custom_vjp``/``jax.custom_jvp`` whose primal is the scalified
``call_jaxpr`` and whose rule is the user's rule interpreted under scalify, mapping
between JAX's cotangents/tangents of the leaves ``(data, scale)`` and the cotangents /
tangents of the *value* ``data * scale`` that the user's rule speaks of.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.extend.core import primitives as P

from scalify import _jax_compat
from scalify.core import interpreter
from scalify.core.config import get_config
from scalify.core.datatype import ScaledArray, is_float_dtype
from scalify.core.interpreter import eval_closed_jaxpr, eval_jaxpr, scalify
from scalify.core.operands import as_jax, cast, compute_dtype, is_scale_free, promote, scale_dtype
from scalify.core.pow2 import is_static
from scalify.core.registry import Deferred, register_scaled_op

# --- ScaledArrays as leaves ----------------------------------------------------------

_SCALED_TREEDEF = jax.tree.structure(ScaledArray(np.zeros((), np.float32), np.float32(1)))


def _mk(data: Any, scale: Any) -> ScaledArray:
    """A ScaledArray from leaves, unchecked (tracers, cotangents, negative ct scales)."""
    return jax.tree.unflatten(_SCALED_TREEDEF, [data, scale])


def _is_float(x: Any) -> bool:
    return isinstance(x, ScaledArray) or is_float_dtype(getattr(x, "dtype", np.dtype(type(x))))


def _sdtype(x: Any) -> Optional[np.dtype]:
    """The *kind* of a value: its scale dtype if it is a ScaledArray, else None."""
    if isinstance(x, ScaledArray):
        return np.dtype(getattr(x.scale, "dtype", scale_dtype()))
    return None


def _as_kind(x: Any, sdtype: Optional[np.dtype]) -> Any:
    """``x`` as a JAX value of a given kind: a ScaledArray whose scale is a JAX array of
    dtype ``sdtype``, or (``sdtype=None``) a plain array of the same value.

    A scale-free constant (0, +-inf, NaN: an accumulator's initial zeros, JAX's zero
    cotangents) promoted to a traced ScaledArray takes the smallest normal scale, the
    nearest to "no scale": ``acc + x`` then gets ``x``'s scale (``hypot(tiny, sx) = sx``)
    instead of being pulled towards 1, which would underflow a tiny ``x``."""
    if sdtype is None:
        return x.to_array() if isinstance(x, ScaledArray) else as_jax(x)
    if not isinstance(x, ScaledArray) and is_scale_free(x):
        return _mk(as_jax(x), jnp.asarray(jnp.finfo(sdtype).tiny, sdtype))
    x = promote(x)
    return _mk(as_jax(x.data), jnp.asarray(x.scale, sdtype))


def _dynamic(x: Any) -> Any:
    """``x`` with every static leaf turned into a JAX array."""
    if isinstance(x, ScaledArray):
        return _mk(as_jax(x.data), jnp.asarray(x.scale))
    return as_jax(x)


def _times(x: Any, factor: Any, dtype: Any) -> Any:
    """The value of ``x`` (ScaledArray or plain) times a scalar ``factor``, as ``dtype``;
    computed in float32 (or wider) and rounded once."""
    cd = compute_dtype(dtype)
    if isinstance(x, ScaledArray):
        data, factor = x.data, jnp.asarray(x.scale, cd) * jnp.asarray(factor, cd)
    else:
        data = x
    return (as_jax(data).astype(cd) * jnp.asarray(factor, cd)).astype(dtype)


class _Split:
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
        return [_mk(*e) if s else e[0] for e, s in zip(entries, self.scaled)]

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


# --- loops: a fixpoint over which carries are scaled ---------------------------------


class _Retrace(Exception):
    """Raised while tracing a loop body or branch whose outputs need more ScaledArray
    carries than assumed; the rule traces again with ``kinds``."""

    def __init__(self, owner: object, kinds: List[Optional[np.dtype]]):
        super().__init__("scalify: retrace with promoted carries")
        self.owner = owner
        self.kinds = kinds


def _fixpoint(attempt: Callable[..., Any], kinds: List[Optional[np.dtype]]) -> Any:
    owner = object()
    for _ in range(len(kinds) + 2):  # kinds only grow: at most one retrace per entry
        try:
            return attempt(list(kinds), owner)
        except _Retrace as r:
            if r.owner is not owner:
                raise
            kinds = r.kinds
    raise AssertionError("scalify: loop carry kinds did not converge")  # pragma: no cover


def _merge_kinds(kinds: List[Optional[np.dtype]], outs: Sequence[Any]) -> List[Optional[np.dtype]]:
    return [k if k is not None else _sdtype(o) for k, o in zip(kinds, outs)]


def _carry_out(outs: Sequence[Any], kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
    """Body outputs as the carry kinds; retrace if a plain carry came out scaled."""
    new = _merge_kinds(kinds, outs)
    if new != kinds:
        raise _Retrace(owner, new)
    return [_as_kind(o, k) for o, k in zip(outs, kinds)]


class PerStepScaled(Deferred):
    """A scan's stacked output whose scale varies per step: ``data`` (steps on axis 0)
    and ``scales`` (one per step). As a ScaledArray, every step is aligned to the largest
    per-step scale (exact when they are all equal; much smaller steps may lose low bits,
    as in ``concatenate``)."""

    def __init__(self, data: Any, scales: Any):
        self.data, self.scales = data, scales

    def _materialise(self) -> ScaledArray:
        data, scales = self.data, self.scales
        if scales.shape[0] == 0:
            return _mk(data, np.ones((), scales.dtype))
        top = lax.reduce_max(scales, (0,))
        cd = compute_dtype(data.dtype)
        ratio = lax.broadcast_in_dim(cast(lax.div(scales, top), cd), data.shape, (0,))
        return _mk(cast(lax.mul(cast(data, cd), ratio), data.dtype), top)


@register_scaled_op(P.scan_p, takes_deferred=(PerStepScaled,))
def scan(*operands: Any, jaxpr: ClosedJaxpr, num_consts: int, num_carry: int, length: int,
         reverse: bool = False, unroll: Any = 1, **params: Any) -> List[Any]:
    """``lax.scan`` of the scalified body, carrying ``(data, scale)`` of scaled carries.

    Consts are closed over (static scales stay static in the body); a scaled ``xs`` is
    sliced on its data while its scale, shared by all steps, is closed over (a
    `PerStepScaled` ``xs`` has its scales sliced beside its data instead). Scaled
    ``ys`` keep a scale fixed at trace time, or come out as `PerStepScaled` (data and
    one scale per step) when their scale varies per step: another scan reads them as
    ``xs`` step by step at each step's own scale, and any other rule gets them aligned to
    the largest per-step scale (see the module docstring). In a training step this is
    what the backward scan does with the forward scan's residuals, which then need no
    alignment pass."""
    consts = [interpreter.materialise(x) for x in operands[:num_consts]]
    init = [interpreter.materialise(x) for x in operands[num_consts:num_consts + num_carry]]
    xs = [x if isinstance(x, PerStepScaled) else interpreter.materialise(x) for x in operands[num_consts + num_carry:]]
    xs_data = [as_jax(x.data if isinstance(x, (ScaledArray, PerStepScaled)) else x) for x in xs]
    xs_scale = [x.scale if isinstance(x, ScaledArray) else None for x in xs]
    per_step = [i for i, x in enumerate(xs) if isinstance(x, PerStepScaled)]
    xs_data += [xs[i].scales for i in per_step]  # sliced beside the data, step by step
    extra = {k: v for k, v in params.items() if k == "_split_transpose" and v}

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        ys_kind: List[Any] = []  # per y: None (plain), a static scale, or "stacked"

        def body(carry: List[Any], x: List[Any]) -> Tuple[List[Any], List[Any]]:
            scales = list(xs_scale)
            for i, s in zip(per_step, x[len(xs):]):
                scales[i] = s
            xv = [d if s is None else _mk(d, s) for d, s in zip(x[:len(xs)], scales)]
            outs = eval_closed_jaxpr(jaxpr, *consts, *carry, *xv)
            new_carry = _carry_out(outs[:num_carry], kinds, owner)
            ys_kind.clear()
            ys = []
            for y in outs[num_carry:]:
                if not isinstance(y, ScaledArray):
                    ys_kind.append(None)
                    ys.append(as_jax(y))
                elif is_static(y.scale):
                    ys_kind.append(y.scale)
                    ys.append(as_jax(y.data))
                else:
                    ys_kind.append("stacked")
                    ys.append((as_jax(y.data), y.scale))
            return new_carry, ys

        carry0 = [_as_kind(c, k) for c, k in zip(init, kinds)]
        carry, ys = lax.scan(body, carry0, xs_data, length=length, reverse=reverse,
                             unroll=unroll, **extra)
        return list(carry) + [_stacked(y, k) for y, k in zip(ys, ys_kind)]

    return _fixpoint(attempt, [_sdtype(c) for c in init])


def _stacked(y: Any, kind: Any) -> Any:
    """A stacked scan output: plain, at a static scale, or `PerStepScaled`."""
    if kind is None:
        return y
    if not (isinstance(kind, str) and kind == "stacked"):
        return _mk(y, kind)
    return PerStepScaled(*y)


@register_scaled_op(P.while_p)
def while_loop(*operands: Any, cond_jaxpr: ClosedJaxpr, body_jaxpr: ClosedJaxpr,
               cond_nconsts: int, body_nconsts: int, **params: Any) -> List[Any]:
    """``lax.while_loop`` of the scalified predicate and body, carrying ``(data, scale)``
    of scaled carries (a dynamic-trip ``fori_loop`` is a while loop).

    A batched predicate (``scalify(jax.vmap(f))`` of a data-dependent loop) runs while
    any element's predicate holds and keeps finished elements unchanged, as JAX's own
    lowering does; a scaled carry then shares one scale across the batch: old and new
    data are aligned to the larger of the two scales before the per-element select."""
    cconsts = operands[:cond_nconsts]
    bconsts = operands[cond_nconsts:cond_nconsts + body_nconsts]
    init = operands[cond_nconsts + body_nconsts:]
    batched = cond_jaxpr.out_avals[0].shape != ()

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        def pred_of(carry: List[Any]) -> Any:
            (pred,) = eval_closed_jaxpr(cond_jaxpr, *cconsts, *carry)
            return as_jax(pred)

        def body_fn(carry: List[Any]) -> List[Any]:
            new = _carry_out(eval_closed_jaxpr(body_jaxpr, *bconsts, *carry), kinds, owner)
            if batched:
                pred = pred_of(carry)
                new = [_select_leading(pred, n, o) for n, o in zip(new, carry)]
            return new

        cond_fn = (lambda c: jnp.any(pred_of(c))) if batched else pred_of
        carry0 = [_as_kind(c, k) for c, k in zip(init, kinds)]
        return list(lax.while_loop(cond_fn, body_fn, carry0))

    return _fixpoint(attempt, [_sdtype(c) for c in init])


def _select_leading(pred: Any, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` (over the leading axes) holds, else ``old``; ScaledArrays
    are aligned to the larger scale first."""
    shape = np.shape(new.data if isinstance(new, ScaledArray) else new)
    mask = jnp.broadcast_to(pred.reshape(pred.shape + (1,) * (len(shape) - pred.ndim)), shape)
    if not isinstance(new, ScaledArray):
        return jnp.where(mask, new, old)
    top = jnp.maximum(new.scale, old.scale)
    cd = compute_dtype(new.dtype)
    data = jnp.where(mask, _times(new, 1 / top, cd), _times(old, 1 / top, cd))
    return _mk(data.astype(new.dtype), top)


@register_scaled_op(P.cond_p)
def cond(index: Any, *operands: Any, branches: Sequence[ClosedJaxpr], **params: Any) -> List[Any]:
    """``lax.switch`` over the scalified branches (``lax.cond`` is a two-branch switch).

    A static index picks its branch at trace time. Otherwise every branch returns the
    same kinds: the first branch traced sets them, a later branch with more scaled
    outputs makes the rule trace again with the union (plain results promoted)."""
    if is_static(index):
        i = int(np.clip(np.asarray(index), 0, len(branches) - 1))
        return eval_closed_jaxpr(branches[i], *operands)

    def attempt(kinds: List[Optional[np.dtype]], owner: object) -> List[Any]:
        state = {"kinds": kinds, "set": any(k is not None for k in kinds)}

        def make(branch: ClosedJaxpr) -> Callable[[], List[Any]]:
            def fn() -> List[Any]:
                outs = eval_closed_jaxpr(branch, *operands)
                if not state["set"]:
                    state["kinds"], state["set"] = _merge_kinds(state["kinds"], outs), True
                return _carry_out(outs, state["kinds"], owner)

            return fn

        return list(lax.switch(index, [make(b) for b in branches]))

    return _fixpoint(attempt, [None] * len(branches[0].out_avals))


# --- calls ---------------------------------------------------------------------------

# Nested `jit`s re-wrapped in `jax.jit`, keyed by jaxpr, operand kinds and parameters,
# so that eager calls of a scalified function reuse the compiled inner function (the
# jaxpr of a `jax.jit`-decorated function is cached by JAX, hence the same object).
_JIT_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_JIT_CACHE_SIZE = 256


def _replicated(sharding: Any) -> Any:
    """The sharding of a scale next to data sharded as ``sharding``: replicated."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


@register_scaled_op(P.jit_p)
def jit(*operands: Any, jaxpr: ClosedJaxpr, name: str = "jit", inline: bool = False,
        donated_invars: Sequence[bool] = (), in_shardings: Sequence[Any] = (),
        out_shardings: Sequence[Any] = (), keep_unused: bool = False,
        compiler_options_kvs: Sequence[Any] = (), **params: Any) -> List[Any]:
    """A nested ``jit``: the scalified inner function re-wrapped in ``jax.jit`` with the
    same name, donation (of the data of donated ScaledArrays, never of their scalar
    scales), in/out shardings (scales replicated) and compiler options; ``inline=True``
    is inlined. Layout parameters are not carried over."""
    if inline:
        return eval_closed_jaxpr(jaxpr, *operands)
    split = _Split(operands)
    n = len(operands)
    donated = tuple(donated_invars) or (False,) * n
    ins = tuple(in_shardings) or (None,) * n
    outs_sh = tuple(out_shardings)
    cfg = get_config()
    skey = split.key()
    key = None
    # Observers (telemetry) must see the inner equations at each trace: no cache then.
    if skey is not None and not getattr(interpreter, "_OBSERVERS", None):
        options = tuple(compiler_options_kvs)
        key = (jaxpr, skey, donated, ins, outs_sh, name, keep_unused, options, cfg)
        try:
            hash(key)
        except TypeError:
            key = None
    entry = _JIT_CACHE.get(key) if key is not None else None
    if entry is None:
        entry = _make_jit(
            jaxpr, split, name, donated, ins, outs_sh, keep_unused, compiler_options_kvs
        )
        if key is not None:
            _JIT_CACHE[key] = entry
            while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
                _JIT_CACHE.popitem(last=False)
    else:
        _JIT_CACHE.move_to_end(key)
    fn, out_tree = entry
    out = fn(*split.leaves)
    return list(out) if out_tree is None else jax.tree.unflatten(out_tree, out)


def _make_jit(jaxpr: ClosedJaxpr, split: _Split, name: str, donated: Sequence[bool],
              ins: Sequence[Any], outs_sh: Sequence[Any], keep_unused: bool,
              compiler_options_kvs: Sequence[Any]) -> Tuple[Callable[..., Any], Any]:
    template = _Split.__new__(_Split)  # keep no reference to this call's tracers
    template.template, template.scaled, template.owner = split.template, split.scaled, split.owner

    def inner(*leaves: Any) -> List[Any]:
        return eval_closed_jaxpr(jaxpr, *template.rebuild(leaves))

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
        return jax.jit(flat_inner, **kw), out_tree
    return jax.jit(inner, **kw), None


def _call_jaxpr(call_jaxpr: Any, operands: Sequence[Any]) -> List[Any]:
    if isinstance(call_jaxpr, ClosedJaxpr):
        return eval_closed_jaxpr(call_jaxpr, *operands)
    return eval_jaxpr(call_jaxpr, (), *operands)


@register_scaled_op(P.closed_call_p)
def closed_call(*operands: Any, call_jaxpr: Any, **params: Any) -> List[Any]:
    """A closed call is a function call: its scalified body is inlined."""
    return _call_jaxpr(call_jaxpr, operands)


@register_scaled_op(P.call_p)
def core_call(*operands: Any, call_jaxpr: Any, **params: Any) -> List[Any]:
    """A core call is a function call: its scalified body is inlined."""
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
    split = _Split(operands)

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


# --- custom derivatives --------------------------------------------------------------


class _OutKinds:
    """Output kinds shared by a custom rule's primal and forward functions: whichever
    JAX traces first sets them, the other conforms (JAX requires identical types)."""

    def __init__(self) -> None:
        self.kinds: Optional[List[Optional[np.dtype]]] = None

    def conform(self, outs: Sequence[Any]) -> List[Any]:
        if self.kinds is None:
            self.kinds = [_sdtype(o) for o in outs]
        return [_as_kind(o, k) for o, k in zip(outs, self.kinds)]


def _value_tangent(x: Any, tdata: Any, tscale: Any) -> Any:
    """Tangent of the value ``data * scale`` from tangents of the leaves (None: zero):
    ``d(data * scale) = (tdata + data * tscale / scale) * scale``, as a ScaledArray at
    the primal's scale."""
    if not isinstance(x, ScaledArray):
        return tdata
    if tdata is None and tscale is None:
        return None
    cd = compute_dtype(x.dtype)
    t = jnp.zeros(x.shape, cd) if tdata is None else as_jax(tdata).astype(cd)
    if tscale is not None:
        t = t + as_jax(x.data).astype(cd) * (tscale / x.scale).astype(cd)
    return _mk(t.astype(x.dtype), x.scale)


def _zero_tangent(x: Any) -> Any:
    """An instantiated zero tangent for the value of ``x`` (float0 for integers)."""
    if not _is_float(x):
        return np.zeros(np.shape(x), jax.dtypes.float0)
    return jnp.zeros(np.shape(x), x.dtype)


def _leaf_tangent(p: Any, t: Any) -> Any:
    """Tangents of the leaves of output ``p`` given the tangent ``t`` of its value (None:
    zero). The scale's tangent is zero, the data's is ``t / scale``."""
    if isinstance(p, ScaledArray):
        d = jnp.zeros(p.shape, p.dtype) if t is None else _times(t, 1 / p.scale, p.dtype)
        return _mk(d, jnp.zeros_like(p.scale))
    if not is_float_dtype(p.dtype):
        return np.zeros(p.shape, jax.dtypes.float0)
    if t is None:
        return jnp.zeros(p.shape, p.dtype)
    return _times(t, 1, p.dtype)


@register_scaled_op(P.custom_jvp_call_p)
def custom_jvp_call(*operands: Any, call_jaxpr: ClosedJaxpr, jvp_jaxpr_fun: Any,
                    num_consts: int, symbolic_zeros: bool = False, **params: Any) -> List[Any]:
    """A ``jax.custom_jvp`` whose primal is the scalified ``call_jaxpr`` and whose JVP is
    the user's rule (``jvp_jaxpr_fun``) interpreted under scalify.

    Inlining ``call_jaxpr`` would be correct when `jax.grad` ran inside scalify, but a
    gradient of ``scalify(f)`` would then differentiate the primal's implementation
    instead of the user's rule: ``relu``'s ``max(x, 0)`` gives 1/2 at 0 instead of 0, and
    a rule written for stability or with a surrogate gradient would be lost.

    The value tangent fed to the rule is ``tdata * scale + data * tscale`` (held at the
    primal's scale); an output tangent ``t`` becomes ``t / scale`` on the data and zero
    on the scale. Consistent because the rule's scales depend on primals only, so the
    scalified JVP stays linear in the tangents and JAX can transpose it."""
    split = _Split(operands)
    kinds = _OutKinds()

    @jax.custom_jvp
    def fun(*leaves: Any) -> List[Any]:
        return kinds.conform(eval_closed_jaxpr(call_jaxpr, *split.rebuild(leaves)))

    def fun_jvp(primals: Any, tangents: Any) -> Any:
        ops = split.rebuild(primals)
        t_of = {}
        for (i, field), t in zip(split.owner, tangents):
            if _is_float(ops[i]):
                t_of[(i, field)] = t
        tans = []
        for i, x in enumerate(ops):
            if isinstance(x, ScaledArray):
                tans.append(_value_tangent(x, t_of.get((i, "data")), t_of.get((i, "scale"))))
            else:
                tans.append(t_of.get((i, "value")))
        args, targs = ops[num_consts:], tans[num_consts:]
        if not symbolic_zeros:  # the user's rule expects zero tangents instantiated
            targs = [_zero_tangent(a) if t is None else t for a, t in zip(args, targs)]
        in_zeros = tuple(t is None for t in targs)
        jaxpr, consts, out_zeros = _jax_compat.call_wrapped(jvp_jaxpr_fun, *in_zeros)
        outs = eval_jaxpr(jaxpr, consts, *args, *[t for t in targs if t is not None])
        n = len(out_zeros)
        p_out = kinds.conform(outs[:n])
        nz = iter(outs[n:])
        t_out = [_leaf_tangent(p, None if z else next(nz)) for p, z in zip(p_out, out_zeros)]
        return p_out, t_out

    fun.defjvp(fun_jvp)
    return list(fun(*split.leaves))


@register_scaled_op(P.custom_vjp_call_p)
def custom_vjp_call(*operands: Any, call_jaxpr: ClosedJaxpr, fwd_jaxpr_thunk: Any, bwd: Any,
                    num_consts: int, out_trees: Callable[[], Any], symbolic_zeros: bool = False,
                    **params: Any) -> List[Any]:
    """A ``jax.custom_vjp`` whose primal is the scalified ``call_jaxpr``, whose forward
    pass is the scalified user ``fwd`` and whose backward pass is the user's ``bwd``
    interpreted under scalify, so the user's rule holds when ``scalify(f)`` is
    differentiated.

    Cotangents: an output ``(data, scale)`` with cotangent ``(ct_d, ct_s)`` gives the
    value cotangent ``ct_d / scale`` (the ScaledArray ``(ct_d, 1 / scale)``, exact);
    ``ct_s`` is redundant when the caller only uses the value ``data * scale`` and is
    ignored. The user's value cotangent ``ct`` for an input ``(data, scale)`` becomes
    ``ct * scale`` on its data and ``sum(ct * data)`` on its scale (the chain rule of
    ``data * scale``). Consts of the primal (closed-over values) get no cotangent, as
    in JAX; as with ``jax.grad(jax.jit(f))``, a ``fwd``/``bwd`` closing over a traced
    value cannot be re-traced later (use ``jax.closure_convert`` or nondiff_argnums)."""
    split = _Split(operands)
    kinds = _OutKinds()

    @jax.custom_vjp
    def fun(*leaves: Any) -> List[Any]:
        return kinds.conform(eval_closed_jaxpr(call_jaxpr, *split.rebuild(leaves)))

    def fun_fwd(*leaves: Any) -> Any:
        ops = split.rebuild(leaves)
        dyn = {i for i, _ in split.owner}
        args = ops[num_consts:]
        perturbed = tuple(i + num_consts in dyn and _is_float(a) for i, a in enumerate(args))
        fwd_jaxpr, fwd_consts = _jax_compat.call_wrapped(fwd_jaxpr_thunk, *perturbed)
        outs = eval_jaxpr(fwd_jaxpr, fwd_consts, *args)
        _, res_tree, input_fwds = out_trees()
        n_res = res_tree.num_leaves - sum(f is not None for f in input_fwds)
        res_iter = iter(outs[:n_res])
        res = [_dynamic(next(res_iter) if f is None else ops[f]) for f in input_fwds]
        prim = kinds.conform(outs[n_res:])
        out_scales = [p.scale if isinstance(p, ScaledArray) else None for p in prim]
        return prim, (res, list(leaves), out_scales)

    def fun_bwd(saved: Any, cts: Any) -> Tuple[Any, ...]:
        res, leaves, out_scales = saved
        ops = split.rebuild(leaves)
        cts_v = [ct if s is None else _mk(ct.data, 1 / s) for ct, s in zip(cts, out_scales)]

        def user_bwd(*a: Any) -> List[Any]:
            outs = _jax_compat.call_wrapped(bwd, *a)
            return [None if _jax_compat.is_symbolic_zero(o) else o for o in outs]

        cts_in = scalify(user_bwd)(*res, *cts_v)
        out: List[Any] = []
        for i, field in split.owner:
            x = ops[i]
            ct = cts_in[i - num_consts] if i >= num_consts else None
            if ct is None or not _is_float(x):
                out.append(None)
            elif field == "value":
                out.append(_times(ct, 1, x.dtype))
            elif field == "data":
                out.append(_times(ct, x.scale, x.dtype))
            else:
                cd = compute_dtype(x.dtype)
                ct_s = jnp.sum(_times(ct, 1, cd) * as_jax(x.data).astype(cd))
                out.append(ct_s.astype(jnp.asarray(x.scale).dtype))
        return tuple(out)

    fun.defvjp(fun_fwd, fun_bwd)
    return list(fun(*split.leaves))
