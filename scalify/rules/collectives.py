"""Scaled rules of collective primitives (shard_map / pmap)."""
