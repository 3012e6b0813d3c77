"""Scaled rules of collective primitives (``jax.shard_map``, ``jax.pmap``) and of
``shard_map`` itself.

Under ``shard_map`` every device holds its own ScaledArray, and its *scale may differ
from device to device* (a scale computed from local data, e.g. `as_scaled_array` of a
shard). A collective that combines the devices' data must therefore first agree on one
scale:

- **Common scale.** ``s_c = pmax(s)`` over the collective's axes (and axis groups): the
  largest scale, as select/concatenate/max align to the largest one (overflow-safe).
  Each device rescales its data to ``s_c`` (an exact power-of-two shift; much smaller
  scales lose low bits, as in `add`). A scalar ``pmax`` per collective is the whole
  cost. It is skipped when the scale is the same on every device by construction: a
  static scale (a Python/NumPy constant is the same constant everywhere), or, with
  ``check_vma=True``, a scale JAX's types say does not vary over those axes.
- **psum / psum_scatter** add ``n`` aligned terms (``n`` the number of devices summed
  over, times any positional axes' sizes) in float32 (the compute dtype, whatever the
  data dtype: one rounding, and float8/float16 sums never overflow on the way) and, as
  unit scaling does for every sum (`reduce_sum`, `dot_general`), move ``pow2(sqrt(n))``
  from the data into the scale: the sum of ``n`` independent unit-variance terms has
  variance ``n``. Data-parallel gradients are correlated rather than independent, so
  their sum grows like ``n``: the data then sits ``sqrt(n)`` above unit variance
  (2.8x on 8 devices), far from any format's limit. The communication is in float32.
- **pmax / pmin / all_gather / all_to_all / ragged_all_to_all** move or select values:
  the data aligned to ``s_c`` is communicated *in its own dtype* (rounding is monotonic,
  so this equals the float32 computation rounded once) and the output has scale ``s_c``.
- **ppermute / pbroadcast** move whole values between devices: data and scale travel
  together (a traced scale is sent alongside its data; devices that receive nothing get
  zeros at scale 1).
- **pvary** (JAX's "now varying over these axes" cast) applies to the data only.

Every parameter (axis names, axis index groups, tiling, permutations...) is forwarded.
``axis_index`` has integer output and needs no rule.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P
from jax.sharding import PartitionSpec

from scalify import _jax_compat
from scalify.core.datatype import ScaledArray
from scalify.core.interpreter import eval_jaxpr
from scalify.core.operands import as_jax, common_scale, compute_dtype, in_scale, one, saturating_cast, scale_dtype
from scalify.core.pow2 import is_static, pow2_round
from scalify.core.registry import register_scaled_op

# Collectives JAX only exposes as primitives inside shard_map, and shard_map itself.
_psum_invariant_p = _jax_compat.internal_primitive("lax.parallel", "psum_invariant_p")
_all_gather_invariant_p = _jax_compat.internal_primitive("lax.parallel", "all_gather_invariant_p")
_reduce_scatter_p = _jax_compat.internal_primitive("lax.parallel", "reduce_scatter_p")
_pbroadcast_p = _jax_compat.internal_primitive("lax.parallel", "pbroadcast_p")
_pvary_p = _jax_compat.internal_primitive("core", "pvary_p")
_shard_map_p = _jax_compat.internal_primitive("shard_map", "shard_map_p")


# --- helpers ---------------------------------------------------------------------------


def _names(axes: Any) -> Tuple[Any, ...]:
    """The named (mesh/pmap) axes of an ``axes``/``axis_name`` parameter; positional
    (integer) axes, which `vmap` of a collective produces, are local array axes."""
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return tuple(a for a in axes if not isinstance(a, int))


def _positional(axes: Any) -> Tuple[int, ...]:
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return tuple(a for a in axes if isinstance(a, int))


def _group_size(names: Sequence[Any], groups: Any) -> int:
    """Number of devices a collective over ``names`` combines (per axis index group)."""
    if groups is not None:
        return len(groups[0])
    return int(lax.axis_size(tuple(names))) if names else 1


def _varying(scale: Any, data: Any, names: Sequence[Any]) -> Tuple[Any, ...]:
    """The axes among ``names`` over which ``scale`` may differ between devices.

    A static scale is the same constant everywhere: none. When JAX tracks which manual
    axes a value varies over (``shard_map(check_vma=True)``: the data or the scale then
    carries such axes in its type), those of the scale. Otherwise all of ``names``.
    """
    if is_static(scale) or not names:
        return ()
    vs, vd = _jax_compat.varying_axes(scale), _jax_compat.varying_axes(data)
    if vs is not None and vd is not None and (vs or vd):
        return tuple(n for n in names if n in vs)
    return tuple(names)


def _agree(scale: Any, data: Any, names: Sequence[Any], groups: Any = None) -> Any:
    """The common scale of ``scale`` across the devices of ``names``: its ``pmax``
    (no communication when it cannot differ, see `_varying`)."""
    axes = _varying(scale, data, names)
    if not axes:
        return scale
    # `lax.pmax` (not the bare primitive): under check_vma it first marks a replicated
    # scale as varying, as the primitive requires.
    return lax.pmax(jnp.asarray(scale), tuple(axes), axis_index_groups=groups)


def _sqrt_factor(n: int) -> np.ndarray:
    """``pow2(sqrt(n))`` as a static scale (1 for ``n <= 1``)."""
    return pow2_round(np.sqrt(np.asarray(max(int(n), 1), scale_dtype())))


def _times(scale: Any, factor: np.ndarray) -> Any:
    if factor == 1:
        return scale
    if is_static(scale):
        return np.asarray(scale * factor, scale_dtype())
    return scale * jnp.asarray(factor, jnp.result_type(scale))


def _bind(prim: Any, x: Any, params: dict) -> Any:
    out = prim.bind(x, **params)
    return out[0] if prim.multiple_results else out


# --- sums --------------------------------------------------------------------------------


def _scaled_sum(prim: Any, x: Any, names: Sequence[Any], groups: Any, local: int,
                params: dict) -> Any:
    """Shared body of psum and psum_scatter (see the module docstring)."""
    if not isinstance(x, ScaledArray):
        return _bind(prim, as_jax(x), params)
    s = _agree(x.scale, x.data, names, groups)
    acc = _bind(prim, in_scale(x, s, compute_dtype(x.dtype)), params)
    factor = _sqrt_factor(_group_size(names, groups) * local)
    if factor != 1:
        acc = acc * np.asarray(1 / factor, acc.dtype)
    return ScaledArray(saturating_cast(acc, x.dtype), _times(s, factor))


def _psum(prim: Any, operands: Sequence[Any], axes: Any, groups: Any, params: dict) -> Any:
    outs = []
    for x in operands:
        shape = np.shape(x.data if isinstance(x, ScaledArray) else x)
        local = int(np.prod([shape[a] for a in _positional(axes)], dtype=np.int64))
        outs.append(_scaled_sum(prim, x, _names(axes), groups, local, params))
    return outs if prim.multiple_results else outs[0]


@register_scaled_op(P.psum_p)
def psum(*operands: Any, axes: Any, axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.psum`: the devices' data aligned to their common scale ``s_c = pmax(s)``,
    summed in float32, divided by ``pow2(sqrt(n))`` and rounded once; output scale
    ``s_c * pow2(sqrt(n))``, ``n`` the number of terms (devices in the axis group, times
    the sizes of positional axes). Unit scaling: a sum of ``n`` unit-variance terms has
    variance ``n``. `lax.pmean` is this psum followed by a division."""
    params = dict(params, axes=axes, axis_index_groups=axis_index_groups)
    return _psum(P.psum_p, operands, axes, axis_index_groups, params)


