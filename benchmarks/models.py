"""Standard decoder-only language models of three communities, for the benchmarks and tests.

Each family is written the way its community writes it, with the library's own layers,
unmodified:

  gpt      benchmarks/gpt.py: plain `jax.numpy`, blocks scanned with `lax.scan`
  gpt2     GPT-2 in Flax **linen**: learned position embeddings, tied input/output
           embedding (`nn.Embed.attend`), pre-LN blocks (`nn.LayerNorm`),
           `nn.MultiHeadDotProductAttention` with a causal mask, `jax.nn.gelu` MLP (its
           default tanh approximation, GPT-2's "gelu_new"), `nn.Dense`, N(0, 0.02) init
           (residual projections 0.02 / sqrt(2 L), as in GPT-2)
  llama    Llama in Flax **NNX**: `nnx.RMSNorm`, rotary position embeddings on queries and
           keys, causal `nnx.dot_product_attention`, SwiGLU MLP (`jax.nn.silu` gate),
           untied output head, no biases, N(0, 0.02) init
  equinox  an Equinox transformer of `eqx.nn` layers: `eqx.nn.Embedding` (tokens and
           learned positions), `eqx.nn.LayerNorm`, `eqx.nn.MultiheadAttention`,
           `eqx.nn.Linear` GELU MLP, Equinox's default initialisations

All take the same configuration (`gpt.GPTConfig`: vocab, seq_len, d_model, n_heads,
n_layers) and expose one interface::

    model = models.build("llama", cfg, seed=0)
    model.params                                  # a pure pytree of float32 arrays
    model.loss_fn(params, tokens, targets)        # scalar mean next-token cross-entropy
    model.apply(params, tokens)                   # the logits (batch, seq, vocab)

``params`` holds only float arrays (`nnx.split` / `eqx.partition` / linen's variables
dict); the static rest of the model (graph definition, Equinox's non-array fields) is
closed over by ``loss_fn``, which merges them back inside, the usual functional pattern of
each library. So ``params`` can be cast, turned into `scalify.ScaledArray`s, handed to
optax and `jax.grad`, with no knowledge of the family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gpt
from gpt import GPTConfig

FAMILIES = ("gpt", "gpt2", "llama", "equinox")


@dataclasses.dataclass
class Model:
    """A family's float32 parameters and its pure loss."""

    family: str
    cfg: GPTConfig
    params: Any  # pure pytree of float32 arrays
    loss_fn: Callable[[Any, Any, Any], Any]  # (params, tokens, targets) -> mean cross-entropy
    apply: Callable[[Any, Any], Any]  # (params, tokens) -> logits (batch, seq, vocab)
    description: str = ""


