"""Dynamic rescaling: move the data's norm into the scale.

``dynamic_rescale_l2(x)`` returns a ScaledArray of the same value whose data has unit
root-mean-square (up to the power-of-two rounding of the norm): ``scale' = scale *
pow2(norm)`` and ``data' = data / pow2(norm)``. ``_l1`` uses the mean magnitude and
``_max`` the largest magnitude (after which ``|data| < 2``, safe for any format). The
``_grad`` variants do the same to the gradient only (identity on the forward pass).

- Inside `scalify`: the rescaling happens on the ScaledArray (a plain array stays plain:
  it has no scale to move the norm into).
- Outside `scalify`: a ScaledArray is rescaled directly; a plain array is unchanged.

Epsilon floor: a norm below the smallest normal float32 (an all-zero tensor) or not
finite (NaN/inf data) counts as 1, so such a tensor keeps its scale; and the new scale
is clipped to the normal range of the scale dtype. The scale never becomes zero or
infinite (see `scalify.lax.scaling.rescale_by_norm`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.interpreters import ad

from scalify.core.datatype import ScaledArray
from scalify.core.registry import register_scaled_op
from scalify.lax._primitive import define_primitive
from scalify.lax.scaling import rescale_by_norm
from scalify.ops._backward import bound, map_on_backward_data

__all__ = [
    "dynamic_rescale_l1",
    "dynamic_rescale_l2",
    "dynamic_rescale_max",
    "dynamic_rescale_l1_grad",
    "dynamic_rescale_l2_grad",
    "dynamic_rescale_max_grad",
]

# Under vmap the batch shares one ScaledArray, hence one norm over the whole batch.
dynamic_rescale_p = define_primitive(
    "scalify_dynamic_rescale", lambda x, *, norm: x, lambda x, *, norm: x, elementwise=True
)


def _jvp(primals: Any, tangents: Any, *, norm: str) -> Any:
    # The value is unchanged, so is the tangent (rescaling gradients: the _grad variants).
    return dynamic_rescale_p.bind(primals[0], norm=norm), tangents[0]


ad.primitive_jvps[dynamic_rescale_p] = _jvp


def _rescale(x: ScaledArray, norm: str) -> ScaledArray:
    data, scale = rescale_by_norm(x.data, x.scale, norm)
    return ScaledArray(data, scale)


@register_scaled_op(dynamic_rescale_p)
def _dynamic_rescale_rule(x: Any, *, norm: str, **params: Any) -> Any:
    """Same value, norm of the data moved into the scale: ``scale * pow2(norm)``, data
    divided by ``pow2(norm)`` in float32 (exact for a power of two). The norm is a
    runtime value, so the new scale is dynamic."""
    if not isinstance(x, ScaledArray):
        return x
    return _rescale(x, norm)


def _dynamic_rescale(x: Any, norm: str) -> Any:
    if isinstance(x, ScaledArray):
        return _rescale(x, norm)
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    return dynamic_rescale_p.bind(x, norm=norm)


def dynamic_rescale_l1(x: Any) -> Any:
    """Move the mean magnitude of the data into the scale (value unchanged)."""
    return _dynamic_rescale(x, "l1")


def dynamic_rescale_l2(x: Any) -> Any:
    """Move the root-mean-square of the data into the scale (value unchanged)."""
    return _dynamic_rescale(x, "l2")


def dynamic_rescale_max(x: Any) -> Any:
    """Move the largest magnitude of the data into the scale (value unchanged)."""
    return _dynamic_rescale(x, "max")


def _rescale_ct(ct: Any, norm: str) -> Any:
    return dynamic_rescale_p.bind(ct, norm=norm)


def _grad_variant(x: Any, norm: str) -> Any:
    if not isinstance(x, ScaledArray) and not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    return map_on_backward_data(bound(_rescale_ct, norm), x)


def dynamic_rescale_l1_grad(x: Any) -> Any:
    """Identity on the forward pass; `dynamic_rescale_l1` on the gradient."""
    return _grad_variant(x, "l1")


def dynamic_rescale_l2_grad(x: Any) -> Any:
    """Identity on the forward pass; `dynamic_rescale_l2` on the gradient."""
    return _grad_variant(x, "l2")


def dynamic_rescale_max_grad(x: Any) -> Any:
    """Identity on the forward pass; `dynamic_rescale_max` on the gradient."""
    return _grad_variant(x, "max")
