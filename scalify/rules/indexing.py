"""Scaled rules of indexing primitives."""
