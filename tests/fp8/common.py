"""Shared by the tests of `scalify.fp8`.

The oracle is plain float32 JAX. Float8 results are compared within float8 tolerance
(E4M3 operands: ~2^-4 relative rounding each; E5M2 cotangents: ~2^-3), and every
numerical test also checks that float8 really happened (the error is not float32's).
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import scalify as sfy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks"))
import gpt  # noqa: E402

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"


def normal(shape, seed, scale=1.0):
    """Test data from NumPy (eager `jax.random` compiles a program per shape)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def init_gpt(cfg):
    return jax.jit(gpt.init_params, static_argnums=1)(jax.random.key(0), cfg)


def rel_err(got, want):
    got = np.asarray(sfy.asarray(got, dtype=jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def tree_rel_errs(got, want):
    got = sfy.asarray(got, dtype=jnp.float32)
    return {
        jax.tree_util.keystr(path): rel_err(g, w)
        for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got))
    }


# A one-layer transformer: a scan over layers, attention, embeddings and a head.
CFG = gpt.GPTConfig(vocab=80, seq_len=16, d_model=32, n_heads=2, n_layers=1)


def gpt_loss(p, t, y):
    return gpt.loss_fn(p, t, y, CFG)
