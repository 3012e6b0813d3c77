"""Overhead of scalify: trace, compile and run time of `jit(scalify(step))` vs `jit(step)`.

    python benchmarks/overhead.py [--repeats 50] [--rounds 5] [--trace-rounds 15] [--dtype float32 float16] [--out PATH]

For each model (a 784-512-512-10 MLP SGD step at batch 128, and a small GPT training step
with `lax.scan` over layers) and each data dtype, both versions are measured side by side
in one run, interleaved, and the ratios printed: trace (`jax.jit(f).trace`, median over
`--trace-rounds` from-scratch traces), lower+compile (median over `--rounds` from-scratch
rounds, caches cleared), and steady-state run (median over `--repeats`). Results go to
JSON.

`--decompose` also compiles and runs two reference programs beside them, to show where
scalify's overhead comes from:

- ``static-scales``: the same scalify step, with every input scale a NumPy 1 known at trace
  time (the ScaledArrays are built inside the jitted function). The rules fold all scale
  arithmetic that follows from the inputs, so what remains over plain JAX is scalify's
  data-side work (rescaling multiplies, the measured sums' reductions) and the scales that
  depend on data.
- ``static-sums``: as ``static-scales``, with every ``reduce_sum`` on the static
  ``pow2(sqrt(N))`` rule instead of a measured scale (a numerical reference only: scalify
  measures sums for the reasons given in `scalify.rules.reductions.reduce_sum`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scalify as sfy  # noqa: E402
import gpt  # noqa: E402


def mlp_case(dtype: Any):
    sizes = (784, 512, 512, 10)
    key = jax.random.PRNGKey(0)
    params = []
    for k, (a, b) in zip(jax.random.split(key, 3), zip(sizes[:-1], sizes[1:])):
        params.append({"w": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
                       "b": jnp.zeros((b,), dtype)})
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 784)).astype(dtype)
    y = jax.random.randint(jax.random.PRNGKey(2), (128,), 0, 10)

    def loss(params, x, y):
        h = x
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = h @ params[-1]["w"] + params[-1]["b"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def step(params, x, y):
        l, g = jax.value_and_grad(loss)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, g), l

    return step, (params, x, y), (sfy.as_scaled_array(params), sfy.as_scaled_array(x), y)


def gpt_case(dtype: Any):
    cfg = gpt.PRESETS["small"]
    params = jax.tree.map(lambda p: p.astype(dtype), gpt.init_params(jax.random.PRNGKey(0), cfg))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (16, cfg.seq_len + 1), 0, cfg.vocab)

    def step(params, tokens):
        l, g = jax.value_and_grad(gpt.loss_fn)(params, tokens[:, :-1], tokens[:, 1:], cfg)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, g), l

    return step, (params, tokens), (sfy.as_scaled_array(params), tokens)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def _fresh_trace(fn: Callable, args: tuple, context: Callable = contextlib.nullcontext) -> Any:
    """``(jax.jit(fn).trace(*args), seconds)`` with caches cleared first (no cache hits:
    measure real work) and garbage collected (no collection pause in the timing); the
    trace runs inside ``context()``."""
    jax.clear_caches()
    gc.collect()
    jitted = jax.jit(fn)
    with context():
        t0 = time.perf_counter()
        traced = jitted.trace(*args)
        return traced, time.perf_counter() - t0


def with_static_scales(step: Callable) -> Callable:
    """``step`` on plain arrays, run as ``scalify(step)`` on ScaledArrays whose scales are
    NumPy ones: scales known at trace time, which the rules fold (see --decompose)."""

    def static_step(*args: Any) -> Any:
        def wrap(a: Any) -> Any:
            return sfy.ScaledArray(a, np.ones((), np.float32)) if jnp.issubdtype(a.dtype, jnp.floating) else a

        return sfy.scalify(step)(*jax.tree.map(wrap, args))

    return static_step


@contextlib.contextmanager
def static_sums():
    """Every ``reduce_sum`` traced inside takes the static ``pow2(sqrt(N))`` scale rule
    (`ScalifyConfig.measured_min_reduced` beyond any tensor's size)."""
    with dataclasses.replace(sfy.core.get_config(), measured_min_reduced=np.iinfo(np.int64).max):
        yield


def measure(step: Callable, plain_args: tuple, scaled_args: tuple, repeats: int, rounds: int = 5,
            trace_rounds: int = 15, decompose: bool = False) -> Dict[str, Any]:
    null = contextlib.nullcontext
    variants = {"jax": (step, plain_args, null), "scalify": (sfy.scalify(step), scaled_args, null),
                # the same without the range guard, to show what the guard costs
                "unguarded": (sfy.scalify(step), scaled_args, lambda: sfy.ScalifyConfig(range_guard=False)),
                # the same with every rule's result rounded (and guarded) at once
                "undeferred": (sfy.scalify(step), scaled_args, lambda: sfy.ScalifyConfig(defer_rounding=False)),
                # float16 contractions leaving their dot in float16, as on several devices
                "narrow": (sfy.scalify(step), scaled_args, lambda: sfy.ScalifyConfig(narrow_contractions=True)),
                # scales not marked computed-once: XLA may copy their arithmetic into
                # every kernel reading them (fewer, larger kernels)
                "scales_inlined": (sfy.scalify(step), scaled_args,
                                   lambda: sfy.ScalifyConfig(scales_computed_once=False))}
    if decompose:
        variants["static-scales"] = (with_static_scales(step), plain_args, null)
        variants["static-sums"] = (with_static_scales(step), plain_args, static_sums)
    res: Dict[str, Dict[str, List[float]]] = {k: {"trace": [], "compile": [], "run": []} for k in variants}
    compiled = {}
    for _ in range(rounds):  # trace/compile from scratch a few times, interleaved
        for name, (fn, args, context) in variants.items():
            traced, dt = _fresh_trace(fn, args, context)
            t0 = time.perf_counter()
            compiled[name] = traced.lower().compile()
            res[name]["trace"].append(dt)
            res[name]["compile"].append(time.perf_counter() - t0)
    # Traces are short (a fraction of a second) and noisy: more from-scratch samples.
    for _ in range(max(trace_rounds - rounds, 0)):
        for name in ("jax", "scalify", "undeferred"):
            fn, args, context = variants[name]
            res[name]["trace"].append(_fresh_trace(fn, args, context)[1])
    for name, (fn, args, _) in variants.items():  # warm up
        for _ in range(3):
            _timed(lambda: compiled[name](*args))
    for _ in range(repeats):
        for name, (fn, args, _) in variants.items():
            res[name]["run"].append(_timed(lambda: compiled[name](*args)))
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    ratios = {m: med["scalify"][m] / med["jax"][m] for m in ("trace", "compile", "run")}
    out: Dict[str, Any] = {"median_s": med, "ratio": ratios,
                           "ratio_unguarded": {m: med["unguarded"][m] / med["jax"][m] for m in ("compile", "run")},
                           "ratio_undeferred": {m: med["undeferred"][m] / med["jax"][m] for m in ("trace", "compile", "run")},
                           "ratio_narrow": {m: med["narrow"][m] / med["jax"][m] for m in ("compile", "run")},
                           "ratio_scales_inlined": {m: med["scales_inlined"][m] / med["jax"][m]
                                                    for m in ("compile", "run")}}
    if decompose:
        out["decomposition"] = {
            name: {m: med[name][m] / med["jax"][m] for m in ("compile", "run")}
            for name in ("static-scales", "static-sums")
        }
    return out


def main(argv: Any = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs of each compiled step")
    parser.add_argument("--rounds", type=int, default=5, help="from-scratch traces and compiles")
    parser.add_argument("--trace-rounds", type=int, default=15, help="from-scratch traces (at least --rounds)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    parser.add_argument("--models", nargs="+", default=["mlp", "gpt"])
    parser.add_argument("--decompose", action="store_true",
                        help="also measure the static-scales and static-sums reference programs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = parser.parse_args(argv)
    cases = {"mlp": mlp_case, "gpt": gpt_case}
    results = {"device": f"{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)",
               "jax": jax.__version__, "cases": {}}
    print(f"device: {results['device']}, jax {jax.__version__}")
    print(f"{'case':<16}{'trace':>10}{'compile':>10}{'run':>10}   (scalify / jax, median)")
    for model in args.models:
        for dt in args.dtype:
            step, plain, scaled = cases[model](jnp.dtype(dt))
            r = measure(step, plain, scaled, args.repeats, args.rounds, args.trace_rounds, args.decompose)
            name = f"{model}-{dt}"
            results["cases"][name] = r
            q = r["ratio"]
            print(f"{name:<16}{q['trace']:>9.2f}x{q['compile']:>9.2f}x{q['run']:>9.2f}x"
                  f"   run: jax {r['median_s']['jax']['run'] * 1e3:.2f} ms, "
                  f"scalify {r['median_s']['scalify']['run'] * 1e3:.2f} ms")
            u = r["ratio_unguarded"]
            print(f"  {'no range guard':<14}{'':>10}{u['compile']:>9.2f}x{u['run']:>9.2f}x")
            u = r["ratio_undeferred"]
            print(f"  {'no deferral':<14}{u['trace']:>9.2f}x{u['compile']:>9.2f}x{u['run']:>9.2f}x")
            u = r["ratio_scales_inlined"]
            print(f"  {'scales inlined':<14}{'':>10}{u['compile']:>9.2f}x{u['run']:>9.2f}x")
            for part, p in r.get("decomposition", {}).items():
                print(f"  {part:<14}{'':>10}{p['compile']:>9.2f}x{p['run']:>9.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
