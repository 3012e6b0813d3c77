"""Scaled rules of shape primitives."""
