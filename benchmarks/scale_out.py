"""The main job on one device, over a device mesh and over processes: same losses, and what
sharding costs.

    python benchmarks/scale_out.py [--steps 100] [--configs float32 scalify-fp16 scalify-fp8]

Runs `benchmarks/train_gpt.py` (default model and preset, ``--steps`` steps) four times,
each in a child process with 8 CPU devices (XLA_FLAGS), and compares their per-step
training losses with the single-device run's:

  1 device            no mesh
  mesh data=8         FSDP only: batch and every weight matrix split over 8 devices
  mesh data=4,model=2 FSDP over 4 x Megatron tensor parallel over 2 (benchmarks/mesh.py)
  2 processes x 4     the 4x2 mesh over two processes joined by `jax.distributed` (CPU
                      collectives), ``--processes 2``

and the median step time of each sharded run over the single-device run's (on CPU, with
every "device" a share of the same cores, this shows the cost of the partitioned program
and its collectives, not a speed-up). Writes benchmarks/results/scale_out.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

RUNS = [
    ("1 device", []),
    ("mesh data=8", ["--mesh", "data=8"]),
    ("mesh data=4,model=2", ["--mesh", "data=4,model=2"]),
    ("2 processes x 4 devices", ["--mesh", "data=4,model=2", "--processes", "2"]),
]


def train(args: argparse.Namespace, extra: List[str], out: str) -> Dict[str, Any]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, os.path.join(HERE, "train_gpt.py"), "--steps", str(args.steps), "--no-plots",
           "--no-telemetry", "--configs", *args.configs, "--out", out, *extra]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--configs", nargs="+", default=["float32", "bfloat16", "scalify-fp16", "scalify-fp8"])
    p.add_argument("--out", default=os.path.join(RESULTS, "scale_out.json"))
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="scale_out_")
    runs: Dict[str, Any] = {}
    for name, extra in RUNS:
        t0 = time.perf_counter()
        r = train(args, extra, os.path.join(tmp, f"run{len(runs)}.json"))
        runs[name] = {"args": extra, "wall_s": time.perf_counter() - t0, "result": r}
        print(f"{name}: {runs[name]['wall_s']:.0f} s", flush=True)
    base = runs["1 device"]["result"]["runs"]
    table = []
    for name, run in runs.items():
        row: Dict[str, Any] = {"run": name, "command": "python benchmarks/train_gpt.py " + " ".join(run["args"]),
                               "configs": {}}
        for c in args.configs:
            mine, ref = run["result"]["runs"][c], base[c]
            diffs = [abs(a / b - 1) for a, b in zip(mine["train_curve"], ref["train_curve"])]
            row["configs"][c] = {
                "final_val_loss": mine["final_val_loss"],
                "max_rel_loss_diff": max(diffs),
                "identical_losses": mine["train_curve"] == ref["train_curve"],
                "step_ms": mine["step_ms"],
                "step_time_vs_1_device": mine["step_ms"] / ref["step_ms"],
            }
        table.append(row)
    first = base[args.configs[0]]
    results = {
        "benchmark": "scale_out",
        "device": runs["1 device"]["result"]["device"] + ", 8 simulated CPU devices",
        "jax": runs["1 device"]["result"]["jax"],
        "steps": args.steps,
        "model": runs["1 device"]["result"]["model"],
        "runs": table,
        "single_device_steps": len(first["train_curve"]),
    }
    print(f"\n{'run':<26}" + "".join(f"{c:>26}" for c in args.configs))
    print(f"{'':<26}" + "".join(f"{'max rel diff / step x':>26}" for _ in args.configs))
    for row in table:
        cells = [f"{v['max_rel_loss_diff']:.1e} / {v['step_time_vs_1_device']:.2f}x" for v in row["configs"].values()]
        print(f"{row['run']:<26}" + "".join(f"{c:>26}" for c in cells))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
