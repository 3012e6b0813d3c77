"""Optimizer state and master weights in float16 (or float8): `scaled_state`, `apply_updates`.

`scaled_state(inner, dtype)` wraps any optax transformation so that every float array of
its state is *stored* as a `ScaledArray` of ``dtype`` (2 bytes per element for float16,
1 for float8) while every update is *computed* in float32:

- ``init(params)`` runs ``inner.init`` on float32 copies of the params and packs the
  state;
- ``update(grads, state, params)`` unpacks the state to float32 values, runs
  ``inner.update`` on float32 gradients and params, and packs the new state again with
  fresh scales.

Why unpack to float32 rather than run the inner update on scaled data: the update is a
handful of elementwise operations on tensors the size of the parameters, so computing them
in float32 costs nothing measurable, needs no scaled rule for whatever an optimizer calls
(Adafactor's factored means, Lion's sign, MultiSteps' ``cond``...), and makes the
result independent of how each rule picks its scales. The memory win comes from storage,
which is where the packing happens.

**The storage scale.** Each packed leaf gets one power-of-two scale chosen from its
max-abs so that the largest magnitude lands in the *top binade* of the storage format:
``data_max`` in ``(T/2, T]`` with ``T`` the largest power of two in the format (32768
for float16, 256 for float8 E4M3). Stored data is never computed with in its narrow dtype
(it is widened to float32 first), so there is no reason to keep it near 1: the aim is
the widest dynamic range *inside one leaf*. Adam's second moment is the square of the
gradients, so a leaf whose gradients span 1e4 holds second moments spanning 1e8; with
the max-abs at 1, float16 keeps only 2**-24 (6e-8) below it before flushing to zero, and
the flushed entries turn ``m / (sqrt(v) + eps)`` into ``m / eps``. With the max-abs at
32768 the same leaf keeps 2**-39 (1.8e-12), 2**-29 (1.9e-9) of it at full precision.
Max-abs (not RMS) because it can never overflow, whatever the distribution, and RMS would
put a heavy-tailed second moment's largest entries out of float8's range. The scale is
rounded *up* to a power of two (not with the `ScalifyConfig` mode) so that the max-abs
never exceeds ``T``; packing then divides by a power of two, which is exact.

The whole-leaf scale carries the magnitude, so a second moment of 1e-10 (the square of
1e-5 gradients, below float16's smallest subnormal 6e-8) is stored at full precision
where plain float16 state rounds it to zero.

Integer leaves (step counts) are untouched; float *scalars* (hyperparameters of
``inject_hyperparams``, MultiSteps' counters) stay float32: packing them would cost bytes
and precision.

**Inside `scalify`.** ``scalify(step)`` traces ``step`` with the state's ScaledArrays
replaced by arrays of their data dtype, so inside ``step`` the wrapped ``update`` sees
plain float16 leaves. It runs ``inner.update`` as one `float32_call`: a primitive holding
the update's jaxpr, whose scaled rule hands it the float32 values ``data * scale`` and
evaluates it as plain JAX (outside `scalify` the call is simply inlined). The update's
arithmetic thus never goes through the scaled rules, which would add their scale
arithmetic to every elementwise operation of every leaf for nothing (the update is
float32 math by design). The new state passes through `storage_cast`, a primitive whose
scaled rule repacks exactly as above (its plain meaning is a saturating cast). The state returned by ``scalify(step)`` thus has the same
ScaledArray leaves as the one passed in, so a jitted training loop carries it unchanged
(a state leaf the optimizer rebuilds from constants, such as Adafactor's placeholders for
unfactored statistics, is repacked too). The updates pass through `unit_cast_p`, whose
scaled rule casts them to the gradients' dtype at a fresh scale that puts their max-abs
in ``[1, 2)``: the scale the rules leave on an update depends on the optimizer's
arithmetic (an all-zero state at init, a clipping factor, Adafactor's ``max(rms(p),
eps)`` of a zero-initialised weight) and may sit binades away from the update's size,
and cast to float16 at that scale a small update would lose its precision to subnormals
(or a large one overflow), and ``p + u`` would carry the weight's data with it.

**Master weights.** `apply_updates` adds updates to params held as float16
`ScaledArray`s (or plain arrays) in float32 and rounds the result once, optionally with
stochastic rounding: updates smaller than half a float16 ulp of a weight vanish under
round-to-nearest, but survive on average when rounded stochastically.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad

from scalify._jax_compat import is_tracer
from scalify.core.datatype import ScaledArray, is_float_dtype, is_scaled_leaf
from scalify.core.formats import clip_to_format, saturating_cast
from scalify.core.operands import as_jax, compute_dtype, is_narrow, promote
from scalify.core.pow2 import is_static, pow2_round_down, pow2_round_up
from scalify.core.registry import register_argument_check, register_scaled_op
from scalify.lax._primitive import define_primitive

__all__ = ["scaled_state", "ScaledOptState", "apply_updates", "stochastic_round", "storage_cast"]

# Fields of optax's state NamedTuples that hold a *first moment* (the leaves `mu_dtype`
# applies to): `mu` of Adam/AdamW/Lion/Nadam/AMSGrad/AdaBelief..., `trace` of SGD
# momentum/Nesterov (`optax.trace`).
FIRST_MOMENT_FIELDS = ("mu", "trace")

_F32 = np.dtype(np.float32)
_TINY = np.float32(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------------------
# dtypes


def _check_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        d = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"scalify.optim: {name} must be a floating dtype, got {dtype!r}.") from None
    if not is_float_dtype(d) or d.itemsize > 8:
        raise TypeError(
            f"scalify.optim: {name} must be a floating dtype (float16, bfloat16, a float8 "
            f"format...), got {d}."
        )
    return d


def _top(dtype: Any) -> np.float32:
    """Largest power of two of ``dtype``, capped at 2**15 so that scales of wide formats
    (bfloat16, float32: no range to gain) stay far from float32's limits."""
    fmax = float(ml_dtypes.finfo(dtype).max)
    return np.float32(2.0 ** min(int(np.floor(np.log2(fmax))), 15))