if _psum_invariant_p is not None:

    @register_scaled_op(_psum_invariant_p)
    def psum_invariant(*operands: Any, axes: Any, **params: Any) -> Any:
        """`lax.psum` under ``shard_map(check_vma=True)`` (a varying input, a replicated
        output): as `psum`, ``s_c * pow2(sqrt(n))`` with ``s_c = pmax(s)``."""
        return _psum(_psum_invariant_p, operands, axes, None, dict(params, axes=axes))


if _reduce_scatter_p is not None:

    @register_scaled_op(_reduce_scatter_p)
    def psum_scatter(x: Any, *, axis_name: Any, axis_index_groups: Any = None,
                     **params: Any) -> Any:
        """`lax.psum_scatter` (reduce-scatter): as `psum`, each device keeping its slice
        of the sum; data aligned to ``s_c = pmax(s)``, summed in float32, output scale
        ``s_c * pow2(sqrt(n))``, ``n`` the number of devices summed over."""
        params = dict(params, axis_name=axis_name, axis_index_groups=axis_index_groups)
        return _scaled_sum(_reduce_scatter_p, x, _names(axis_name), axis_index_groups, 1, params)


# --- selections and data movement ---------------------------------------------------------


def _aligned(prim: Any, x: Any, axis: Any, groups: Any, params: dict) -> Any:
    """``prim`` on ``x``'s data aligned to its devices' common scale over ``axis`` (in
    the data dtype: an exact power-of-two shift, rounded once); output at that scale."""
    if not isinstance(x, ScaledArray):
        return _bind(prim, as_jax(x), params)
    s = _agree(x.scale, x.data, _names(axis), groups)
    return ScaledArray(_bind(prim, in_scale(x, s, x.dtype), params), s)


