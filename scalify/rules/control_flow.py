"""Scaled rules of control_flow primitives."""