def _fmax(dtype: Any) -> np.float32:
    return np.float32(min(float(ml_dtypes.finfo(dtype).max), float(np.finfo(np.float32).max)))


def _cdtype(x: Any) -> np.dtype:
    return compute_dtype(np.dtype(x.dtype))


def _amax(x: Any) -> jax.Array:
    """Max-abs of ``x`` as a float32 scalar (0 for an empty array)."""
    return jnp.max(jnp.abs(x).astype(_F32), initial=np.float32(0))


def _saturating_cast(x: Any, dtype: Any) -> jax.Array:
    """Round ``x`` to ``dtype``, clipping finite values to its largest finite value first:
    float8 E4M3FN has no infinity (an overflowing cast gives NaN, not the max). NaN and
    infinities are kept (an infinity becomes NaN in a format without one), so that a
    diverged state stays visible (`scalify.core.formats.saturating_cast`)."""
    return saturating_cast(jnp.asarray(x), dtype, overflow="saturate")


# --------------------------------------------------------------------------------------
# storage_cast: a primitive whose plain meaning is a saturating cast and whose scaled
# meaning repacks with a fresh storage scale (what `scaled_state` needs inside scalify).


def _zero_or(amax: Any, scale: Any) -> jax.Array:
    """``scale``, or 0 for all-zero data (``amax == 0``): the zero tensor, which carries
    no magnitude and so never sets the scale of what it is added to."""
    return jnp.where(amax == 0, np.float32(0), scale)


def _storage_ratio(amax: Any, dtype: Any) -> jax.Array:
    """The power of two ``r`` with ``amax / r`` in ``(T/2, T]`` (1 for 0, inf or NaN)."""
    r = pow2_round_up(jnp.maximum(amax / _top(dtype), _TINY))
    return jnp.where((amax > 0) & jnp.isfinite(r), r, np.float32(1))


def _storage_cast_scaled(x: Any, *, dtype: Any, **params: Any) -> ScaledArray:
    """Scaled rule of `storage_cast`: a fresh scale from the max-abs of ``x``.

    Scaling choice: the new scale is ``x.scale * r`` with ``r`` the power of two (rounded
    *up*, whatever the `ScalifyConfig` mode, so the data can never overflow) that puts the
    max-abs of the data in the top binade ``(T/2, T]`` of ``dtype`` (``T`` = 32768 for
    float16, 256 for float8 E4M3). Stored state is never computed with in its narrow
    dtype, so the widest dynamic range below the max-abs is what counts, not unit
    variance. The data is divided by ``r`` in float32 (exact: a power of two) and cast to
    ``dtype`` once, saturating. All-zero data gets scale 0 (the zero tensor); infinite
    or NaN data keep the input scale.
    """
    x = promote(x)
    d = as_jax(x.data)
    d = d.astype(_cdtype(d))
    amax = _amax(d)
    r = _storage_ratio(amax, dtype)
    data = _saturating_cast(d / r.astype(d.dtype), dtype)
    return ScaledArray(data, _zero_or(amax, jnp.asarray(x.scale, _F32) * r))


