"""Scaled rules, one module per primitive family. Importing this package registers them."""
from scalify.rules import elementwise  # noqa: F401
