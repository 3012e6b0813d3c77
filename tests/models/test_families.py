"""Standard model families (benchmarks/models.py: GPT-2 in Flax linen, Llama in Flax NNX,
an Equinox transformer) train under scalify in float16 and float8 with no recipe.

Each family trains a few tens of steps on the stdlib corpus in float32, scalify-fp16
(`jax.jit(sfy.scalify(step))` + `sfy.optim.scaled_state`) and scalify-fp8 (the same with
`sfy.fp8.autocast(loss_fn)`), from the same weights on the same batches, with the
family's standard optimizer (`clip_by_global_norm(1.0)` + AdamW, warmup from 0 and cosine
decay). The training steps are `benchmarks/train_gpt.py`'s own, so the benchmark's
configurations are what is tested. Nothing else is added: no loss scaling, no
hand-placed rescaling.

Tolerance: TOLERANCE = 1% of the float32 final validation loss (about 0.033 nats). The
issue's "within 1% of float32" is meant for the benchmark's few-hundred-step runs; here it
is chosen on its own grounds. Measured on these runs (`python tests/models/test_families.py`
prints them), the usual bfloat16 mixed precision lands within 0.02% of float32, scalify-fp16
within 0.03% and scalify-fp8 within 0.1%: 1% leaves a 10x margin for rounding differences.
And it is tight enough to mean something: float32 learns about 1.3 nats in these STEPS
steps (the test also asserts it learns at least 20%), so 0.033 nats is about 2.5% of that;
a run that learns markedly slower, stalls or diverges (gradients flushed to zero in
float16, a drifting scale) fails. The model is one
block of each family (every layer type, attention included) to keep compilation, most of
the cost, at about a minute of CPU per family.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from typing import Dict, Sequence

import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import data  # noqa: E402
import models  # noqa: E402
import train_gpt  # noqa: E402

FAMILIES = ("gpt2", "llama", "equinox")
CONFIGS = ("float32", "scalify-fp16", "scalify-fp8")
STEPS = 30
TOLERANCE = 0.01
CFG = models.GPTConfig(vocab=len(data.VOCAB), seq_len=32, d_model=32, n_heads=2, n_layers=1)
BATCH, LR, VAL_BATCHES = 8, 3e-3, 2


def train_family(family: str, configs: Sequence[str] = CONFIGS, steps: int = STEPS) -> Dict[str, dict]:
    """Train ``family`` in each configuration, in lockstep on the same batches. Returns per
    configuration the training losses, the step of the first non-finite loss (or None) and
    the final validation loss on held-out text (NaN when training went non-finite)."""
    model = models.build(family, CFG, seed=0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, LR, max(1, steps // 10), steps, LR / 10)
    inner = models.optimizer(family, schedule)
    trainers = {c: train_gpt.make_trainer(c, model, inner) for c in configs}
    train_ids, val_ids = data.load_corpus(max_chars=200_000)
    val = [jnp.asarray(b) for b in itertools.islice(data.batches(val_ids, 16, CFG.seq_len, seed=1), VAL_BATCHES)]
    out = {c: {"train": [], "nonfinite_step": None, "val": float("nan")} for c in configs}
    batches = data.batches(train_ids, BATCH, CFG.seq_len, seed=0)
    for i in range(steps):
        tokens = jnp.asarray(next(batches))
        for c, t in trainers.items():
            if out[c]["nonfinite_step"] is not None:
                continue
            res = t.step(t.params, t.state, tokens)
            t.params, t.state = res[0], res[1]
            loss = train_gpt.as_float(res[2])
            out[c]["train"].append(loss)
            if not math.isfinite(loss):
                out[c]["nonfinite_step"] = i
    for c, t in trainers.items():
        if out[c]["nonfinite_step"] is None:
            # Each configuration evaluated as it trained: scalify runs with the scalified
            # (float16 / float8) forward pass.
            out[c]["val"] = float(np.mean([train_gpt.as_float(t.evaluate(t.params, b)) for b in val]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_in_float16_and_float8_with_no_recipe(family):
    runs = train_family(family)
    f32 = runs["float32"]
    assert all(math.isfinite(x) for x in f32["train"])
    assert f32["val"] < 0.8 * f32["train"][0], "float32 should learn in these steps"
    failures = []
    for c in CONFIGS[1:]:
        r = runs[c]
        if r["nonfinite_step"] is not None:
            failures.append(f"{c}: non-finite loss at step {r['nonfinite_step']}")
        elif abs(r["val"] / f32["val"] - 1) > TOLERANCE:
            failures.append(f"{c}: validation loss {r['val']:.4f} vs float32 {f32['val']:.4f} "
                            f"({r['val'] / f32['val']:.4f}x)")
    assert not failures, f"{family}: " + "; ".join(failures)


if __name__ == "__main__":  # python tests/models/test_families.py [family ...]: print the runs
    for fam in sys.argv[1:] or FAMILIES:
        res = train_family(fam, ("float32", "bf16-mixed") + CONFIGS[1:])
        ref = res["float32"]["val"]
        for c, r in res.items():
            print(f"{fam:8s} {c:13s} train {r['train'][0]:.3f} -> {r['train'][-1]:.3f}  "
                  f"val {r['val']:.4f} ({r['val'] / ref:.4f}x)  nonfinite_step {r['nonfinite_step']}",
                  flush=True)