def _cast_primitive(name: str, impl: Any) -> Primitive:
    """A primitive ``prim.bind(x, dtype=...)`` whose plain meaning is ``impl(x, dtype)``
    (a cast) and whose scaled meaning a rule registered for it gives. Batched
    elementwise; differentiated as a cast (the tangent is cast the same way, a linear
    convert that reverse mode transposes), e.g. through an optimizer step."""
    prim = define_primitive(
        name,
        lambda x, *, dtype: impl(x, dtype),
        lambda x, *, dtype: jax.core.ShapedArray(x.shape, np.dtype(dtype)),
        elementwise=True,
    )
    ad.defjvp(prim, lambda t, x, *, dtype: jnp.asarray(t).astype(dtype))
    return prim


storage_cast_p = _cast_primitive("scalify_storage_cast", _saturating_cast)


@register_scaled_op(storage_cast_p, always_scaled=True)
def _storage_cast_rule(x: Any, *, dtype: Any, **params: Any) -> Any:
    """The interpreter's rule for `storage_cast`: a scaled operand is repacked
    (`_storage_cast_scaled`); so is a constant known at trace time, since inside `scalify`
    a stored state leaf whose new value an optimizer builds from constants (Adafactor's
    ``zeros((1,))`` placeholders for unfactored statistics, a reset accumulator) must come
    back a ScaledArray like the leaf that went in, or the state's structure would change
    between steps (a jitted step recompiles, a ``scan`` carry breaks). A traced plain
    operand stays plain: a saturating cast, as outside `scalify`."""
    if isinstance(x, ScaledArray) or is_static(x):
        return _storage_cast_scaled(x, dtype=dtype)
    return storage_cast_p.bind(x, dtype=dtype)


def storage_cast(x: Any, dtype: Any) -> Any:
    """Cast ``x`` to ``dtype`` for storage.

    - a `ScaledArray`: repacked at a fresh power-of-two scale that puts its max-abs in
      the top binade of ``dtype`` (see `scaled_state`), data cast once, saturating;
    - a plain array outside `scalify`: a saturating cast;
    - inside `scalify`, on a value that is scaled there or a constant known at trace
      time: the ScaledArray repack; on a traced plain value: the saturating cast.
    """
    dtype = _check_dtype(dtype, "dtype")
    if isinstance(x, ScaledArray):
        return _storage_cast_scaled(x, dtype=dtype)
    return storage_cast_p.bind(jnp.asarray(x), dtype=dtype)


# --------------------------------------------------------------------------------------
# unit_cast: the updates' cast. Plain meaning: ``astype``; scaled meaning: a fresh scale
# that puts the data's max-abs in [1, 2) (what `scaled_state` needs inside scalify).


def _unit_ratio(amax: Any) -> jax.Array:
    """The power of two ``r`` with ``amax / r`` in ``[1, 2)`` (1 for 0, inf or NaN)."""
    r = pow2_round_down(jnp.maximum(amax, _TINY))
    return jnp.where((amax > 0) & jnp.isfinite(r), r, np.float32(1))


def _unit_cast_scaled(x: Any, *, dtype: Any, **params: Any) -> ScaledArray:
    """Scaled rule of `unit_cast_p`: ``x`` cast to ``dtype`` at a fresh scale.

    Scaling choice: the new scale is ``x.scale * r`` with ``r`` the power of two
    (rounded down) that puts the max-abs of the data in ``[1, 2)``: values the model
    computes with next (an update added to the weights) want data near unit size, as
    every scaled rule does. Why not keep the scale the rules gave: the update's scale
    comes out of the optimizer's arithmetic, where an all-zero state at init, a clipping
    factor or an accumulator's initial value can leave it binades away from the update's
    size (SGD momentum's first update of a 1e-9 leaf came out with data 1e-6, float16
    subnormals with 4 significant bits). The data is divided by ``r`` in float32
    (exact) and cast once, saturating. All-zero data gets scale 0 (the zero tensor);
    infinite or NaN data keep the input scale.
    """
    x = promote(x)
    d = as_jax(x.data)
    d = d.astype(_cdtype(d))
    amax = _amax(d)
    r = _unit_ratio(amax)
    data = _saturating_cast(d / r.astype(d.dtype), dtype)
    return ScaledArray(data, _zero_or(amax, jnp.asarray(x.scale, _F32) * r))