def cross_entropy(logits: Any, targets: Any) -> Any:
    """Mean next-token cross-entropy, the way each community writes it (optax)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --------------------------------------------------------------------------------------
# GPT-2, Flax linen


class GPT2Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: Any, mask: Any) -> Any:
        std = 0.02
        proj_std = std / np.sqrt(2 * self.cfg.n_layers)  # GPT-2's scaled residual projections
        h = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.cfg.n_heads, kernel_init=nn.initializers.normal(std),
            out_kernel_init=nn.initializers.normal(proj_std), deterministic=True, name="attn")(h, mask=mask)
        x = x + h
        h = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
        h = nn.Dense(4 * self.cfg.d_model, kernel_init=nn.initializers.normal(std), name="c_fc")(h)
        h = jax.nn.gelu(h)  # approximate=True: GPT-2's "gelu_new"
        h = nn.Dense(self.cfg.d_model, kernel_init=nn.initializers.normal(proj_std), name="c_proj")(h)
        return x + h


class GPT2(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: Any) -> Any:
        cfg = self.cfg
        wte = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="wte")
        wpe = nn.Embed(cfg.seq_len, cfg.d_model, embedding_init=nn.initializers.normal(0.01), name="wpe")
        T = tokens.shape[1]
        x = wte(tokens) + wpe(jnp.arange(T)[None])
        mask = nn.make_causal_mask(tokens)
        for i in range(cfg.n_layers):
            x = GPT2Block(cfg, name=f"h_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
        return wte.attend(x)  # tied output embedding


def build_gpt2(cfg: GPTConfig, seed: int) -> Model:
    module = GPT2(cfg)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]

    def apply(params: Any, tokens: Any) -> Any:
        return module.apply({"params": params}, tokens)

    def loss_fn(params: Any, tokens: Any, targets: Any) -> Any:
        return cross_entropy(apply(params, tokens), targets)

    return Model("gpt2", cfg, params, loss_fn, apply, "GPT-2 (Flax linen): learned positions, tied embedding, "
                 "pre-LN, nn.MultiHeadDotProductAttention, gelu MLP")


# --------------------------------------------------------------------------------------
# Llama, Flax NNX


def rope(x: Any, positions: Any, base: float = 10000.0) -> Any:
    """Rotary position embedding of ``x`` (batch, seq, heads, head_dim), Llama's
    rotate-half convention."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (np.arange(half, dtype=np.float32) / half))
    angles = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # (seq, half)
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.q_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.k_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.v_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.o_proj = _linear(cfg.d_model, cfg.d_model, rngs)

    def __call__(self, x: Any, positions: Any, mask: Any) -> Any:
        B, T, D = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.d_head)
        k = self.k_proj(x).reshape(B, T, self.n_heads, self.d_head)
        v = self.v_proj(x).reshape(B, T, self.n_heads, self.d_head)
        q, k = rope(q, positions), rope(k, positions)
        out = nnx.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(out.reshape(B, T, D))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        hidden = 4 * cfg.d_model  # Llama's 8/3 d rounded up; 4 d keeps tiny shapes simple
        self.gate_proj = _linear(cfg.d_model, hidden, rngs)
        self.up_proj = _linear(cfg.d_model, hidden, rngs)
        self.down_proj = _linear(hidden, cfg.d_model, rngs)

    def __call__(self, x: Any) -> Any:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs)

    def __call__(self, x: Any, positions: Any, mask: Any) -> Any:
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=nnx.initializers.normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([LlamaBlock(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.lm_head = _linear(cfg.d_model, cfg.vocab, rngs)  # untied

    def __call__(self, tokens: Any) -> Any:
        positions = jnp.arange(tokens.shape[1])
        mask = nnx.make_causal_mask(tokens)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions, mask)
        return self.lm_head(self.norm(x))


def build_llama(cfg: GPTConfig, seed: int) -> Model:
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    params = nnx.to_pure_dict(state)  # nested dicts of float32 arrays

    def apply(params: Any, tokens: Any) -> Any:
        return nnx.merge(graphdef, params)(tokens)

    def loss_fn(params: Any, tokens: Any, targets: Any) -> Any:
        return cross_entropy(apply(params, tokens), targets)

    return Model("llama", cfg, params, loss_fn, apply, "Llama (Flax NNX): RMSNorm, rotary embeddings, SwiGLU, "
                 "untied head, no biases")


# --------------------------------------------------------------------------------------
# Equinox


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, cfg: GPTConfig, key: Any):
        k1, k2, k3 = jax.random.split(key, 3)
        d = cfg.d_model
        self.ln1 = eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(cfg.n_heads, d, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d)
        self.fc1 = eqx.nn.Linear(d, 4 * d, key=k2)
        self.fc2 = eqx.nn.Linear(4 * d, d, key=k3)

    def __call__(self, x: Any, mask: Any) -> Any:  # x: (seq, d), one sequence
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=mask)
        h = jax.vmap(self.fc1)(jax.vmap(self.ln2)(x))
        return x + jax.vmap(self.fc2)(jax.nn.gelu(h))


