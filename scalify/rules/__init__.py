"""Scaled rules, one module per primitive family. Importing this package registers them."""
from scalify.rules import (  # noqa: F401
    collectives,
    control_flow,
    elementwise,
    folding,
    indexing,
    linalg,
    reductions,
    shape,
)