unit_cast_p = _cast_primitive("scalify_unit_cast", lambda x, dtype: jnp.asarray(x).astype(dtype))


@register_scaled_op(unit_cast_p, always_scaled=True)
def _unit_cast_rule(x: Any, *, dtype: Any, **params: Any) -> Any:
    """The interpreter's rule for `unit_cast_p`: scaled operands and constants known at
    trace time are cast at a fresh unit scale (`_unit_cast_scaled`); a traced plain
    operand stays plain (``astype``), as outside `scalify`."""
    if isinstance(x, ScaledArray) or is_static(x):
        return _unit_cast_scaled(x, dtype=dtype)
    return unit_cast_p.bind(x, dtype=dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _unit_pack(x: Any, dtype: Any) -> ScaledArray:
    """``x`` as a ScaledArray of ``dtype`` whose max-abs lies in ``[1, 2)``: used for
    values the model computes with (params, updates), where data near 1 is what the
    scaled rules expect. The scale is ``pow2_round_down(max-abs)`` (1 for 0/inf/NaN)."""
    x = jnp.asarray(x)
    x = x.astype(_cdtype(x))
    s = _unit_ratio(_amax(x))
    return ScaledArray(_saturating_cast(x / s.astype(x.dtype), dtype), s)


# --------------------------------------------------------------------------------------
# scaled_state


class ScaledOptState:
    """The state of a `scaled_state` optimizer: the inner optimizer's state (``inner``),
    its float arrays stored as ScaledArrays.

    It reads as the inner state: ``state[0].mu``, ``state.inner_state``, ``len(state)``
    and iteration go to ``inner``. A pytree with the one child ``inner``. It also tells
    `scalify` that this optax state is updated in float32 by `scaled_state`, unlike
    optax state initialised directly on float16 ScaledArrays (see `_check_optax_state`)."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any):
        self.inner = inner

    def __getitem__(self, i: Any) -> Any:
        return self.inner[i]

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (unpickling, copy): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        return iter(self.inner)

    def __repr__(self) -> str:
        return f"ScaledOptState({self.inner!r})"


jax.tree_util.register_pytree_with_keys(
    ScaledOptState,
    lambda s: (((jax.tree_util.GetAttrKey("inner"), s.inner),), None),
    lambda aux, children: ScaledOptState(children[0]),
    flatten_func=lambda s: ((s.inner,), None),
)


def _as_transformation(inner: Any) -> optax.GradientTransformationExtraArgs:
    if isinstance(inner, optax.MultiSteps):
        return optax.GradientTransformationExtraArgs(inner.init, inner.update)
    if isinstance(inner, optax.GradientTransformationExtraArgs):
        return inner
    if isinstance(inner, optax.GradientTransformation):
        return optax.with_extra_args_support(inner)
    hint = ""
    if callable(inner):
        name = getattr(inner, "__name__", type(inner).__name__)
        hint = f" Did you pass the factory `{name}` instead of calling it, e.g. `{name}(1e-3)`?"
    raise TypeError(
        "scalify.optim.scaled_state wraps an optax.GradientTransformation (or an "
        f"optax.MultiSteps), got {type(inner).__name__}.{hint}"
    )


def _is_float_array(x: Any) -> bool:
    return hasattr(x, "dtype") and is_float_dtype(x.dtype)


def _to_compute(tree: Any) -> Any:
    """ScaledArrays unscaled, plain float leaves widened, to float32 (or wider)."""

    def f(x: Any) -> Any:
        if isinstance(x, ScaledArray):
            return x.to_array(compute_dtype(x.dtype))
        if _is_float_array(x):
            return jnp.asarray(x).astype(_cdtype(x))
        return x

    return jax.tree.map(f, tree, is_leaf=is_scaled_leaf)


# --------------------------------------------------------------------------------------
# float32_call: the optimizer's arithmetic as one plain float32 island inside scalify.


def _call_impl(*args: Any, jaxpr: Any, like: Tuple[Optional[int], ...]) -> Any:
    return jaxpr_as_fun(jaxpr)(*args)


def _call_batching(args: Any, dims: Any, *, jaxpr: Any, like: Any) -> Any:
    outs = jax.vmap(jaxpr_as_fun(jaxpr), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)


def _call_jvp(primals: Any, tangents: Any, *, jaxpr: Any, like: Any) -> Any:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(jaxpr_as_fun(jaxpr), tuple(primals), tuple(tangents))


float32_call_p = define_primitive(
    "scalify_float32_call", _call_impl, lambda *avals, jaxpr, like: jaxpr.out_avals,
    multiple_results=True, batching_rule=_call_batching,
)
ad.primitive_jvps[float32_call_p] = _call_jvp


@register_scaled_op(float32_call_p)
def _float32_call_rule(*args: Any, jaxpr: Any, like: Tuple[Optional[int], ...]) -> Any:
    """Inside `scalify`: the call's operands as plain float32 values (``data * scale``:
    exact, a power-of-two scale), its jaxpr evaluated on them as plain JAX, and each
    result a float32 ScaledArray at scale 1 where the operand ``like`` names is scaled
    (a state leaf or a gradient: `storage_cast` and `unit_cast` repack it at a fresh
    scale next), plain otherwise (a counter, a float scalar kept plain).

    Why: the update of an optimizer is a handful of elementwise operations per leaf; run
    through the scaled rules, each operation adds its scale arithmetic (an Adam step of
    a 20-leaf model traced about 10x the equations of the plain update and compiled 5x
    longer), for nothing: `scaled_state` computes the update in float32 by design."""
    outs = jaxpr_as_fun(jaxpr)(*_to_compute(list(args)))
    return [
        ScaledArray(o, np.ones((), _F32)) if i is not None and isinstance(args[i], ScaledArray) else o
        for o, i in zip(outs, like)
    ]


def _in_float32(update: Any, grads: Any, state: Any, params: Any, extra: Any) -> Tuple[Any, Any]:
    """``update(grads, state, params, **extra)`` on float32 values, as one `float32_call`:
    plain JAX outside `scalify` (the call is inlined), one float32 island inside it.
    Returns ``(new_updates, new_state)``."""
    args = (_to_compute(grads), _to_compute(state), None if params is None else _to_compute(params))
    leaves, in_tree = jax.tree.flatten((args, extra))
    arrays = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval")]
    out_tree: list = []

    def flat(*xs: Any) -> Any:
        full = list(leaves)
        for i, x in zip(arrays, xs):
            full[i] = x
        (g, s, p), kw = jax.tree.unflatten(in_tree, full)
        flat_out, tree = jax.tree.flatten(update(g, s, p, **kw))
        out_tree.append(tree)
        return flat_out

    closed = jax.make_jaxpr(flat)(*[leaves[i] for i in arrays])
    like = _result_forms(args, out_tree[0], arrays)
    if like is None or any(is_tracer(c) for c in closed.consts):
        # An update closing over a value traced outside it, or results that do not mirror
        # the gradients and state (no optax transformation does either): run it as is.
        return update(*args, **extra)
    outs = float32_call_p.bind(*[leaves[i] for i in arrays], jaxpr=closed, like=like)
    return jax.tree.unflatten(out_tree[0], outs)


def _result_forms(args: Any, out_tree: Any, arrays: Sequence[int]) -> Optional[Tuple[Optional[int], ...]]:
    """For each result leaf of ``update(grads, state, params)``, the index among the call's
    operands (``arrays``, positions in the flat ``(args, extra)``) of the leaf whose form
    it takes: an update that of its gradient, a new state leaf that of the old one. None
    when the results do not mirror the gradients and the state leaf for leaf."""
    n_grads, n_state = (len(jax.tree.leaves(a)) for a in args[:2])
    kids = out_tree.children()
    if len(kids) != 2 or kids[0].num_leaves != n_grads or kids[1].num_leaves != n_state:
        return None
    pos = {i: k for k, i in enumerate(arrays)}
    return tuple(pos.get(i) for i in range(n_grads + n_state))


def _is_first_moment(state: Any, path: Tuple[Any, ...]) -> bool:
    """Does the leaf at ``path`` lie under a first-moment field of an optimizer state?

    The path is walked through ``state`` so that only fields of *NamedTuples* (the state
    classes of optax) count, never a dict key or a model's attribute that happens to be
    called ``mu``."""
    node = state
    for k in path:
        is_namedtuple = isinstance(node, tuple) and hasattr(node, "_fields")
        if is_namedtuple and getattr(k, "name", None) in FIRST_MOMENT_FIELDS:
            return True
        try:
            if hasattr(k, "key"):
                node = node[k.key]
            elif hasattr(k, "idx"):
                node = node[k.idx]
            elif hasattr(k, "name"):
                node = getattr(node, k.name)
            else:
                return False
        except (KeyError, IndexError, TypeError, AttributeError):
            return False
    return False


@functools.partial(jax.jit, static_argnames="dtype")
def _pack(x: jax.Array, dtype: np.dtype) -> ScaledArray:
    """A plain array packed for storage. Jitted so that an eager ``init``/``update``
    compiles one small program per leaf shape instead of one per operation."""
    return _storage_cast_scaled(x.astype(_cdtype(x)), dtype=dtype)


def _pack_new(x: Any, dtype: np.dtype) -> Any:
    """A freshly initialised float leaf of the state, packed for storage."""
    if not _is_float_array(x) or np.ndim(x) == 0:
        return x
    return _pack(jnp.asarray(x), dtype=dtype)


def _repack(new: Any, old: Any) -> Any:
    """A leaf of the updated state, stored the way the same leaf of the old state was."""
    if isinstance(old, ScaledArray):
        return _pack(jnp.asarray(new), dtype=old.dtype)
    if _is_float_array(old):
        if np.ndim(old) == 0:
            return jnp.asarray(new).astype(old.dtype)
        # A plain array here is either a ScaledArray seen from inside `scalify` (the
        # primitive's scaled rule then repacks it) or state the user keeps plain.
        return storage_cast_p.bind(jnp.asarray(new), dtype=np.dtype(old.dtype))
    return new


def _like_grad(u: Any, g: Any) -> Any:
    """An output update in the form of its gradient: ScaledArray or plain, same dtype."""
    if u is None:
        return None
    if isinstance(g, ScaledArray):
        return _unit_pack(u, g.dtype)
    if _is_float_array(g) and _is_float_array(u):
        # A plain gradient is either plain (a cast) or, inside `scalify`, a ScaledArray
        # seen as its data: the primitive's rule then gives the update a unit-size data.
        return unit_cast_p.bind(jnp.asarray(u), dtype=np.dtype(g.dtype))
    return u


def scaled_state(
    inner: Any,
    dtype: Any = jnp.float16,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap an optax transformation so its state is stored in ``dtype`` ScaledArrays.

    Args:
      inner: an `optax.GradientTransformation` (any: ``adam``, ``adamw``, ``lion``,
        ``sgd`` with momentum, ``rmsprop``, ``adafactor``, ``chain``,
        ``inject_hyperparams``, ``masked``, ``multi_transform``...) or an
        `optax.MultiSteps`.
      dtype: storage dtype of the state's float arrays (float16 by default; bfloat16 and
        the float8 formats work too).
      mu_dtype: optional storage dtype of first-moment leaves (the leaves under a field
        of a state NamedTuple named in `FIRST_MOMENT_FIELDS`: Adam's, Lion's... ``mu``,
        SGD momentum's ``trace``; a params dict key ``"mu"`` does not count), e.g.
        ``jnp.float8_e4m3fn``: Adam's state is then 3 bytes a parameter instead of 8.
        The cast saturates (E4M3FN has no infinity).

    Returns:
      An `optax.GradientTransformationExtraArgs`. Its ``init`` takes plain or ScaledArray
      params and returns a `ScaledOptState` (reads as the inner state) with every float array (ndim >= 1) a
      `ScaledArray` of ``dtype`` and a power-of-two scale; integer leaves and float
      scalars are kept as they are. Its ``update(grads, state, params=None, **extra)``
      takes plain or ScaledArray grads and params, computes the inner update in float32
      and returns updates in the form of the gradients (plain of the same dtype, or
      ScaledArrays of the same data dtype whose max-abs data lies in ``[1, 2)``, inside
      `scalify` as outside) and the state repacked with fresh scales
      (see the module docstring for the choice of scale). Extra arguments are forwarded
      to ``inner``. It works under `jax.jit`, `jax.eval_shape`, with sharded arrays, and
      inside `scalify` (call ``init`` outside it).

    Raises:
      TypeError: ``inner`` is not an optax transformation, or a dtype is not floating.
    """
    tx = _as_transformation(inner)
    dtype = _check_dtype(dtype, "dtype")
    mu_dtype = None if mu_dtype is None else _check_dtype(mu_dtype, "mu_dtype")

    def init_fn(params: Any) -> Any:
        state = tx.init(_to_compute(params))

        def pack(path: Any, x: Any) -> Any:
            if isinstance(x, ScaledArray):  # already packed (a nested scaled_state)
                return x
            d = mu_dtype if (mu_dtype is not None and _is_first_moment(state, path)) else dtype
            return _pack_new(x, d)

        return ScaledOptState(jax.tree_util.tree_map_with_path(pack, state, is_leaf=is_scaled_leaf))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        state = state.inner if isinstance(state, ScaledOptState) else state
        new_updates, new_state = _in_float32(
            tx.update, updates, state, params, extra_args,
        )
        new_state = jax.tree.map(_repack, new_state, state, is_leaf=is_scaled_leaf)
        new_updates = jax.tree.map(
            _like_grad, new_updates, updates, is_leaf=lambda x: x is None or is_scaled_leaf(x)
        )
        return new_updates, ScaledOptState(new_state)

    # `init` is jitted: called eagerly, it then compiles one program rather than one per
    # operation and leaf shape; under an outer `jit` or `eval_shape` it is inlined.
    return optax.GradientTransformationExtraArgs(jax.jit(init_fn), update_fn)


