"""scalify: end-to-end scale propagation for JAX.

``scalify(fn)`` re-interprets every primitive of ``fn`` on `ScaledArray` values
(``data * scale``, with a power-of-two ``scale``) so that data stays near unit variance
in float16 or float8 while the scale carries the magnitude.
"""
from scalify import rules as _rules  # noqa: F401  (registers the scaled rules)
from scalify import checkpoint, fp8, lax, ops, optim, telemetry, tree  # noqa: F401
from scalify.core import (
    Pow2RoundMode,
    ScaledArray,
    ScalifyConfig,
    UnsupportedPrimitiveError,
    as_scaled_array,
    asarray,
    scaled_array,
    scalify,
)

__version__ = "0.1.0"
