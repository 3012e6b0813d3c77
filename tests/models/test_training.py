"""Training proof: a small causal transformer trained 100 steps in float16 under scalify
ends within 2% of the float32 loss. (Plain float16 beside it is the main job's to show:
`benchmarks/train_gpt.py` trains it and reports where it goes non-finite.)"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scalify as sfy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import data  # noqa: E402
import gpt  # noqa: E402

STEPS = 100


def _train(mode: str):
    cfg = gpt.GPTConfig(vocab=len(data.VOCAB), seq_len=32, d_model=64, n_heads=2, n_layers=2)
    train_ids, _ = data.load_corpus(max_chars=200_000)
    params = gpt.init_params(jax.random.PRNGKey(0), cfg)
    opt = optax.adam(3e-3)
    if mode == "scalify-float16":  # float16 optimizer state, kept in range by its scales
        opt = sfy.optim.scaled_state(opt, dtype=jnp.float16)
    state = opt.init(params)

    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(gpt.loss_fn)(params, tokens[:, :-1], tokens[:, 1:], cfg)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    if mode == "float32":
        fn = jax.jit(step)
    else:
        params = sfy.as_scaled_array(params, dtype=jnp.float16)
        fn = jax.jit(sfy.scalify(step))
    losses = []
    it = data.batches(train_ids, 16, cfg.seq_len, seed=0)
    for _ in range(STEPS):
        params, state, loss = fn(params, state, jnp.asarray(next(it)))
        losses.append(float(sfy.asarray(loss, dtype=jnp.float32)))
    return np.array(losses)


def test_scalify_float16_matches_float32_training():
    f32 = _train("float32")
    s16 = _train("scalify-float16")
    final = lambda l: float(np.mean(l[-10:]))
    print(f"final loss: float32 {final(f32):.4f}  scalify-float16 {final(s16):.4f}")
    assert final(f32) < 0.8 * f32[0]  # it learned something
    assert np.all(np.isfinite(s16))
    assert abs(final(s16) - final(f32)) / final(f32) < 0.02