# --------------------------------------------------------------------------------------
# master weights


def stochastic_round(x: Any, dtype: Any, key: jax.Array) -> jax.Array:
    """Round ``x`` to ``dtype`` stochastically: to one of its two neighbours in ``dtype``
    with probabilities proportional to proximity, so that ``E[result] == x`` exactly.

    Subnormals of ``dtype`` are handled (the neighbours are found with `jnp.nextafter`);
    finite values beyond the range of ``dtype`` saturate to its largest finite value;
    NaN and infinities are cast as they are. ``x`` is read in float32 (or wider).
    """
    dtype = _check_dtype(dtype, "dtype")
    x = jnp.asarray(x)
    x = x.astype(_cdtype(x))
    x = clip_to_format(x, dtype)
    near = x.astype(dtype)
    back = near.astype(x.dtype)
    err = x - back  # exact: x and its nearest neighbour are within a factor of 2 (Sterbenz)
    # Step towards +-max rather than +-inf: float8 E4M3FN has no infinity.
    big = jnp.asarray(_fmax(dtype), x.dtype)
    other = jnp.nextafter(near, jnp.where(err > 0, big, -big).astype(dtype))
    gap = other.astype(x.dtype) - back
    p = jnp.where((err != 0) & (gap != 0), err / jnp.where(gap == 0, 1, gap), 0)
    u = jax.random.uniform(key, x.shape, dtype=x.dtype)
    out = jnp.where((u < p) & jnp.isfinite(other), other, near)
    return out


