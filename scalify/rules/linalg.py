"""Scaled rules of linalg primitives."""
