"""Memory of params and Adam state: float32 vs scalify's float16 / float8 storage.

    python benchmarks/optimizer_memory.py [--out benchmarks/results/optimizer_memory.json]

The parameter tree has the shapes of GPT-2 small (124M parameters, Hugging Face layout:
tied token embedding, 12 blocks with fused QKV, biases and layer norms: 148 arrays).
Nothing is allocated: every tree is built with `jax.eval_shape`, so the byte counts are
exact (``size * itemsize`` of every leaf, scales and step counts included) and the script
runs in a second on any machine.

Configurations, each with `optax.adam`:

- ``float32``: float32 params, optax's float32 state (the baseline);
- ``optax mu_dtype=bf16``: optax's own option, the first moment in bfloat16;
- ``scalify f16``: float16 `ScaledArray` params (master weights) and
  ``scalify.optim.scaled_state(adam, jnp.float16)``;
- ``scalify f16 + f8 mu``: the same with ``mu_dtype=jnp.float8_e4m3fn``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scalify as sfy
from scalify import optim


def gpt2_small_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> Dict[str, Any]:
    """GPT-2 small's parameter tree as float32 `jax.ShapeDtypeStruct`s."""

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def block() -> Dict[str, Any]:
        return {
            "ln_1": {"scale": s(d), "bias": s(d)},
            "attn": {"c_attn": {"kernel": s(d, 3 * d), "bias": s(3 * d)},
                     "c_proj": {"kernel": s(d, d), "bias": s(d)}},
            "ln_2": {"scale": s(d), "bias": s(d)},
            "mlp": {"c_fc": {"kernel": s(d, 4 * d), "bias": s(4 * d)},
                    "c_proj": {"kernel": s(4 * d, d), "bias": s(d)}},
        }

    return {
        "wte": s(vocab, d),
        "wpe": s(ctx, d),
        "h": [block() for _ in range(layers)],
        "ln_f": {"scale": s(d), "bias": s(d)},
    }


def nbytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (a ScaledArray counts its data and scale)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves))


def measure() -> Dict[str, Any]:
    params32 = gpt2_small_shapes()
    n_params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params32)))
    params16 = jax.eval_shape(
        lambda p: sfy.as_scaled_array(jax.tree.map(lambda x: x.astype(jnp.float16), p)), params32
    )
    configs = {
        "float32": (params32, optax.adam(1e-3)),
        "optax mu_dtype=bf16": (params32, optax.adam(1e-3, mu_dtype=jnp.bfloat16)),
        "scalify f16": (params16, optim.scaled_state(optax.adam(1e-3), jnp.float16)),
        "scalify f16 + f8 mu": (
            params16,
            optim.scaled_state(optax.adam(1e-3), jnp.float16, mu_dtype=jnp.float8_e4m3fn),
        ),
    }
    rows = {}
    for name, (params, opt) in configs.items():
        state = jax.eval_shape(opt.init, params)
        rows[name] = {
            "params_bytes": nbytes(params),
            "state_bytes": nbytes(state),
            "state_leaves": len(jax.tree.leaves(state)),
        }
    base = rows["float32"]
    for r in rows.values():
        r["total_bytes"] = r["params_bytes"] + r["state_bytes"]
        r["params_ratio"] = r["params_bytes"] / base["params_bytes"]
        r["state_ratio"] = r["state_bytes"] / base["state_bytes"]
        r["total_ratio"] = r["total_bytes"] / (base["params_bytes"] + base["state_bytes"])
    return {
        "model": "GPT-2 small shapes (Hugging Face layout, tied embedding)",
        "n_params": n_params,
        "n_param_arrays": len(jax.tree.leaves(params32)),
        "optimizer": "optax.adam",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }


def print_table(result: Dict[str, Any]) -> None:
    mb = 1 / 2**20
    print(f"{result['model']}: {result['n_params']:,} params in {result['n_param_arrays']} arrays, "
          f"{result['optimizer']}")
    head = f"{'config':22s} {'params MiB':>11s} {'state MiB':>10s} {'total MiB':>10s} " \
           f"{'params x':>9s} {'state x':>8s} {'total x':>8s}"
    print(head)
    print("-" * len(head))
    for name, r in result["rows"].items():
        print(f"{name:22s} {r['params_bytes'] * mb:11.1f} {r['state_bytes'] * mb:10.1f} "
              f"{r['total_bytes'] * mb:10.1f} {r['params_ratio']:9.4f} {r['state_ratio']:8.4f} "
              f"{r['total_ratio']:8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "optimizer_memory.json"))
    args = parser.parse_args()
    result = measure()
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