def apply_updates(
    params: Any,
    updates: Any,
    *,
    stochastic_rounding: bool = False,
    key: Optional[jax.Array] = None,
) -> Any:
    """``params + updates`` for params held as `ScaledArray`s (or plain arrays).

    Each sum is computed in float32 from the ScaledArray values and rounded once:

    - a ScaledArray param gets a fresh power-of-two scale that puts its max-abs in
      ``[1, 2)`` (data near 1, as the scaled rules expect of values they compute with)
      and keeps its data dtype;
    - a plain param keeps its dtype (like `optax.apply_updates`);
    - ``None`` updates leave the param unchanged.

    With ``stochastic_rounding=True`` the rounding to a narrow data dtype (float16,
    bfloat16, float8) is stochastic and unbiased (`stochastic_round`, one key per leaf
    split from ``key``): an update smaller than half an ulp of a float16 weight is lost
    by round-to-nearest on every step, so plain float16 master weights stagnate, while
    stochastic rounding keeps it on average. Float32 and wider params round exactly.

    Updates may be plain arrays or ScaledArrays. Use this outside `scalify`; inside,
    params are plain arrays there and `optax.apply_updates` works as usual.
    """
    if stochastic_rounding and key is None:
        raise ValueError("scalify.optim.apply_updates: stochastic_rounding=True needs a PRNG `key`.")
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_scaled_leaf)
    try:
        uleaves = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "scalify.optim.apply_updates: updates do not have the structure of params "
            f"({treedef}): {e}"
        ) from None
    keys = list(jax.random.split(key, len(leaves))) if stochastic_rounding else [None] * len(leaves)

    def one_leaf(p: Any, u: Any, k: Any) -> Any:
        if u is None:
            return p
        if isinstance(u, ScaledArray):
            u = u.to_array(compute_dtype(u.dtype))
        if isinstance(p, ScaledArray):
            value = p.to_array(compute_dtype(p.dtype)) + jnp.asarray(u)
            value = value.astype(compute_dtype(p.dtype))
            packed = _unit_pack(value, p.dtype)
            if k is not None and p.dtype.itemsize < value.dtype.itemsize:
                data = stochastic_round(value / packed.scale.astype(value.dtype), p.dtype, k)
                packed = ScaledArray(data, packed.scale)
            return packed
        p = jnp.asarray(p)
        value = p.astype(jnp.promote_types(_cdtype(p), jnp.asarray(u).dtype)) + u
        if k is not None and _is_float_array(p) and p.dtype.itemsize < value.dtype.itemsize:
            return stochastic_round(value, p.dtype, k)
        return value.astype(p.dtype)

    return jax.tree.unflatten(treedef, [one_leaf(p, u, k) for p, u, k in zip(leaves, uleaves, keys)])


