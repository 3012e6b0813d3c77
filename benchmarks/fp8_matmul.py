"""GEMM throughput: scalify float8 vs plain bfloat16 vs float32.

    python benchmarks/fp8_matmul.py [--quick] [--iters 20] [--out PATH]

For each shape ``(M, K, N)`` -- square 1024..8192, and LLM-shaped ``tokens x d_model x
4*d_model`` -- the product ``x @ w`` is timed side by side in one run (median of
``--iters`` calls after warm-up, inputs on device):

- ``fp32``: float32 operands, XLA's default precision (on NVIDIA GPUs that lets
  cuBLAS use TF32 tensor cores);
- ``bf16``: bfloat16 operands and result;
- ``fp8``: ``jit(scalify(fp8.autocast(matmul)))`` on bfloat16 ScaledArrays: both
  operands are cast to E4M3 on every call and multiplied by a float8 ``dot_general``,
  result in bfloat16 -- what a layer of a model pays on its forward pass;
- ``fp8-rs``: the same with ``rescale="all"`` (each operand's RMS moved into its scale
  first: one reduction per operand per call);
- ``fp8-gemm``: operands already float8 ScaledArrays (weights and activations kept in
  float8), only the GEMM.

TFLOP/s counts ``2*M*K*N`` flops per call. ``fp8 kernel`` says what the compiled HLO
shows (`scalify.fp8.matmul_report`): ``yes`` when XLA emitted ``__cublas$lt$matmul$f8``,
``no`` when it did not, ``emulated`` on CPU (no float8 units: XLA upcasts, so CPU
numbers say nothing of float8 hardware). JSON goes to
``benchmarks/results/fp8_matmul.json`` (or ``--out``) with the device named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scalify as sfy  # noqa: E402
from scalify import fp8  # noqa: E402

FULL_SHAPES: List[Tuple[str, int, int, int]] = [
    ("square", 1024, 1024, 1024),
    ("square", 2048, 2048, 2048),
    ("square", 4096, 4096, 4096),
    ("square", 8192, 8192, 8192),
    ("llm d=1024", 8192, 1024, 4096),
    ("llm d=2048", 8192, 2048, 8192),
    ("llm d=4096", 8192, 4096, 16384),
]
QUICK_SHAPES: List[Tuple[str, int, int, int]] = [
    ("square", 128, 128, 128),
    ("square", 256, 256, 256),
    ("square", 512, 512, 512),
    ("llm d=128", 512, 128, 512),
]
MODES = ("fp32", "bf16", "fp8", "fp8-rs", "fp8-gemm")


def matmul(x: Any, w: Any) -> Any:
    return x @ w


def gemm_bf16_out(x: Any, w: Any) -> Any:
    return jax.lax.dot(x, w, preferred_element_type=jnp.bfloat16)


def make_case(mode: str, m: int, k: int, n: int) -> Tuple[Callable, Tuple[Any, ...]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), np.float32)
    w = (rng.standard_normal((k, n), np.float32) / np.sqrt(k)).astype(np.float32)
    if mode == "fp32":
        return jax.jit(matmul), (jnp.asarray(x), jnp.asarray(w))
    if mode == "bf16":
        return jax.jit(matmul), (jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    if mode in ("fp8", "fp8-rs"):
        rescale = "all" if mode == "fp8-rs" else "grad"
        fn = jax.jit(sfy.scalify(fp8.autocast(matmul, rescale=rescale)))
        args = sfy.as_scaled_array((jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)))
        return fn, args
    if mode == "fp8-gemm":
        fn = jax.jit(sfy.scalify(gemm_bf16_out))
        xs = sfy.ScaledArray(jnp.asarray(x, jnp.float8_e4m3fn), jnp.float32(1))
        ws = sfy.ScaledArray(jnp.asarray(w * np.sqrt(k), jnp.float8_e4m3fn), jnp.float32(1 / 32))
        return fn, (xs, ws)
    raise ValueError(mode)


def time_call(fn: Callable, args: Tuple[Any, ...], iters: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_used(fn: Callable, args: Tuple[Any, ...]) -> str:
    report = fp8.matmul_report(fn.lower(*args).compile())
    if report.platform == "cpu":
        return "emulated" if report.fp8_count else "no"
    if report.fp8_kernel is None:
        return "?"
    return "yes" if report.fp8_kernel and not report.fallbacks else "no"


def run(shapes: List[Tuple[str, int, int, int]], iters: int) -> List[Dict[str, Any]]:
    rows = []
    for label, m, k, n in shapes:
        flops = 2.0 * m * k * n
        row: Dict[str, Any] = {"shape": label, "M": m, "K": k, "N": n}
        for mode in MODES:
            fn, args = make_case(mode, m, k, n)
            t = time_call(fn, args, iters)
            row[f"{mode}_ms"] = t * 1e3
            row[f"{mode}_tflops"] = flops / t / 1e12
            if mode.startswith("fp8"):
                row[f"{mode}_kernel"] = kernel_used(fn, args)
            del fn, args
        row["fp8_vs_bf16"] = row["fp8_tflops"] / row["bf16_tflops"]
        row["fp8-gemm_vs_bf16"] = row["fp8-gemm_tflops"] / row["bf16_tflops"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'shape':>11} {'M':>6} {'K':>6} {'N':>6} | {'fp32':>7} {'bf16':>7} {'fp8':>7} "
    f"{'fp8-rs':>8} {'fp8-gemm':>8} | {'fp8/bf16':>8} {'gemm/bf16':>9} | fp8 kernel"
)


def format_row(r: Dict[str, Any]) -> str:
    return (
        f"{r['shape']:>11} {r['M']:>6} {r['K']:>6} {r['N']:>6} | {r['fp32_tflops']:7.2f} "
        f"{r['bf16_tflops']:7.2f} {r['fp8_tflops']:7.2f} {r['fp8-rs_tflops']:8.2f} "
        f"{r['fp8-gemm_tflops']:8.2f} | {r['fp8_vs_bf16']:8.2f} {r['fp8-gemm_vs_bf16']:9.2f} | "
        f"{r['fp8_kernel']}/{r['fp8-rs_kernel']}/{r['fp8-gemm_kernel']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case (median)")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp8_matmul.json"),
    )
    args = ap.parse_args()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    iters = args.iters or (5 if args.quick else 20)
    dev = jax.devices()[0]
    device = f"{dev.platform}: {dev.device_kind}"
    print(f"device: {device}   jax {jax.__version__}   iters: {iters} (median)")
    if dev.platform == "cpu":
        print("CPU: float8 is emulated (XLA upcasts float8 operands); the fp8 columns show the")
        print("program runs, not float8 hardware speed.")
    print("TFLOP/s (2*M*K*N per call); fp8 kernel: fp8 / fp8-rs / fp8-gemm")
    print(HEADER)
    print("-" * len(HEADER))
    rows = run(shapes, iters)
    out = {
        "benchmark": "fp8_matmul",
        "device": device,
        "platform": dev.platform,
        "jax": jax.__version__,
        "host": platform.node(),
        "quick": args.quick,
        "iters": iters,
        "emulated": dev.platform == "cpu",
        "modes": {
            "fp32": "float32 operands, XLA default precision",
            "bf16": "bfloat16 operands and result",
            "fp8": "scalify + fp8.autocast on bfloat16 ScaledArrays (E4M3 casts + float8 GEMM, bf16 out)",
            "fp8-rs": "as fp8 with rescale='all' (RMS moved into the scale before each cast)",
            "fp8-gemm": "float8 ScaledArray operands, float8 GEMM only, bfloat16 result",
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