@register_scaled_op(P.pmax_p)
def pmax(*operands: Any, axes: Any, axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.pmax`: data aligned to the devices' common scale ``s_c = pmax(s)`` (a
    positive scale keeps the order), maximum taken on the data; output scale ``s_c``."""
    params = dict(params, axes=axes, axis_index_groups=axis_index_groups)
    outs = [_aligned(P.pmax_p, x, axes, axis_index_groups, params) for x in operands]
    return outs if P.pmax_p.multiple_results else outs[0]


@register_scaled_op(P.pmin_p)
def pmin(*operands: Any, axes: Any, axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.pmin`: as `pmax`, at the devices' common (largest) scale ``s_c``."""
    params = dict(params, axes=axes, axis_index_groups=axis_index_groups)
    outs = [_aligned(P.pmin_p, x, axes, axis_index_groups, params) for x in operands]
    return outs if P.pmin_p.multiple_results else outs[0]


@register_scaled_op(P.all_gather_p)
def all_gather(x: Any, *, axis_name: Any, axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.all_gather`: the gathered blocks come from every device, so they are
    aligned to the common scale ``s_c = pmax(s)`` (as `concatenate` aligns to the
    largest scale) and gathered in the data dtype; output scale ``s_c``."""
    params = dict(params, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return _aligned(P.all_gather_p, x, axis_name, axis_index_groups, params)


if _all_gather_invariant_p is not None:

    @register_scaled_op(_all_gather_invariant_p)
    def all_gather_invariant(x: Any, *, axis_name: Any, **params: Any) -> Any:
        """`lax.all_gather_invariant` (a replicated result under ``check_vma``): as
        `all_gather`, blocks aligned to ``s_c = pmax(s)``, output scale ``s_c``."""
        params = dict(params, axis_name=axis_name)
        return _aligned(_all_gather_invariant_p, x, axis_name, None, params)


@register_scaled_op(P.all_to_all_p)
def all_to_all(x: Any, *, axis_name: Any, axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.all_to_all`: every device receives blocks from every other, so the data are
    aligned to the common scale ``s_c = pmax(s)`` and exchanged in the data dtype;
    output scale ``s_c``."""
    params = dict(params, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return _aligned(P.all_to_all_p, x, axis_name, axis_index_groups, params)


@register_scaled_op(P.ragged_all_to_all_p)
def ragged_all_to_all(operand: Any, output: Any, *offsets_and_sizes: Any, axis_name: Any,
                      axis_index_groups: Any = None, **params: Any) -> Any:
    """`lax.ragged_all_to_all`: rows of every device's ``operand`` land in the
    receivers' ``output`` buffers (whose other rows are kept), so both are aligned to
    the common scale ``s_c = pmax(max(s_operand, s_output))`` over the devices (a
    scale-free ``output`` such as zeros takes the operand's) and moved in the data
    dtype; output scale ``s_c``. Offsets and sizes are plain integers."""
    params = dict(params, axis_name=axis_name, axis_index_groups=axis_index_groups)
    dtype = np.dtype((operand if not is_static(operand) else output).dtype)
    local = common_scale(operand, output)
    data = operand.data if isinstance(operand, ScaledArray) else output
    s = _agree(local, data, _names(axis_name), axis_index_groups)
    out = P.ragged_all_to_all_p.bind(in_scale(operand, s, dtype), in_scale(output, s, dtype),
                                     *[as_jax(v) for v in offsets_and_sizes], **params)
    return ScaledArray(out, s)


def _moved_scale(move: Any, x: ScaledArray, names: Sequence[Any], receives_all: bool) -> Any:
    """The scale that arrives with ``x``'s data when values move between devices:
    ``x``'s own when it is the same everywhere, else the scale moved too by ``move``
    (a `lax` function, which handles replicated inputs under check_vma); 1 where a
    device receives nothing (its data is zeros)."""
    if not _varying(x.scale, x.data, names):
        return x.scale
    s = move(jnp.asarray(x.scale))
    if not receives_all:
        s = jnp.where(s > 0, s, jnp.ones_like(s))
    return s


@register_scaled_op(P.ppermute_p)
def ppermute(x: Any, *, axis_name: Any, perm: Any, **params: Any) -> Any:
    """`lax.ppermute`: values move between devices whole, so the data is sent in its
    own dtype and a per-device scale is sent with it (no alignment needed); a device
    that no pair sends to receives zeros, at scale 1."""
    params = dict(params, axis_name=axis_name, perm=perm)
    if not isinstance(x, ScaledArray):
        return _bind(P.ppermute_p, as_jax(x), params)
    names = _names(axis_name)
    receives_all = len({dst for _, dst in perm}) == _group_size(names, None)
    s = _moved_scale(lambda v: lax.ppermute(v, axis_name, perm), x, names, receives_all)
    return ScaledArray(_bind(P.ppermute_p, as_jax(x.data), params), s)


if _pbroadcast_p is not None:

    @register_scaled_op(_pbroadcast_p)
    def pbroadcast(x: Any, *, axis_name: Any, **params: Any) -> Any:
        """`lax.pbroadcast`: every device receives the ``source`` device's value, data
        and scale together (no alignment needed)."""
        params = dict(params, axis_name=axis_name)
        if not isinstance(x, ScaledArray):
            return _bind(_pbroadcast_p, as_jax(x), params)
        move = lambda v: lax.pbroadcast(v, axis_name, params["source"])  # noqa: E731
        s = _moved_scale(move, x, _names(axis_name), True)
        return ScaledArray(_bind(_pbroadcast_p, as_jax(x.data), params), s)


if _pvary_p is not None:

    @register_scaled_op(_pvary_p)
    def pvary(x: Any, **params: Any) -> Any:
        """JAX's ``pvary`` (a replicated value used as a per-device one, inserted under
        ``check_vma=True``): a type cast of the data, the scale kept as it is (a
        replicated scale combines with varying data)."""
        if not isinstance(x, ScaledArray):
            return _bind(_pvary_p, as_jax(x), params)
        return ScaledArray(_bind(_pvary_p, as_jax(x.data), params), x.scale)


# --- shard_map ----------------------------------------------------------------------------


def _dummy_scale() -> Any:
    return jnp.ones((), scale_dtype())


if _shard_map_p is not None:

    @register_scaled_op(_shard_map_p)
    def shard_map(*operands: Any, jaxpr: Any, mesh: Any, in_specs: Sequence[Any],
                  out_specs: Sequence[Any], check_vma: bool = True,
                  newly_manual_axes: Any = frozenset(), **params: Any) -> List[Any]:
        """``jax.shard_map`` (and ``jax.pmap``, built on it): the scalified body run
        under ``jax.shard_map`` with the same mesh, manual axes and ``check_vma``. A
        ScaledArray is split into its data, sharded as its spec says, and its scale, a
        replicated scalar (``P()``); a static scale is closed over. Each device's
        outputs may come with a different scale: before leaving the body they are
        aligned to their common scale ``pmax(s)`` over the manual axes (a scalar
        collective; none for static or, under ``check_vma``, replicated scales), so the
        global result is one ScaledArray with a replicated scale. Other parameters of
        the equation have no public counterpart and are not forwarded."""
        del params
        manual = tuple(a for a in mesh.axis_names if a in newly_manual_axes) or tuple(mesh.axis_names)
        leaves: List[Any] = []
        leaf_specs: List[Any] = []
        template: List[Any] = []  # per operand: (kind, static scale or None)
        for x, spec in zip(operands, in_specs):
            if isinstance(x, ScaledArray):
                leaves.append(as_jax(x.data))
                leaf_specs.append(spec)
                if is_static(x.scale):
                    template.append(("static", x.scale))
                else:
                    leaves.append(x.scale)
                    leaf_specs.append(PartitionSpec())
                    template.append(("traced", None))
            else:
                leaves.append(as_jax(x))
                leaf_specs.append(spec)
                template.append(("plain", None))
        kinds: List[Any] = []

        def body(*flat: Any) -> Tuple[Any, ...]:
            it = iter(flat)
            ops = []
            for kind, s in template:
                if kind == "plain":
                    ops.append(next(it))
                elif kind == "static":
                    ops.append(ScaledArray(next(it), s))
                else:
                    d = next(it)
                    ops.append(_scaled_leaves(d, next(it)))
            out: List[Any] = []
            kinds.clear()
            for o in eval_jaxpr(jaxpr, (), *ops):
                if not isinstance(o, ScaledArray):
                    kinds.append(("plain", None))
                    out += [as_jax(o), _dummy_scale()]
                elif is_static(o.scale):
                    kinds.append(("static", o.scale))
                    out += [as_jax(o.data), _dummy_scale()]
                else:
                    s = _agree(o.scale, o.data, manual)
                    kinds.append(("traced", None))
                    out += [in_scale(o, s, o.dtype), jnp.asarray(s, scale_dtype())]
            return tuple(out)

        flat_out_specs = []
        for spec in out_specs:
            flat_out_specs += [spec, PartitionSpec()]
        fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(leaf_specs),
                           out_specs=tuple(flat_out_specs), axis_names=frozenset(manual),
                           check_vma=check_vma)
        flat_out = fn(*leaves)
        results = []
        for i, (kind, s) in enumerate(kinds):
            value, scale = flat_out[2 * i], flat_out[2 * i + 1]
            if kind == "plain":
                results.append(value)
            elif kind == "static":
                results.append(ScaledArray(value, s))
            else:
                results.append(_scaled_leaves(value, scale))
        return results


def _scaled_leaves(data: Any, scale: Any) -> ScaledArray:
    """A ScaledArray of traced leaves, unchecked (the scale is a tracer)."""
    return jax.tree.unflatten(jax.tree.structure(ScaledArray(np.zeros((), np.float32), one())),
                              [data, scale])
