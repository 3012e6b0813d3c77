"""Rewrite the README's results section from the benchmarks' JSON files.

    python benchmarks/readme_tables.py [--results benchmarks/results] [--readme README.md] [--check]

Reads the JSON files that exist under ``--results`` (train_gpt.json, overhead.json,
optimizer_memory.json, fp8_matmul.json; missing ones are skipped) and replaces the text
between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README with one
table per benchmark, each naming the machine it was measured on. ``--check`` only reports
(exit status 1) whether the README is out of date. Needs nothing beyond the standard
library.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _table(header: List[str], rows: List[List[str]], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ratio(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}x" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# --------------------------------------------------------------------------------------
# train_gpt


TRAIN_GPT_HEADER = ["config", "final train loss", "final val loss", "val / float32",
                    "step time / float32", "Adam state"]


def train_gpt_rows(results: Dict[str, Any]) -> List[List[str]]:
    """Rows of the accuracy table (also printed by benchmarks/train_gpt.py)."""
    rows = []
    for name, r in results["runs"].items():
        if r.get("nonfinite_step") is not None:
            tr = va = f"non-finite at step {r['nonfinite_step']}"
            ratio = "-"
        else:
            tr, va = f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}"
            ratio = f"{r['val_ratio']:.4f}"
        rows.append([name, tr, va, ratio, _ratio(r.get("step_time_ratio")),
                     f"{fmt_bytes(r['state_bytes'])} ({r['state_bytes_ratio']:.2f}x)"])
    return rows


def render_train_gpt(d: Dict[str, Any], results_dir: str) -> str:
    m, t = d["model"], d["training"]
    out = [
        "### Accuracy: character-level GPT (`benchmarks/train_gpt.py`)",
        "",
        f"Measured on **{d['device']}**. Model: d_model={m['d_model']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads, context {m['seq_len']}, {m['n_params'] / 1e6:.2f}M parameters; "
        f"{t['steps']} steps of {t['optimizer']} (lr {t['lr']:g}, {t['schedule']}), batch {t['batch']}; "
        f"train loss: {t['final_train_loss']}; validation: {t['validation']}. All configurations start "
        f"from the same weights and see the same batches.",
        "",
        _table(TRAIN_GPT_HEADER, train_gpt_rows(d)),
        "",
        "float32: plain JAX. bfloat16 / float16: plain JAX with params, activations, gradients and "
        "Adam state in that dtype (no loss scaling, no float32 master weights). scalify-fp16: "
        "float16 `ScaledArray` weights, activations and gradients, Adam state stored as float16 "
        "(`sfy.optim.scaled_state`). scalify-fp8: the same with every matmul in float8 "
        "(`sfy.fp8.autocast`: E4M3 forward, E5M2 gradients).",
    ]
    if d.get("platform") == "cpu":
        out += ["", "Step times on CPU say little about accelerators: XLA's CPU backend has no "
                "float16/float8 matrix units (float8 is emulated), so they only show that the "
                "scalified step runs at a comparable cost."]
    tel = d.get("telemetry") or {}
    if tel.get("config"):
        fn = tel.get("first_nonfinite_weight_grad_state")
        out += ["", f"Telemetry (`scalify.telemetry`, {tel['config']} run, {tel.get('recorded_steps')} "
                f"recorded steps): first non-finite weight, gradient or optimizer-state value: "
                f"{'none' if fn is None else fn}."]
    notes = {
        "train_gpt_scales.png": (
            "Each panel: over the tensors of one kind, the spread of log2(scale) at each recorded "
            "step. Weights sit near their RMS (2^-4 for a 1/sqrt(fan-in) initialisation; layer-norm "
            "gains at 2^0), gradients near 2^-11, and the stored optimizer state far lower because "
            "`scaled_state` puts each leaf's largest value in float16's top binade (2^15); the data "
            "stays in range throughout."),
    }
    for png, caption in (("train_gpt_loss.png", "Loss curves"),
                         ("train_gpt_scales.png", "Per-tensor scales over training (scalify telemetry)")):
        if os.path.exists(os.path.join(results_dir, png)):
            out += ["", f"![{caption}](benchmarks/results/{png})"]
            if png in notes:
                out += ["", notes[png]]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# overhead


def render_overhead(d: Dict[str, Any], results_dir: str) -> str:
    rows, parts = [], []
    for name, c in d["cases"].items():
        r, med = c["ratio"], c.get("median_s", {})
        run_ms = ""
        if "jax" in med and "scalify" in med:
            run_ms = f"{med['jax']['run'] * 1e3:.2f} / {med['scalify']['run'] * 1e3:.2f}"
        rows.append([name, _ratio(r.get("trace")), _ratio(r.get("compile")), _ratio(r.get("run")), run_ms])
        dec = c.get("decomposition")
        if dec:
            parts.append([name] + [_ratio(x.get("compile")) for x in (r, dec["static-scales"], dec["static-sums"])]
                         + [_ratio(x.get("run")) for x in (r, dec["static-scales"], dec["static-sums"])])
    out = [
        "### Overhead: `jit(scalify(step))` vs `jit(step)` (`benchmarks/overhead.py`)",
        "",
        f"Measured on **{d['device']}**, same data dtype on both sides, medians; ratios are "
        "scalify / plain JAX. On a shared 2-core machine the trace and compile ratios of "
        "repeated runs differ by up to about 0.3.",
        "",
        _table(["case", "trace", "compile", "run", "run ms (jax / scalify)"], rows),
        "",
        "Where the compile time goes: XLA's CPU backend spends tens of milliseconds on each "
        "distinct kernel. Left to itself, XLA copies each tensor's scale arithmetic into every "
        "kernel that uses it, so kernels identical in the plain program become distinct and "
        "the copies grow with depth (a two-block Flax NNX transformer step compiled 10x "
        "slower than plain JAX). scalify has XLA compute each rule's output scale once, in a "
        "small kernel of its own (`ScalifyConfig(scales_computed_once=True)`, the default): "
        "that NNX step now compiles 4x faster, at a few microseconds per scale per step at "
        "run time. What remains is those scalar kernels, one kernel per per-step scale that "
        "a `lax.scan` stacks, and XLA's passes over the larger program.",
    ]
    if parts:
        out += [
            "",
            "Where the rest comes from (`--decompose`): the same step compiled and run with every "
            "input scale known at trace time (*static scales*: the rules fold all scale "
            "arithmetic that follows from the inputs, leaving scalify's data-side work and the "
            "scales that depend on data), and additionally with every `reduce_sum` on the static "
            "`pow2(sqrt(N))` rule instead of its measured scale (*static sums*, a reference only: "
            "scalify measures sums to keep layer-norm statistics and their gradients at unit "
            "size, see `scalify.rules.reductions`). Ratios to plain JAX:",
            "",
            _table(["case", "compile", "static scales", "static sums", "run", "static scales",
                    "static sums"], parts),
            "",
            "What *static sums* still costs over plain JAX is the data-side work of the rules "
            "themselves: the power-of-two rescaling multiplies (the `pow2(sqrt(K))` of each "
            "contraction, operand alignment in additions), the float32 computation of non-linear "
            "functions, and the kernels these add.",
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# optimizer memory


def render_optimizer_memory(d: Dict[str, Any], results_dir: str) -> str:
    rows = []
    for name, r in d["rows"].items():
        rows.append([name, fmt_bytes(r["params_bytes"]), fmt_bytes(r["state_bytes"]),
                     fmt_bytes(r["total_bytes"]), _ratio(r.get("total_ratio"))])
    n = d.get("n_params")
    return "\n".join([
        "### Memory: weights and Adam state (`benchmarks/optimizer_memory.py`)",
        "",
        f"{d.get('model', 'model')}" + (f", {n / 1e6:.1f}M parameters" if n else "") +
        f", `{d.get('optimizer', 'optax.adam')}`. Byte counts of every leaf (scales and step "
        "counts included), computed from shapes: the same on every machine.",
        "",
        _table(["configuration", "weights", "Adam state", "total", "total / float32"], rows),
    ])


# --------------------------------------------------------------------------------------
# FP8 GEMM throughput


def render_fp8_matmul(d: Dict[str, Any], results_dir: str) -> str:
    modes = [m for m in ("fp32", "bf16", "fp8", "fp8-rs", "fp8-gemm") if any(f"{m}_tflops" in r for r in d["rows"])]
    header = ["shape", "M x K x N"] + [f"{m} TFLOP/s" for m in modes] + ["fp8 / bf16", "fp8 kernel"]
    rows = []
    for r in d["rows"]:
        kernel = r.get("fp8_kernel", "-")
        rows.append([str(r.get("shape", "")), f"{r['M']} x {r['K']} x {r['N']}"]
                    + [f"{r[f'{m}_tflops']:.2f}" if f"{m}_tflops" in r else "-" for m in modes]
                    + [_ratio(r.get("fp8_vs_bf16")), str(kernel)])
    out = [
        "### FP8 GEMM throughput (`benchmarks/fp8_matmul.py`)",
        "",
        f"Measured on **{d['device']}** (jax {d.get('jax', '?')}"
        + (", quick sizes" if d.get("quick") else "") + ").",
    ]
    if d.get("emulated") or d.get("platform") == "cpu":
        out[-1] += (" This is a CPU: float8 is emulated (XLA upcasts the operands), so these rows "
                    "show that the float8 programs run, not float8 speed; run the script on an "
                    "H100-class GPU for throughput.")
    modes_doc = d.get("modes") or {}
    out += ["", _table(header, rows, "ll" + "r" * (len(header) - 3) + "l")]
    if modes_doc:
        out += [""] + [f"- `{k}`: {v}" for k, v in modes_doc.items() if k in modes]
    return "\n".join(out)


RENDERERS: List[tuple] = [
    ("train_gpt.json", render_train_gpt),
    ("overhead.json", render_overhead),
    ("optimizer_memory.json", render_optimizer_memory),
    ("fp8_matmul.json", render_fp8_matmul),
]


def render(results_dir: str) -> str:
    """The results section (without the markers) from the JSON files that exist."""
    parts = []
    for fname, fn in RENDERERS:
        path = os.path.join(results_dir, fname)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        try:
            parts.append(fn(d, results_dir))
        except (KeyError, TypeError, ValueError) as e:  # a JSON layout this script does not know
            parts.append(f"### {fname}\n\n(could not render {fname}: missing field {e})")
    if not parts:
        parts.append("No benchmark results yet: run the scripts in `benchmarks/`, then "
                     "`python benchmarks/readme_tables.py`.")
    return "\n\n".join(parts)


def replace_section(readme: str, body: str) -> str:
    if START not in readme or END not in readme or readme.index(START) > readme.index(END):
        raise ValueError(f"README has no '{START}' ... '{END}' section")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n<!-- generated by benchmarks/readme_tables.py: do not edit by hand -->\n\n{body}\n\n{END}{tail}"


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = p.parse_args(argv)
    with open(args.readme) as f:
        old = f.read()
    new = replace_section(old, render(args.results))
    if args.check:
        print("README results are up to date" if new == old else "README results are out of date")
        return int(new != old)
    if new != old:
        with open(args.readme, "w") as f:
            f.write(new)
        print(f"updated {args.readme}")
    else:
        print(f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