class EqxTransformer(eqx.Module):
    tok: eqx.nn.Embedding
    pos: eqx.nn.Embedding
    blocks: list
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, cfg: GPTConfig, key: Any):
        ks = jax.random.split(key, cfg.n_layers + 3)
        self.tok = eqx.nn.Embedding(cfg.vocab, cfg.d_model, key=ks[0])
        self.pos = eqx.nn.Embedding(cfg.seq_len, cfg.d_model, key=ks[1])
        self.blocks = [EqxBlock(cfg, k) for k in ks[3:]]
        self.ln_f = eqx.nn.LayerNorm(cfg.d_model)
        self.head = eqx.nn.Linear(cfg.d_model, cfg.vocab, key=ks[2])

    def __call__(self, tokens: Any) -> Any:  # tokens: (seq,), one sequence
        T = tokens.shape[0]
        x = jax.vmap(self.tok)(tokens) + jax.vmap(self.pos)(jnp.arange(T))
        mask = jnp.tril(jnp.ones((T, T), bool))
        for block in self.blocks:
            x = block(x, mask)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


def build_equinox(cfg: GPTConfig, seed: int) -> Model:
    params, static = eqx.partition(EqxTransformer(cfg, jax.random.PRNGKey(seed)), eqx.is_inexact_array)

    def apply(params: Any, tokens: Any) -> Any:
        return jax.vmap(eqx.combine(params, static))(tokens)

    def loss_fn(params: Any, tokens: Any, targets: Any) -> Any:
        return cross_entropy(apply(params, tokens), targets)

    return Model("equinox", cfg, params, loss_fn, apply, "Equinox transformer: eqx.nn.Embedding, LayerNorm, "
                 "MultiheadAttention, Linear gelu MLP")


# --------------------------------------------------------------------------------------
# The plain-JAX GPT of benchmarks/gpt.py


def build_gpt(cfg: GPTConfig, seed: int, batch_sharding: Any = None) -> Model:
    params = gpt.init_params(jax.random.PRNGKey(seed), cfg)

    def apply(params: Any, tokens: Any) -> Any:
        return gpt.forward(params, tokens, cfg, batch_sharding)

    def loss_fn(params: Any, tokens: Any, targets: Any) -> Any:
        return gpt.loss_fn(params, tokens, targets, cfg, batch_sharding)

    return Model("gpt", cfg, params, loss_fn, apply, "plain-JAX GPT (benchmarks/gpt.py): lax.scan over "
                 "pre-LN blocks")


BUILDERS: Dict[str, Callable[[GPTConfig, int], Model]] = {
    "gpt": build_gpt, "gpt2": build_gpt2, "llama": build_llama, "equinox": build_equinox,
}


def build(family: str, cfg: GPTConfig, seed: int = 0, batch_sharding: Any = None) -> Model:
    """The float32 parameters and the pure loss of one family (see the module docstring).
    ``batch_sharding`` (sharded runs) pins the plain-JAX GPT's residual stream to the
    batch sharding (`gpt.forward`); the library models leave their activations to XLA's
    sharding propagation."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}")
    if family == "gpt":
        return build_gpt(cfg, seed, batch_sharding)
    return BUILDERS[family](cfg, seed)


def optimizer_name(family: str) -> str:
    """How `optimizer` reads in the benchmark's JSON and tables."""
    if family == "gpt":
        return "optax.adam"
    return "optax.chain(clip_by_global_norm(1.0), adamw(b1=0.9, b2=0.95, weight_decay=0.1))"


def optimizer(family: str, schedule: Any) -> optax.GradientTransformation:
    """The optimizer each family trains with: `gpt` keeps its plain `optax.adam`; the
    community models the usual LLM recipe, gradient clipping at global norm 1 and AdamW
    (b2 = 0.95, weight decay 0.1, as GPT-2/nanoGPT and Llama train)."""
    if family == "gpt":
        return optax.adam(schedule)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
