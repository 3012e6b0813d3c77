"""Scaled rules of data-movement primitives.

Moving, copying, reshaping or repeating elements does not change their magnitude, so
these rules apply the primitive to ``data`` with the equation's own parameters and keep
the ``scale``: the result is bit-exact. Primitives that gather several arrays into one
(``concatenate``, ``stack``, ``pad`` with a scaled padding value) first express every
operand in one common scale, the largest, so that no operand overflows the data format.
Operands at distinct traced scales are aligned in float32 and the result rounded with
its largest element at the top of the format (`gather_aligned`): the smaller operands'
elements keep the format's whole range below it instead of flushing, since a later
``log`` or ``rsqrt`` of a flushed element would be infinite.

``transpose`` takes a `Deferred` operand of every kind and keeps its pending work
pending where the kind carries a transpose (`Deferred.map_layout`): a float32
contraction's division (`scalify.rules.linalg.Rescaled`), so that XLA still folds
``transpose(dot_general)``. ``reshape``, ``broadcast_in_dim`` and ``squeeze`` take an
elementwise chain's float32 result (`scalify.core.wide.Wide`) and carry it through
unrounded, so that a chain broken only by a broadcast (a layer norm's statistics, a
bias) still rounds and guards once.

``iota`` creates integers and never meets a ScaledArray: it needs no rule.
"""
from __future__ import annotations

from typing import Any, List

import jax
from jax import lax

from scalify.core.config import narrow_contractions
from scalify.core.datatype import ScaledArray
from scalify.core.operands import Wide, as_jax, gather_aligned, gathered_result, in_scale, out_dtype
from scalify.core.pow2 import is_static
from scalify.core.registry import register_scaled_op
from scalify.rules.same_scale import keep_scale

# --- one operand, same scale (`keep_scale`) ------------------------------------------


@register_scaled_op(lax.reshape_p, takes_deferred=(Wide,))
def reshape(x: Any, *rest: Any, **params: Any) -> Any:
    """Reshape the data, keep the scale: the elements, hence their magnitude, are
    unchanged (a `Wide` operand stays Wide).

    Where devices share the program (`narrow_contractions`) a Wide operand is rounded
    first: a reshape that splits or merges a sharded dimension is where XLA's SPMD
    partitioner moves data between devices, and it would move the float32 data (in the
    main job on a 4x2 mesh, the attention's query/key/value gradient crossed the model
    axis in float32, 2x bfloat16's bytes). Rounded, it crosses in the data format."""
    if isinstance(x, Wide) and narrow_contractions():
        x = x.materialise()
    return keep_scale(lax.reshape_p, x, *rest, **params)


@register_scaled_op(lax.broadcast_in_dim_p, takes_deferred=(Wide,))
def broadcast_in_dim(x: Any, *rest: Any, **params: Any) -> Any:
    """Broadcast the data, keep the scale: repeated elements have the same magnitude
    (a `Wide` operand stays Wide).

    This is also how ``jnp.expand_dims`` and ``x[None]`` reach the jaxpr (there is no
    ``expand_dims`` primitive)."""
    return keep_scale(lax.broadcast_in_dim_p, x, *rest, **params)


@register_scaled_op(lax.transpose_p, takes_deferred=True)
def transpose(x: Any, **params: Any) -> Any:
    """Permute the data's axes, keep the scale. A `Deferred` operand of a kind that
    carries the transpose (`Deferred.map_layout`) stays deferred: a contraction's
    pending division by ``pow2(sqrt(K))``, so that XLA sees ``transpose(dot_general)``
    and folds the transpose into the contraction (every weight gradient has this form).
    A `Wide` operand (an elementwise chain's float32 result) stays Wide."""
    return keep_scale(lax.transpose_p, x, **params)


@register_scaled_op(lax.squeeze_p, takes_deferred=(Wide,))
def squeeze(x: Any, **params: Any) -> Any:
    """Drop unit axes of the data, keep the scale (a `Wide` operand stays Wide)."""
    return keep_scale(lax.squeeze_p, x, **params)


@register_scaled_op(lax.slice_p)
def slice(x: ScaledArray, **params: Any) -> ScaledArray:  # noqa: A001 - primitive's name
    """Slice the data (starts, limits, strides from the equation), keep the scale.

    The scale is not re-fitted to the slice: a slice of unit-variance data is itself
    near unit variance, and re-fitting would cost a reduction on device."""
    return keep_scale(lax.slice_p, x, **params)


@register_scaled_op(lax.rev_p)
def rev(x: ScaledArray, **params: Any) -> ScaledArray:
    """Reverse the data along the equation's dimensions, keep the scale."""
    return keep_scale(lax.rev_p, x, **params)


@register_scaled_op(lax.copy_p)
def copy(x: ScaledArray, **params: Any) -> ScaledArray:
    """Copy the data (``jnp.copy``, ``jnp.array(x, copy=True)``), keep the scale."""
    return keep_scale(lax.copy_p, x, **params)


@register_scaled_op(lax.tile_p)
def tile(x: ScaledArray, **params: Any) -> ScaledArray:
    """Tile the data (``jnp.tile``), keep the scale: the elements are repeated as they are."""
    return keep_scale(lax.tile_p, x, **params)


@register_scaled_op(lax.sharding_constraint_p)
def sharding_constraint(x: ScaledArray, **params: Any) -> ScaledArray:
    """Constrain the data's sharding, keep the scale.

    The scale is a scalar: the compiler replicates it on every device, so it needs no
    constraint (and a spec naming mesh axes would not even fit its rank)."""
    return keep_scale(lax.sharding_constraint_p, x, **params)


