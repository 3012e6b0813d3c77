"""Rewrite the README's results section from the benchmarks' JSON files.

    python benchmarks/readme_tables.py [--results benchmarks/results] [--readme README.md] [--check]

Reads the JSON files that exist under ``--results`` (train_gpt.json, overhead.json,
optimizer_memory.json, fp8_matmul.json; missing ones are skipped; train_gpt_<model>.json
from ``train_gpt.py --model`` add a per-model accuracy table after train_gpt.json's) and replaces the text
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
                    "step time / float32", "optimizer state", "weights + optimizer state"]


def _total_bytes(r: Dict[str, Any], ref: Optional[Dict[str, Any]]) -> str:
    if "params_bytes" not in r:
        return "-"
    total = r["params_bytes"] + r["state_bytes"]
    ratio = r.get("total_bytes_ratio")
    if ratio is None and ref is not None and "params_bytes" in ref:
        ratio = total / (ref["params_bytes"] + ref["state_bytes"])
    return fmt_bytes(total) + (f" ({ratio:.2f}x)" if isinstance(ratio, (int, float)) and math.isfinite(ratio) else "")


def train_gpt_rows(results: Dict[str, Any]) -> List[List[str]]:
    """Rows of the accuracy table (also printed by benchmarks/train_gpt.py)."""
    rows = []
    ref = results["runs"].get("float32")
    for name, r in results["runs"].items():
        if r.get("nonfinite_step") is not None:
            tr = va = f"non-finite at step {r['nonfinite_step']}"
            ratio = "-"
        else:
            tr, va = f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}"
            ratio = f"{r['val_ratio']:.4f}"
        rows.append([name, tr, va, ratio, _ratio(r.get("step_time_ratio")),
                     f"{fmt_bytes(r['state_bytes'])} ({r['state_bytes_ratio']:.2f}x)", _total_bytes(r, ref)])
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
    if "bf16-mixed" in d["runs"] or "fp16-loss-scaling" in d["runs"]:
        out[-1] += (" bf16-mixed: the usual mixed precision, float32 master weights and optimizer "
                    "state, forward and backward on a bfloat16 copy of the weights. "
                    "fp16-loss-scaling: the same in float16 with dynamic loss scaling (the `jmp` "
                    "recipe).")
        ls = d["runs"].get("fp16-loss-scaling", {})
        if "skipped_steps" in ls:
            out[-1] += (f" Its final loss scale: {ls['loss_scale']:g}, {ls['skipped_steps']} "
                        "updates skipped on non-finite gradients.")
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
        row = [name, _ratio(r.get("trace")), _ratio(r.get("compile")), _ratio(r.get("run")), run_ms]
        if "ratio_undeferred" in c:  # the same step without deferred rounding, and unguarded
            u, g = c["ratio_undeferred"], c.get("ratio_unguarded", {})
            row += [_ratio(u.get("trace")), _ratio(u.get("compile")), _ratio(u.get("run")), _ratio(g.get("run")),
                    _ratio(c.get("ratio_narrow", {}).get("run"))]
        rows.append(row)
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
        _table(["case", "trace", "compile", "run", "run ms (jax / scalify)"]
               + (["trace, no deferral", "compile, no deferral", "run, no deferral", "run, no guard",
                   "run, narrow contractions"]
                  if all(len(r) > 5 for r in rows) else []),
               [r if all(len(r) > 5 for r in rows) else r[:5] for r in rows]),
        "",
        "Where the compile time goes: XLA's CPU backend spends tens of milliseconds on each "
        "distinct kernel. Left to itself, XLA copies each tensor's scale arithmetic into every "
        "kernel that uses it, so kernels identical in the plain program become distinct and "
        "the copies grow with depth (a two-block Flax NNX transformer step compiled 10x "
        "slower than plain JAX). scalify has XLA compute each rule's output scale once, in a "
        "small kernel of its own (`ScalifyConfig(scales_computed_once=True)`, the default): "
        "that NNX step now compiles 4x faster, at a few microseconds per scale per step at "
        "run time. The same holds for the factors a rule multiplies its data by (a range "
        "guard's measured power of two, a clamped product's residual, a contraction's "
        "headroom): computed once, the float16 GPT-2 step of `tests/models/test_families.py` "
        "holds 29k scalar instructions instead of 43k and compiles in 8.8 s instead of "
        "12.3 s (XLA:CPU without LLVM optimisation, as the tests compile), with run time "
        "unchanged. What remains is those scalar kernels (the range guards alone are about "
        "half of the compile time: their max-abs reductions and factors), one kernel per "
        "per-step scale that a `lax.scan` stacks, and XLA's passes over the larger program.",
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


# --------------------------------------------------------------------------------------
# train_gpt across model families (train_gpt.json and train_gpt_<model>.json)


MODEL_CONFIGS = ("bf16-mixed", "fp16-loss-scaling", "scalify-fp16", "scalify-fp8", "bfloat16", "float16")


def _model_files(results_dir: str) -> List[str]:
    names = sorted(f for f in os.listdir(results_dir)
                   if f.startswith("train_gpt_") and f.endswith(".json") and not f.endswith("_mesh.json"))
    return (["train_gpt.json"] if os.path.exists(os.path.join(results_dir, "train_gpt.json")) else []) + names


def render_train_gpt_models(results_dir: str) -> Optional[str]:
    """One row per model family: float32's final validation loss and each configuration's
    ratio to it (or the step at which it went non-finite). None if only one model ran."""
    results = []
    for fname in _model_files(results_dir):
        with open(os.path.join(results_dir, fname)) as f:
            d = json.load(f)
        if d.get("benchmark") == "train_gpt" and "float32" in d.get("runs", {}):
            results.append(d)
    if len(results) < 2:
        return None
    order = ["gpt", "gpt2", "llama", "equinox"]  # benchmarks/models.py's FAMILIES
    family = lambda d: d["model"].get("family", "gpt")
    results.sort(key=lambda d: (order.index(family(d)) if family(d) in order else len(order), family(d)))
    configs = [c for c in MODEL_CONFIGS if any(c in d["runs"] for d in results)]
    rows = []
    for d in results:
        m, t = d["model"], d["training"]
        row = [m.get("family", "gpt"), f"{m['n_params'] / 1e6:.2f}M", str(t["steps"]),
               f"{d['runs']['float32']['final_val_loss']:.4f}"]
        for c in configs:
            r = d["runs"].get(c)
            if r is None:
                row.append("-")
            elif r.get("nonfinite_step") is not None:
                row.append(f"non-finite at step {r['nonfinite_step']}")
            else:
                row.append(f"{r['val_ratio']:.4f}")
        rows.append(row)
    devices = sorted({d["device"] for d in results})
    return "\n".join([
        "### Accuracy across model families (`benchmarks/train_gpt.py --model ...`)",
        "",
        f"Measured on **{', '.join(devices)}**. Final validation loss of float32 and, for each "
        "configuration, its ratio to it (same weights, batches and optimizer as float32). "
        "Models (`benchmarks/models.py`): gpt, plain JAX with `optax.adam`; gpt2, Flax linen; "
        "llama, Flax NNX; equinox, `eqx.nn` layers; the last three with "
        "`clip_by_global_norm(1.0)` and AdamW. scalify runs use no recipe beyond "
        "`scalify`, `sfy.optim.scaled_state` and, for fp8, `sfy.fp8.autocast`.",
        "",
        _table(["model", "params", "steps", "float32 val loss"] + [f"{c} / float32" for c in configs], rows),
    ])


def render_comm_bytes(d: Dict[str, Any], results_dir: str) -> str:
    header = ["mesh", "config", "weight all-gathers", "gradient reductions", "tensor-parallel reductions",
              "all collectives", "scalar all-reduces (before / after combiner)"]
    rows = []
    for mesh, configs in d["runs"].items():
        ref = configs.get("bfloat16", {}).get("bytes_by_category")
        ref_total = sum(configs["bfloat16"]["bytes_by_kind"].values()) if "bfloat16" in configs else 0
        for config, r in configs.items():
            cat = r["bytes_by_category"]

            def cell(key: str) -> str:
                n = cat[key]
                if not n:
                    return "-"
                dt = "/".join(k for k, _ in sorted(r["category_dtypes"][key].items(), key=lambda kv: -kv[1]))
                ratio = f" ({n / ref[key]:.2f}x)" if ref and ref.get(key) else ""
                return f"{fmt_bytes(n)}{ratio} {dt}"

            sc = r["scalar_all_reduces"]
            total = sum(r["bytes_by_kind"].values())
            rows.append([mesh, config, cell("weight_all_gather"), cell("gradient_reduction"),
                         cell("tensor_parallel_reduction"),
                         fmt_bytes(total) + (f" ({total / ref_total:.2f}x)" if ref_total else ""),
                         f"{sc['before_combiner']['runs']} / {sc['after_combiner']['runs']}"])
    return "\n".join([
        "### Communication per training step (`benchmarks/comm_bytes.py`)",
        "",
        f"Measured on **{d['device']}**, {d['devices']}: the main job's GPT step ({d['preset']} preset), "
        "as XLA's SPMD partitioner leaves it (read from its HLO dump; XLA's CPU backend later widens "
        "float8 collectives to float16, so the final CPU program is not the evidence). Bytes per device "
        f"and step ({d['bytes']}); ratios to bfloat16 on the same mesh; dtypes by share of bytes. "
        "Weight all-gathers: FSDP gathers over `data`; gradient reductions: all-reduces and "
        "reduce-scatters of gradients over `data`; tensor-parallel reductions: over `model`; scalar "
        "all-reduces: one-element reductions (measured scales, the loss), counted per run of the step. "
        "All collectives: every kind together, activations moved between devices included (a "
        "float32 activation gradient resharded at a reshape crossed the `model` axis until "
        "`reshape` rounded its operand first where devices share the program).",
        "",
        _table(header, rows, "llrrrrr"),
    ])


def render_scale_out(d: Dict[str, Any], results_dir: str) -> str:
    configs = list(d["runs"][0]["configs"])
    header = ["run", "command"] + [f"{c}: max loss diff / step time" for c in configs]
    rows = []
    for r in d["runs"]:
        cells = []
        for c in configs:
            v = r["configs"][c]
            diff = "identical" if v["identical_losses"] else f"{v['max_rel_loss_diff']:.1e}"
            cells.append(f"{diff} / {_ratio(v['step_time_vs_1_device'])}")
        rows.append([r["run"], f"`{r['command']}`"] + cells)
    m = d["model"]
    return "\n".join([
        "### Scaling out: one device, meshes, processes (`benchmarks/scale_out.py`)",
        "",
        f"Measured on **{d['device']}**. The main job (d_model={m['d_model']}, {m['n_layers']} layers), "
        f"{d['steps']} steps per run; each cell: the largest relative difference of a step's training loss "
        "from the single-device run's, and the median step time over the single-device run's (on CPU "
        "the 8 devices share the same cores: this is the cost of the partitioned program and its "
        "collectives, not a speed-up).",
        "",
        _table(header, rows, "ll" + "r" * len(configs)),
    ])


RENDERERS: List[tuple] = [
    ("train_gpt.json", render_train_gpt),
    ("overhead.json", render_overhead),
    ("optimizer_memory.json", render_optimizer_memory),
    ("fp8_matmul.json", render_fp8_matmul),
    ("scale_out.json", render_scale_out),
    ("comm_bytes.json", render_comm_bytes),
]


def render(results_dir: str) -> str:
    """The results section (without the markers) from the JSON files that exist."""
    parts = []
    for fname, fn in RENDERERS:
        path = os.path.join(results_dir, fname)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            try:
                parts.append(fn(d, results_dir))
            except (KeyError, TypeError, ValueError) as e:  # a JSON layout this script does not know
                parts.append(f"### {fname}\n\n(could not render {fname}: missing field {e})")
        if fname == "train_gpt.json":  # then the other models' train_gpt_<model>.json, if any
            try:
                table = render_train_gpt_models(results_dir)
            except (KeyError, TypeError, ValueError) as e:
                table = f"### train_gpt_<model>.json\n\n(could not render the per-model table: missing field {e})"
            if table:
                parts.append(table)
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
