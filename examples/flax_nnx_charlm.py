"""A Flax NNX transformer language model on Python's own source, trained with scalify:
FP8 matmuls (attention included), float16 weights and float16 Adam state.

    python examples/flax_nnx_charlm.py [--steps 200] [--quick]

The NNX model is unmodified (`nnx.Embed`, `nnx.MultiHeadAttention`, `nnx.LayerNorm`,
`nnx.Linear`); the training step splits it into its parameter state and merges it back
inside the loss, the usual functional NNX pattern, so that the parameters can be float16
`ScaledArray`s:

    graphdef, params = nnx.split(model, nnx.Param)
    params = sfy.as_scaled_array(params, dtype=jnp.float16)
    opt = sfy.optim.scaled_state(optax.adam(lr), dtype=jnp.float16)
    step = jax.jit(sfy.scalify(step))   # step uses sfy.fp8.autocast(loss)

The same model trains in plain float32 beside it; both validation losses are printed.
"""
from __future__ import annotations

import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import scalify as sfy
import scalify.fp8  # noqa: F401
import scalify.optim  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import make_train_step, parse_steps, print_results  # noqa: E402

VOCAB = 97  # newline, tab and printable ASCII (anything else becomes '?')


def corpus(max_chars: int = 400_000):
    """Character ids of a few standard-library modules (train, validation)."""
    root = sysconfig.get_paths()["stdlib"]
    text = ""
    for name in ("argparse.py", "dataclasses.py", "inspect.py", "typing.py", "pathlib.py", "textwrap.py"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text += f.read()
    codes = np.frombuffer(text[:max_chars].encode("ascii", errors="replace"), np.uint8).astype(np.int32)
    ids = np.where(codes == 10, 0, np.where(codes == 9, 1, np.clip(codes - 30, 2, VOCAB - 1)))
    n_val = len(ids) // 10
    return ids[:-n_val], ids[-n_val:]


def batches(ids, batch, seq, seed):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        yield np.stack([ids[s:s + seq + 1] for s in starts])


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class CharLM(nnx.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, seq: int = 64, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(VOCAB, d, rngs=rngs)
        self.pos = nnx.Embed(seq, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def train(scalified: bool, steps: int, batch: int = 16, seq: int = 64, lr: float = 3e-3, seed: int = 0,
          d: int = 64, layers: int = 2):
    train_ids, val_ids = corpus()
    model = CharLM(d=d, layers=layers, seq=seq, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr / 10)
    if scalified:
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
        opt = sfy.optim.scaled_state(optax.adam(schedule), dtype=jnp.float16)
        loss = sfy.fp8.autocast(loss_fn)  # every matmul, attention's einsums too, in float8
    else:
        opt, loss = optax.adam(schedule), loss_fn

    step = make_train_step(loss, opt)
    step = jax.jit(sfy.scalify(step) if scalified else step)
    evaluate = jax.jit(sfy.scalify(loss) if scalified else loss)
    state = opt.init(params)
    it = batches(train_ids, batch, seq, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, state, value = step(params, state, jnp.asarray(next(it)))
    seconds = time.perf_counter() - t0
    val_it = batches(val_ids, 32, seq, seed + 1)
    val = np.mean([float(sfy.asarray(evaluate(params, jnp.asarray(next(val_it))), dtype=jnp.float32))
                   for _ in range(4)])
    return {"mode": "scalify-fp8" if scalified else "float32",
            "final_loss": float(sfy.asarray(value, dtype=jnp.float32)), "val_loss": float(val),
            "seconds": seconds}


def main(argv=None):
    args = parse_steps(argv, __doc__, default=200)
    size = dict(steps=6, d=32, layers=1, seq=32) if args.quick else dict(steps=args.steps)
    results = [train(False, **size), train(True, **size)]
    print_results(results, "val_loss", "val loss")
    return results


if __name__ == "__main__":
    main()