# --------------------------------------------------------------------------------------
# Unwrapped optax state inside scalify: refused where its update cannot be right.

# optax state classes whose update is right on float16 ScaledArrays: linear in the
# gradients or a sign, with no small constant (eps) that float16 rounds to 0.
_SAFE_STATES = {"TraceState", "ScaleByLionState", "EmptyState", "ScaleByScheduleState",
                "ScaleByLearningRateState", "InjectHyperparamsState", "InjectStatefulHyperparamsState",
                "MultiStepsState", "MaskedState", "MultiTransformState", "PartitionState"}
# optax state classes whose `init` is not all zeros: mapped over a ScaledArray's children
# (its data and its scale separately), such an init gives a wrong value in any dtype
# (Adagrad's `full_like(0.1)` of both: a value of 0.01).
_NONZERO_INIT_STATES = {"ScaleByRssState"}


def _optax_states(tree: Any):
    """The optax state NamedTuples in ``tree`` (nested tuples, lists and dicts)."""
    if isinstance(tree, (ScaledArray, ScaledOptState)):
        return  # a ScaledOptState's update computes in float32: nothing to refuse
    if isinstance(tree, tuple) and hasattr(tree, "_fields") and type(tree).__module__.startswith("optax"):
        yield tree
    if isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _optax_states(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _optax_states(x)


def _check_optax_state(args: Any, kwargs: Any) -> None:
    """Refuse, at trace time, optax state holding ScaledArrays that `scaled_state` did not
    pack, where the optimizer's update would be silently wrong under `scalify`.

    Why it cannot be right: optax computes an update in the dtype of its state and
    gradients. In float16, JAX rounds a constant such as Adam's ``eps=1e-8`` to 0 while
    tracing, before scalify sees the program, so the update of an all-zero gradient row
    is ``0 / 0``; and ``init`` on ScaledArray params maps over each one's data and scale
    separately, which is right only for an all-zero init. `scaled_state` computes every
    update in float32 and stores the state scaled, which is why it is the remedy."""
    for state in _optax_states((args, kwargs)):
        name = type(state).__name__
        for leaf in jax.tree.leaves(state, is_leaf=is_scaled_leaf):
            if not isinstance(leaf, ScaledArray):
                continue
            narrow = is_narrow(leaf.dtype) and name not in _SAFE_STATES
            if narrow or name in _NONZERO_INIT_STATES:
                why = (
                    f"optax computes its update in the state's {leaf.dtype}, where small "
                    "constants such as eps=1e-8 round to 0 while JAX traces (an all-zero "
                    "gradient row then updates by 0/0 = NaN)"
                    if narrow else
                    "its `init` mapped over each ScaledArray's data and scale separately, "
                    "which gives a wrong initial value"
                )
                raise TypeError(
                    f"scalify: the optax state {type(state).__module__}.{name} holds "
                    f"ScaledArrays that `scalify.optim.scaled_state` did not make: {why}. "
                    "Wrap the optimizer, `opt = sfy.optim.scaled_state(optax.<optimizer>(...))` "
                    "(float32 update math, float16 state), or keep its state plain float32: "
                    "`opt.init(sfy.asarray(params, jnp.float32))`."
                )


register_argument_check(_check_optax_state)
