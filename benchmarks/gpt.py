"""A small decoder-only transformer (GPT) in plain JAX, shared by the benchmarks.

Pre-LN blocks scanned over layers (`jax.lax.scan`), multi-head causal attention (batched
`dot_general`), token and position embeddings (gather), GELU MLP, tied nothing. Written
with `jax.numpy` only so that `scalify` sees the everyday primitives of a real model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 96
    seq_len: int = 64
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


PRESETS = {
    "tiny": GPTConfig(vocab=96, seq_len=32, d_model=64, n_heads=2, n_layers=2),
    "small": GPTConfig(),
    "gpt2-small": GPTConfig(vocab=50304, seq_len=1024, d_model=768, n_heads=12, n_layers=12),
}


def init_params(key: Any, cfg: GPTConfig) -> Dict[str, Any]:
    """Unit-scaled-friendly init: weights ~ N(0, 1/fan_in)."""
    d, L = cfg.d_model, cfg.n_layers
    ks = jax.random.split(key, 8)

    def normal(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)

    return {
        "tok_emb": jax.random.normal(ks[0], (cfg.vocab, d), jnp.float32),
        "pos_emb": jax.random.normal(ks[1], (cfg.seq_len, d), jnp.float32) * 0.1,
        "blocks": {
            "ln1_g": jnp.ones((L, d)), "ln1_b": jnp.zeros((L, d)),
            "wqkv": normal(ks[2], (L, d, 3 * d), d),
            "wo": normal(ks[3], (L, d, d), d) / np.sqrt(2 * L),
            "ln2_g": jnp.ones((L, d)), "ln2_b": jnp.zeros((L, d)),
            "w1": normal(ks[4], (L, d, 4 * d), d),
            "w2": normal(ks[5], (L, 4 * d, d), 4 * d) / np.sqrt(2 * L),
        },
        "lnf_g": jnp.ones((d,)), "lnf_b": jnp.zeros((d,)),
        "head": normal(ks[6], (d, cfg.vocab), d),
    }


def layer_norm(x: Any, g: Any, b: Any, eps: float = 1e-5) -> Any:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def attention(x: Any, wqkv: Any, wo: Any, n_heads: int) -> Any:
    B, T, D = x.shape
    qkv = jnp.einsum("btd,de->bte", x, wqkv).reshape(B, T, 3, n_heads, D // n_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / float(np.sqrt(D // n_heads)))
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, D)
    return jnp.einsum("btd,de->bte", out, wo)


def forward(params: Dict[str, Any], tokens: Any, cfg: GPTConfig, batch_sharding: Any = None) -> Any:
    """Logits ``(batch, seq, vocab)``. ``batch_sharding`` (a `jax.sharding.Sharding` of the
    batch dimension, e.g. ``NamedSharding(mesh, P("data"))``) pins the residual stream to
    it, as FSDP wants: otherwise XLA's sharding propagation may carry the weights'
    FSDP sharding into the activations' feature dimension and all-reduce activations
    instead of gathering weights."""
    pin = (lambda x: x) if batch_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding))
    T = tokens.shape[1]
    x = pin(params["tok_emb"][tokens] + params["pos_emb"][:T])

    def block(x, p):
        x = pin(x + attention(layer_norm(x, p["ln1_g"], p["ln1_b"]), p["wqkv"], p["wo"], cfg.n_heads))
        h = jax.nn.gelu(jnp.einsum("btd,df->btf", layer_norm(x, p["ln2_g"], p["ln2_b"]), p["w1"]))
        return pin(x + jnp.einsum("btf,fd->btd", h, p["w2"])), None

    x, _ = jax.lax.scan(block, x, params["blocks"])
    x = pin(layer_norm(x, params["lnf_g"], params["lnf_b"]))
    return jnp.einsum("btd,dv->btv", x, params["head"])


def loss_fn(params: Dict[str, Any], tokens: Any, targets: Any, cfg: GPTConfig, batch_sharding: Any = None) -> Any:
    """Mean next-token cross-entropy."""
    logp = jax.nn.log_softmax(forward(params, tokens, cfg, batch_sharding), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
