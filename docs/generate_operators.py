"""Generate docs/operators.md, the coverage table of scalify's scaled rules.

Run ``python docs/generate_operators.py`` after adding a rule; a test fails when the
committed table is stale. Every primitive of ``jax.extend.core.primitives`` appears:
float-relevant ones as supported or not (with the first line of the rule's docstring, or
the reason it is missing), the others in a short list of primitives that never see a
ScaledArray.
"""
from __future__ import annotations

import os
import re
import sys

import jax.extend.core.primitives as P

import scalify  # noqa: F401  (registers the rules)
from scalify.core.wide import Wide
from scalify.core.registry import deferred_kinds, registered_primitives

# Primitives that never receive float data, so scale propagation does not apply.
NOT_FLOAT = {
    "after_all": "token", "create_token": "token", "and": "integer/bool", "or": "integer/bool",
    "not": "integer/bool", "xor": "integer/bool", "shift_left": "integer",
    "shift_right_arithmetic": "integer", "shift_right_logical": "integer",
    "population_count": "integer", "clz": "integer", "reduce_and": "bool", "reduce_or": "bool",
    "reduce_xor": "integer/bool", "random_bits": "PRNG keys", "random_fold_in": "PRNG keys",
    "random_seed": "PRNG keys", "random_split": "PRNG keys", "threefry2x32": "PRNG bits",
    "rng_bit_generator": "PRNG bits", "iota": "creates plain arrays", "axis_index": "integer",
    "get": "state refs", "swap": "state refs", "empty2": "uninitialised buffers",
    "name": "naming only", "bitcast_convert_type": "reinterprets bits: scaling has no meaning",
    "complex": "complex numbers", "conj": "complex numbers", "real": "complex numbers",
    "imag": "complex numbers",
}

# Why a float-relevant primitive has no rule (kept short; the error names it at runtime).
REASONS = {
    "eig": "complex eigenvalues and eigenvectors: ScaledArray data are real floats",
    "lu": "the packed result mixes the unit-lower factor L (scale-free) and U (at the"
          " input's scale): no single scale holds both over the range scalify promises;"
          " use `cholesky`/`qr` or `scalify.asarray` first",
    "hessenberg": "the packed result mixes H (at the input's scale) and scale-free"
                  " Householder reflectors: no single scale holds both",
    "tridiagonal": "the packed result mixes the tridiagonal part (at the input's scale)"
                   " and scale-free Householder reflectors: no single scale holds both",
    "fft": "FFTs (complex)",
    "random_gamma": "random sampling: its float operand (the gamma shape) is a"
                    " distribution parameter, not a tensor to scale; pass it as a plain array",
    "rng_uniform": "XLA's stateful RngUniform, which `jax.random` does not use",
    "custom_lin": "internal to autodiff; never in a traced jaxpr",
}


def _primitives():
    prims = {}
    for name in dir(P):
        obj = getattr(P, name)
        if name.endswith("_p") and hasattr(obj, "bind"):
            prims[obj.name] = obj
    return dict(sorted(prims.items()))


def _remark(rule) -> str:
    """The first sentence of the rule's docstring."""
    para = " ".join((rule.__doc__ or "").strip().split("\n\n")[0].split())
    end = para.find(". ")
    sentence = para if end < 0 else para[: end + 1]
    return sentence.replace("|", "\\|")


def _range(rule) -> str:
    """The rule's range guarantee, from its docstring: *guarded* rules measure their
    result's max-abs for float16/float8 data (`scalify.core.range_guard.fit_to_format`)."""
    return "guarded" if "range-guarded" in (rule.__doc__ or "").lower() else "static"


def _rounding(prim, rule) -> str:
    """How the rule rounds float16/float8 results (`ScalifyConfig(defer_rounding=True)`):
    *deferred*: it reads an elementwise chain's float32 result (`Wide`) and hands its own
    on in float32; *reads float32*: it reads a chain's float32 result but rounds its own
    at once; *at once*: its operands are rounded first and so is its result."""
    if not any(issubclass(Wide, k) for k in deferred_kinds(prim)):
        return "at once"
    doc = " ".join((rule.__doc__ or "").split())
    if re.search(r"on in float32 \(`Wide`|stays Wide", doc):
        return "deferred"
    return "reads float32"


def render() -> str:
    rules = registered_primitives()
    prims = _primitives()
    rows, unsupported, never = [], [], []
    for name, prim in prims.items():
        if name in NOT_FLOAT and prim not in rules:
            never.append(f"`{name}` ({NOT_FLOAT[name]})")
            continue
        if prim in rules:
            rows.append(f"| `{name}` | yes | {_range(rules[prim])} | {_rounding(prim, rules[prim])}"
                        f" | {_remark(rules[prim])} |")
        else:
            unsupported.append(f"| `{name}` | no | - | - | {REASONS.get(name, 'not yet')} |")
    relevant = len(rows) + len(unsupported)
    extra = sorted(p.name for p in rules if p.name not in prims)
    lines = [
        "# Operator coverage",
        "",
        "Generated by `python docs/generate_operators.py` from scalify's rule registry; do not"
        " edit by hand.",
        "",
        f"**{len(rows)} of {relevant} float-relevant primitives of `jax.extend.core.primitives`"
        f" have a scaled rule ({100 * len(rows) / relevant:.0f}%).** A primitive without a rule"
        " raises `scalify.UnsupportedPrimitiveError` naming it and the source line when it meets a"
        " ScaledArray; plain arrays always pass through unchanged.",
        "",
        "**Range.** *guarded*: the rule's static scale estimate can be off by more than a"
        " narrow format's range (products, powers, quotients, unbounded functions,"
        " contractions), so for float16 and float8 data the result's max-abs is measured"
        " and, outside a safe band, moved into the scale: the data is finite wherever the"
        " float32 value is finite and inside the scale range (`ScalifyConfig(range_guard=False)`"
        " turns it off). *static*: the data is bounded by the operands' data (data movement,"
        " selection, sums of two terms, bounded functions) or the scale is measured anyway"
        " (sums over 16 or more elements); the rule's docstring says which.",
        "",
        "**Rounding** of float16 and float8 results (`ScalifyConfig(defer_rounding=True)`,"
        " the default). *deferred*: the rule reads an elementwise chain's unrounded float32"
        " result and hands its own on in float32 at its static scale; the chain is rounded,"
        " and range-guarded if one of its rules is *guarded*, once, where a rule that is not"
        " *deferred*, or the function's output, reads it (one max-abs per chain instead of one"
        " per guarded rule; static bounds on the float32 data materialise a chain before it"
        " could over- or underflow float32). *reads float32*: the rule reads a chain's float32"
        " result but rounds (and guards) its own at once. *at once*: operands are rounded"
        " first, and so is the result.",
        "",
        "| primitive | scaled rule | range | rounding | remark |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        *unsupported,
        "",
    ]
    if extra:
        lines += ["Rules for primitives outside `jax.extend.core.primitives`: "
                  + ", ".join(f"`{n}`" for n in extra) + ".", ""]
    lines += ["Primitives that never carry scaled floats: " + ", ".join(never) + ".", ""]
    return "\n".join(lines)


PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "operators.md")

if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        with open(PATH) as f:
            sys.exit(0 if f.read() == text else 1)
    with open(PATH, "w") as f:
        f.write(text)
    print(f"wrote {PATH}")
