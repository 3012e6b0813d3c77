"""User-facing ops: casts, dynamic rescaling, debug.

Each works inside `scalify` (on ScaledArrays, through its own primitive and scaled
rule) and outside it (on ScaledArrays and plain arrays, eagerly and under `jax.jit`).
The ``_grad`` / ``_on_backward`` variants act on gradients only (identity forward).
"""
from scalify.ops.cast import (  # noqa: F401
    cast_on_backward,
    cast_on_forward,
    reduce_precision_on_backward,
    reduce_precision_on_forward,
)
from scalify.ops.debug import (  # noqa: F401
    debug_callback,
    debug_callback_grad,
    debug_print,
    debug_print_grad,
)
from scalify.ops.rescaling import (  # noqa: F401
    dynamic_rescale_l1,
    dynamic_rescale_l1_grad,
    dynamic_rescale_l2,
    dynamic_rescale_l2_grad,
    dynamic_rescale_max,
    dynamic_rescale_max_grad,
)

__all__ = [
    "cast_on_forward",
    "cast_on_backward",
    "reduce_precision_on_forward",
    "reduce_precision_on_backward",
    "dynamic_rescale_l1",
    "dynamic_rescale_l2",
    "dynamic_rescale_max",
    "dynamic_rescale_l1_grad",
    "dynamic_rescale_l2_grad",
    "dynamic_rescale_max_grad",
    "debug_callback",
    "debug_callback_grad",
    "debug_print",
    "debug_print_grad",
]