@register_scaled_op(lax.split_p)
def split(x: ScaledArray, **params: Any) -> List[ScaledArray]:
    """Split the data into pieces (``jnp.split``), each keeping the scale."""
    return [ScaledArray(d, x.scale) for d in lax.split_p.bind(as_jax(x.data), **params)]


@register_scaled_op(lax.unstack_p)
def unstack(x: ScaledArray, **params: Any) -> List[ScaledArray]:
    """Unstack the data along an axis, each piece keeping the scale."""
    return [ScaledArray(d, x.scale) for d in lax.unstack_p.bind(as_jax(x.data), **params)]


# --- several operands, one common scale ---------------------------------------------


@register_scaled_op(lax.concatenate_p)
def concatenate(*xs: Any, **params: Any) -> ScaledArray:
    """Concatenate at the largest operand scale.

    All operands are re-expressed in the largest scale (plain and static operands mix
    in; a static ``0``/``-inf`` block adopts it) so that none overflows; operands
    already at that scale are not touched. Equal scales make the result bit-exact.
    Distinct traced scales of a narrow format: aligned in float32 and rounded with the
    result's max-abs at the top of the guard band (`gather_aligned`), so the smaller
    operands keep the format's whole range below the largest element (one max-abs)."""
    s, datas, mixed = gather_aligned(xs)
    return gathered_result(lax.concatenate_p.bind(*datas, **params), s, out_dtype(*xs), mixed)


@register_scaled_op(lax.stack_p)
def stack(*xs: Any, **params: Any) -> ScaledArray:
    """Stack along a new axis (``jnp.stack``) at the largest operand scale, as
    `concatenate` does."""
    s, datas, mixed = gather_aligned(xs)
    return gathered_result(lax.stack_p.bind(*datas, **params), s, out_dtype(*xs), mixed)


@register_scaled_op(lax.pad_p)
def pad(x: Any, padding_value: Any, **params: Any) -> ScaledArray:
    """Pad the data, keeping the operand's scale unless the padding value is scaled.

    - scale-free static padding (``0``, ``-inf``): used as it is, in the operand's scale;
    - a static non-zero or traced plain padding value: expressed in the operand's
      scale (``value / scale``), so the operand's data is untouched; a padding value far
      from the operand's magnitude may then round, underflow or overflow in the data
      format, as any other element of that magnitude would;
    - a scaled padding value (or a plain operand padded with a scaled value): both are
      aligned to the larger of the two scales, as in `concatenate`.
    """
    if isinstance(padding_value, ScaledArray):
        s, (d, v), mixed = gather_aligned((x, padding_value))
        return gathered_result(lax.pad_p.bind(d, v, **params), s, out_dtype(x, padding_value), mixed)
    s, d = x.scale, as_jax(x.data)
    v = in_scale(padding_value, s, x.dtype)
    return ScaledArray(lax.pad_p.bind(d, v, **params), s)


# --- placement ----------------------------------------------------------------------


def _scalar_target(target: Any) -> Any:
    """Where a scalar scale goes when its data goes to ``target``.

    Devices, memory spaces and ``None`` fit any shape and are reused; a `NamedSharding`
    becomes the replicated sharding of the same mesh (a scalar has no axis to shard);
    for any other sharding there is no general scalar counterpart: the scale stays
    where it is (returned as ``False``)."""
    if isinstance(target, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            target.mesh, jax.sharding.PartitionSpec(), memory_kind=target.memory_kind
        )
    if isinstance(target, jax.sharding.SingleDeviceSharding):
        return target
    if isinstance(target, jax.sharding.Sharding):
        return False
    return target


@register_scaled_op(lax.device_put_p)
def device_put(*xs: Any, devices: Any, srcs: Any, copy_semantics: Any, **params: Any) -> List[Any]:
    """Put each data on its target device/sharding and its scale alongside it.

    ``jax.device_put`` takes several arrays at once: each ScaledArray contributes its
    data (with the target as given) and its scale (replicated on the same devices, see
    `_scalar_target`), so that eager code does not mix arrays on different devices.
    Static scales are left static: they are placed wherever the program needs them."""
    flat: List[Any] = []
    devs: List[Any] = []
    srcs_out: List[Any] = []
    sems: List[Any] = []
    layout: List[Any] = []  # per input: None (plain), or (moves_scale,)
    for x, dev, src, sem in zip(xs, devices, srcs, copy_semantics):
        if isinstance(x, ScaledArray):
            flat.append(as_jax(x.data))
            devs.append(dev), srcs_out.append(src), sems.append(sem)
            sdev, ssrc = _scalar_target(dev), _scalar_target(src)
            moves = not is_static(x.scale) and sdev is not False
            if moves:
                flat.append(x.scale)
                devs.append(sdev), srcs_out.append(None if ssrc is False else ssrc)
                sems.append(sem)
            layout.append((moves,))
        else:
            flat.append(as_jax(x))
            devs.append(dev), srcs_out.append(src), sems.append(sem)
            layout.append(None)
    outs = iter(
        lax.device_put_p.bind(
            *flat, devices=tuple(devs), srcs=tuple(srcs_out), copy_semantics=tuple(sems), **params
        )
    )
    results: List[Any] = []
    for x, kind in zip(xs, layout):
        if kind is None:
            results.append(next(outs))
        else:
            data = next(outs)
            results.append(ScaledArray(data, next(outs) if kind[0] else x.scale))
    return results
