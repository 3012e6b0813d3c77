"""Scaled rules, one module per primitive family. Importing this package registers them.

`same_scale` holds the body of every rule that keeps its operand's scale.
"""
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
