"""Scaled rules of reductions primitives."""
