"""Differential fuzzer: random programs through `jit(scalify(f))` against float32 JAX.

    python benchmarks/fuzz.py --cases N [--seed S] [--json PATH]
    python benchmarks/fuzz.py --case S:I          # rerun one case, verbosely

Each case is drawn from ``numpy.random.default_rng([seed, index])`` alone, so ``S:I``
reproduces it exactly. A case is:

- a **program**: a chain of 2-8 ops applied to a running tensor ``x`` (rank 1-3, dims
  1-32), drawn from `OPS`, which covers the rule families: elementwise arithmetic and
  non-linear functions, reductions and normalisations, contractions (batched included),
  control flow (scan, cond, fori/while), indexing (gather, take_along_axis,
  dynamic_slice, scatter-add) and shape ops. Ops that need a second operand (``x + y``,
  ``x @ w``, a mask, indices) take it as a fresh input of the program;
- a **data dtype** (float16, bfloat16 or float8_e4m3fn) for every float input;
- **inputs**: unit-variance normal data times ``2**e``, ``e`` uniform in [-40, 40] per
  tensor; some all-zero tensors, some heavy-tailed (Student-t, 3 degrees of freedom) and
  some with a few outliers 100x the RMS. Indices, masks and loop bounds are plain
  integer/boolean inputs;
- a **mode**: ``fwd`` checks ``f`` itself, ``grad`` checks
  ``jax.grad(lambda *a: jnp.sum(f(*a) * w))`` with respect to every float input, for a
  random unit-variance cotangent weight ``w`` (one more input, held in the data dtype).

It runs two ways: ``sfy.asarray(jax.jit(sfy.scalify(f))(*scaled), jnp.float32)`` with
``scaled = sfy.as_scaled_array(inputs, dtype=data_dtype)``, and the float32 reference
``f(*sfy.asarray(scaled, jnp.float32))`` (the values the scaled inputs represent, so
input rounding is not counted as error).

Classes (`CLASSES`), checked in this order:

- ``unsupported`` / ``error``: scalify raised (`UnsupportedPrimitiveError`, or anything
  else: its type and first line are kept);
- ``out_of_range_skipped``: a float32 intermediate or result of the reference is not
  finite, or its largest magnitude exceeds ``2**100``, or its RMS is non-zero and below
  ``2**-100``: outside the scale range the contract speaks of (docs/design.md, the
  numerical contract, item 3), where float32 itself is no reference (it
  over/underflows). Checked after every op of the chain, and, for a case that would fail, after every primitive of the reference
  (`reference_out_of_range`: ``rsqrt(var)`` is a finite 0 where ``var`` overflowed);
- ``nonfinite``: scalify returns inf/NaN although the reference is finite and in range
  (and the per-tensor oracle below is finite: else ``ill_conditioned_skipped``);
- ``ill_conditioned_skipped``: even an ideally scaled computation in the data format
  cannot carry the answer: the oracle's error exceeds ``TOL_CAP / C``;
- ``inaccurate``: relative L2 error ``|got - ref| / |ref|`` (the worst gradient, in grad
  mode) above the tolerance;
- ``ok``.

**Tolerance** (relative L2 error): ``tol = min(TOL_CAP, C * max(e_oracle, e_floor))``.

- ``e_oracle`` is the error of an *oracle*: the float32 program evaluated primitive by
  primitive (`rounded_eval` on its jaxpr, the backward pass included in grad mode) with
  every primitive's output rounded to the data dtype at an ideal power-of-two scale.
  That is what scalify computes when every scale it picks is ideal: scalify's rules too
  compute each primitive in float32 and round once to the data dtype. So ``e_oracle``
  is the error that the data format itself costs this very program, conditioning
  included (``exp`` of values near 30 turns a rounding of its input into an error 30x
  larger; ``rsqrt`` of an element that cancellation left near 0 more still), and the
  ideal is the contract's "within the tolerance of the data dtype".
  The *element-wise* oracle (`round_ideal`: every element at its own ideal scale, one
  cheap fused op per primitive) judges first. A case it would fail is judged again by a
  *per-tensor* oracle (one scale per tensor: a reduction per primitive, compiled for
  failing cases only), which alone sees tensors whose elements span more binades than
  the format holds: accuracy against ideal *unit* scaling (``round_tensor_rms``: the
  power of two of the RMS, the scale scalify aims for), finiteness against the scale
  that gives small values all the format's range (``round_tensor_amax``: the contract
  wants finite data wherever some scale keeps it finite). A case that the per-tensor
  oracle cannot carry either is ``ill_conditioned_skipped`` (``gelu`` of [1, 5000] in
  float16: ``x + 0.044715 x**3`` puts 1 at 2**-37 of the sum's RMS); one it can is a
  failure (``min(1e14, 6e4)``, whose 6e4 the rule's scale of 1e14 flushes to 0).
- ``e_floor = u * sqrt(n_ops) / 2``, with ``u`` the unit roundoff of the data dtype
  (2**-11 float16, 2**-8 bfloat16, 2**-4 float8_e4m3fn): about the error of ``n_ops``
  independent roundings. It keeps the bound from collapsing where the oracle happens to
  be exact (a few elements, data movement).
- ``C = 4``: scalify and the oracle round at the same points, in the same format, with
  power-of-two scales (which leave mantissas, hence roundings, unchanged), so for a
  correct rule their errors nearly coincide (the median of ``err / max(e_oracle,
  e_floor)`` is below 1; the table prints its percentiles). They differ where a rule
  computes several primitives in one float32 step or the low-precision program rounds
  elsewhere than the float32 one (``jnp.mean`` of float16 sums in float32), and for
  elements that a per-tensor scale leaves subnormal: a factor 4 covers these.
- ``TOL_CAP = 0.5``: an error of half the signal means the result carries no
  information; beyond it (``C * e_oracle > TOL_CAP``) the case is skipped.

That gives, without ill-conditioning, 1.0e-3 (float16), 7.8e-3 (bfloat16), 0.125
(float8) for one op; 2.8e-3, 2.2e-2, 0.35 for 8 ops; more where the oracle says the
program is ill-conditioned.

Float8 cases draw only from ops whose result a float8 input can carry (`FLOAT8_OPS`
excludes ``exp``, ``log``, ``softmax``, ``log_softmax``, ``cube``, ``power``, whose
condition number is not bounded near 1 for O(1) inputs, and the means and
normalisations, whose ``1/n`` the float8 program rounds: ``jnp.mean`` of 23 float8
elements divides by 24). Constants in the programs are exact in every data dtype that
meets them (``EPS = 2**-20``, not ``1e-6``, a float16 subnormal that rounds by 1.3%).

For a failing case, the op to blame (``culprit``) is found by running the scalified
chain with every intermediate as an output and taking the first one that fails the same
checks (an exception: the shortest prefix of the chain that raises); in ``grad`` mode,
``backward`` when every forward intermediate passes.

Output: a table of counts per op (cases containing the op) and per class, per dtype and
mode, the culprit ops of failures, the time per case, and a JSON file (default
``benchmarks/results/fuzz.json``) with the counts, seed, N, versions and, for each failing
case, a compact reproducible description.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __name__ in ("__main__", "__mp_main__") and os.environ.get("FUZZ_XLA_OPT", "0") != "1":
    # Compilation is most of a case's time; LLVM's optimisation of the generated CPU code
    # is a third of it and irrelevant to the values (no fast-math either way).
    # FUZZ_XLA_OPT=1 keeps XLA's default.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import scalify as sfy  # noqa: E402
from scalify.core.pow2 import pow2_round_down  # noqa: E402

CLASSES = ("ok", "nonfinite", "inaccurate", "error", "unsupported",
           "out_of_range_skipped", "ill_conditioned_skipped")
FAILURES = ("nonfinite", "inaccurate", "error", "unsupported")

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}
# Unit roundoff (half the spacing of numbers in [1, 2)).
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float8_e4m3fn": 2.0**-4}
C_ORACLE = 4.0
TOL_CAP = 0.5
RANGE_MAX = 2.0**100
RANGE_MIN = 2.0**-100
MAX_SIZE = 2048  # elements of any tensor of a program
EXP_RANGE = 40

# The per-tensor oracle that judges a case the element-wise one would fail: accuracy
# against ideal unit scaling (the scale scalify aims for: the RMS), finiteness against
# the scale that gives the format's whole range to small values (the contract wants
# finite data wherever *some* scale keeps it finite).
PER_TENSOR_ORACLE = {"inaccurate": "rms", "nonfinite": "amax"}

# Primitives without a scaled rule that the op table may meet, with the reason they are
# documented as unsupported (none at present). `tests/test_fuzz.py` accepts
# `unsupported` cases naming only these.
DOCUMENTED_UNSUPPORTED: Dict[str, str] = {}


def error_floor(dtype: str, n_ops: int) -> float:
    return UNIT_ROUNDOFF[dtype] * math.sqrt(max(n_ops, 1)) / 2


def tolerance(dtype: str, n_ops: int, e_oracle: float) -> float:
    return min(TOL_CAP, C_ORACLE * max(e_oracle, error_floor(dtype, n_ops)))


# ---------------------------------------------------------------------------------------
# Programs.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Input:
    """A fresh input of the program: ``kind`` float (values drawn from ``dist`` times
    ``2**exp``), int (uniform in ``[0, high)``) or bool."""
    kind: str
    shape: Tuple[int, ...]
    dist: str = "normal"
    exp: int = 0
    high: int = 2
    role: str = ""

    def describe(self) -> str:
        if self.kind == "float":
            mag = "" if self.dist == "zeros" else f"*2**{self.exp}"
            return f"{self.role}:f{list(self.shape)}={self.dist}{mag}"
        if self.kind == "int":
            return f"{self.role}:i{list(self.shape)}<{self.high}"
        return f"{self.role}:b{list(self.shape)}"


@dataclasses.dataclass
class Op:
    name: str        # family name, the row of the per-op table
    params: tuple    # static parameters (with the shapes, the cache key)
    out_shape: Tuple[int, ...]
    inputs: List[Input]
    fn: Callable[..., Any]  # fn(x, *inputs) -> new x
    src: str         # one line of Python, with `x` and the inputs as a0, a1, ...

    @property
    def label(self) -> str:
        return self.name if not self.params else f"{self.name}{list(self.params)}"


def _dim(rng: np.random.Generator) -> int:
    """1..32, log-uniform (small dims, and dims of 1, are common)."""
    return int(2 ** rng.uniform(0, 5.0))


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _float_input(rng: np.random.Generator, shape: Tuple[int, ...], role: str) -> Input:
    u = rng.uniform()
    dist = "zeros" if u < 0.08 else "student_t" if u < 0.18 else "outliers" if u < 0.28 else "normal"
    return Input("float", tuple(shape), dist=dist, exp=int(rng.integers(-EXP_RANGE, EXP_RANGE + 1)), role=role)


def _values(inp: Input, rng: np.random.Generator) -> np.ndarray:
    if inp.kind == "int":
        return rng.integers(0, inp.high, size=inp.shape).astype(np.int32)
    if inp.kind == "bool":
        return rng.uniform(size=inp.shape) < 0.5
    if inp.dist == "zeros":
        v = np.zeros(inp.shape)
    elif inp.dist == "student_t":
        v = rng.standard_t(3, size=inp.shape) / np.sqrt(3.0)  # unit variance
    else:
        v = rng.standard_normal(size=inp.shape)
        if inp.dist == "outliers" and v.size:
            k = max(1, v.size // 64)
            idx = rng.choice(v.size, size=k, replace=False)
            v.reshape(-1)[idx] = 100.0 * rng.choice([-1.0, 1.0], size=k)
    return (v * 2.0**inp.exp).astype(np.float32)


# Each builder: (rng, shape, ctx) -> Op, or None when it does not apply to ``shape``.
Builder = Callable[[np.random.Generator, Tuple[int, ...], "Ctx"], Optional[Op]]


@dataclasses.dataclass
class Ctx:
    dtype: str
    mode: str


def _unary(name: str, fn: Callable[[Any], Any], src: str) -> Builder:
    def build(rng, shape, ctx):
        return Op(name, (), shape, [], fn, src)
    return build


def _binary(name: str, fn: Callable[[Any, Any], Any], src: str) -> Builder:
    """``fn(x, y)`` with a fresh ``y`` of x's shape, of its last dim (a bias) or a
    scalar."""
    def build(rng, shape, ctx):
        kind = rng.choice(["same", "same", "bias", "scalar"])
        yshape = shape if kind == "same" else shape[-1:] if kind == "bias" else ()
        return Op(name, (str(kind),), shape, [_float_input(rng, yshape, "y")], fn, src)
    return build


def b_where(rng, shape, ctx):
    if rng.uniform() < 0.5:
        return Op("where", ("y",), shape, [Input("bool", shape, role="mask"), _float_input(rng, shape, "y")],
                  lambda x, m, y: jnp.where(m, x, y), "x = jnp.where(a0, x, a1)")
    return Op("where", ("0",), shape, [Input("bool", shape, role="mask")],
              lambda x, m: jnp.where(m, x, 0.0), "x = jnp.where(a0, x, 0.0)")


def b_const(rng, shape, ctx):
    c = float(rng.choice([0.125, 3.0, -1.5, 1.0, -0.5]))
    if rng.uniform() < 0.5:
        return Op("mul_const", (c,), shape, [], lambda x: x * c, f"x = x * {c}")
    return Op("add_const", (c,), shape, [], lambda x: x + c, f"x = x + {c}")


def b_power(rng, shape, ctx):
    p = float(rng.choice([0.5, 1.5, 2.5, -0.5, -1.5]))
    return Op("power", (p,), shape, [], lambda x: jnp.power(jnp.abs(x), p), f"x = jnp.power(jnp.abs(x), {p})")


def _axis(rng, shape) -> int:
    return int(rng.integers(0, len(shape)))


def _reduction(name: str, fn: Callable[..., Any], src: str) -> Builder:
    def build(rng, shape, ctx):
        axis = _axis(rng, shape)
        keep = len(shape) == 1 or bool(rng.uniform() < 0.3)
        out = tuple(1 if i == axis else d for i, d in enumerate(shape)) if keep else shape[:axis] + shape[axis + 1:]
        return Op(name, (axis, keep), out, [], lambda x: fn(x, axis=axis, keepdims=keep),
                  src.format(axis=axis, keep=keep))
    return build


# Constants of the programs are exact in every data dtype they meet (a Python constant
# takes the data dtype in the traced program: 1e-6 is a float16 subnormal, 1.0133e-6).
EPS = 2.0**-20


def _layernorm(x):
    m = jnp.mean(x, axis=-1, keepdims=True)
    v = jnp.var(x, axis=-1, keepdims=True)
    return (x - m) * lax.rsqrt(v + EPS)


def _rmsnorm(x):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)


def b_matmul(rng, shape, ctx):
    k = _dim(rng)
    out = shape[:-1] + (k,)
    if _size(out) > MAX_SIZE:
        return None
    return Op("matmul", (k,), out, [_float_input(rng, (shape[-1], k), "w")], lambda x, w: x @ w, "x = x @ a0")


def b_einsum(rng, shape, ctx):
    """Batched contraction: a batch of weights, or x's own leading dim as the batch."""
    k = _dim(rng)
    if len(shape) == 3:
        b, m, n = shape
        spec = "bmn,bnk->bmk"
        out = (b, m, k)
        w = (b, n, k)
    else:
        b = _dim(rng)
        spec = "mn,bnk->bmk" if len(shape) == 2 else "n,bnk->bk"
        out = (b,) + shape[:-1] + (k,)
        w = (b, shape[-1], k)
    if _size(out) > MAX_SIZE or _size(w) > MAX_SIZE:
        return None
    return Op("einsum", (spec, k), out, [_float_input(rng, w, "w")],
              lambda x, w: jnp.einsum(spec, x, w), f"x = jnp.einsum('{spec}', x, a0)")


def b_self_matmul(rng, shape, ctx):
    """``x @ x^T`` (batched for rank 3): correlated operands, like attention scores."""
    if len(shape) < 2:
        return None
    out = shape[:-1] + (shape[-2],)
    if _size(out) > MAX_SIZE:
        return None
    return Op("self_matmul", (), out, [], lambda x: jnp.einsum("...mn,...kn->...mk", x, x),
              "x = jnp.einsum('...mn,...kn->...mk', x, x)")


def b_scan(rng, shape, ctx):
    """``lax.scan`` over the leading axis with a carry (initialised from a fresh input):
    a running sum, or an RNN step ``tanh(c @ w + x_t)`` for rank 2."""
    carry = _float_input(rng, shape[1:], "c0")
    if len(shape) == 2 and rng.uniform() < 0.5:
        n = shape[1]

        def rnn(x, c0, w):
            def body(c, xt):
                c = jnp.tanh(c @ w + xt)
                return c, c
            return lax.scan(body, c0, x)[1]
        return Op("scan", ("rnn",), shape, [carry, _float_input(rng, (n, n), "w")], rnn,
                  "x = lax.scan(lambda c, xt: (jnp.tanh(c @ a1 + xt),) * 2, a0, x)[1]")

    def cumsum(x, c0):
        def body(c, xt):
            c = c + xt
            return c, c * 0.5
        return lax.scan(body, c0, x)[1]
    return Op("scan", ("sum",), shape, [carry], cumsum,
              "x = lax.scan(lambda c, xt: (c + xt, (c + xt) * 0.5), a0, x)[1]")


def b_cond(rng, shape, ctx):
    pair = int(rng.integers(0, 2))
    if pair == 0:
        fns, src = (lambda x: jnp.tanh(x), lambda x: x * 2.0), "jnp.tanh, lambda x: x * 2.0"
    else:
        fns, src = (lambda x: x * x, lambda x: -jnp.abs(x)), "lambda x: x * x, lambda x: -jnp.abs(x)"
    return Op("cond", (pair,), shape, [Input("bool", (), role="pred")],
              lambda x, p: lax.cond(p, fns[0], fns[1], x), f"x = lax.cond(a0, {src}, x)")


def b_fori(rng, shape, ctx):
    """``fori_loop`` with static bounds (a scan) or, forward only, a traced bound (a
    while loop): ``c = tanh(c) * 0.5 + x``."""
    def body_of(x):
        return lambda i, c: jnp.tanh(c) * 0.5 + x
    if ctx.mode == "fwd" and rng.uniform() < 0.5:
        return Op("while", (), shape, [Input("int", (), high=4, role="n")],
                  lambda x, n: lax.fori_loop(0, n, body_of(x), x),
                  "x = lax.fori_loop(0, a0, lambda i, c: jnp.tanh(c) * 0.5 + x, x)")
    n = int(rng.integers(1, 4))
    return Op("fori", (n,), shape, [], lambda x: lax.fori_loop(0, n, body_of(x), x),
              f"x = lax.fori_loop(0, {n}, lambda i, c: jnp.tanh(c) * 0.5 + x, x)")


def b_gather(rng, shape, ctx):
    k = _dim(rng)
    out = (k,) + shape[1:]
    if _size(out) > MAX_SIZE:
        return None
    return Op("gather", (k,), out, [Input("int", (k,), high=shape[0], role="idx")], lambda x, i: x[i], "x = x[a0]")


def b_take_along(rng, shape, ctx):
    k = _dim(rng)
    out = shape[:-1] + (k,)
    if _size(out) > MAX_SIZE:
        return None
    return Op("take_along_axis", (k,), out, [Input("int", out, high=shape[-1], role="idx")],
              lambda x, i: jnp.take_along_axis(x, i, axis=-1), "x = jnp.take_along_axis(x, a0, axis=-1)")


def b_dynamic_slice(rng, shape, ctx):
    size = int(rng.integers(1, shape[0] + 1))
    out = (size,) + shape[1:]
    return Op("dynamic_slice", (size,), out, [Input("int", (), high=shape[0], role="start")],
              lambda x, s: lax.dynamic_slice_in_dim(x, s, size, axis=0),
              f"x = lax.dynamic_slice_in_dim(x, a0, {size}, axis=0)")


def b_scatter_add(rng, shape, ctx):
    k = _dim(rng)
    return Op("scatter_add", (k,), shape, [Input("int", (k,), high=shape[0], role="idx"),
                                          _float_input(rng, (k,) + shape[1:], "y")],
              lambda x, i, y: x.at[i].add(y), "x = x.at[a0].add(a1)")


def b_reshape(rng, shape, ctx):
    if len(shape) >= 2:
        out = shape[:-2] + (shape[-2] * shape[-1],)
    else:
        out = shape + (1,)
    return Op("reshape", (), out, [], lambda x: x.reshape(out), f"x = x.reshape({out})")


def b_transpose(rng, shape, ctx):
    if len(shape) < 2:
        return None
    perm = tuple(int(p) for p in rng.permutation(len(shape)))
    out = tuple(shape[p] for p in perm)
    return Op("transpose", (perm,), out, [], lambda x: jnp.transpose(x, perm), f"x = jnp.transpose(x, {perm})")


def b_concat(rng, shape, ctx):
    axis = _axis(rng, shape)
    d = _dim(rng)
    yshape = tuple(d if i == axis else s for i, s in enumerate(shape))
    out = tuple(s + d if i == axis else s for i, s in enumerate(shape))
    if _size(out) > MAX_SIZE:
        return None
    return Op("concatenate", (axis,), out, [_float_input(rng, yshape, "y")],
              lambda x, y: jnp.concatenate([x, y], axis=axis), f"x = jnp.concatenate([x, a0], axis={axis})")


def b_broadcast(rng, shape, ctx):
    if len(shape) >= 3:
        return None
    b = int(rng.integers(1, 5))
    out = (b,) + shape
    if _size(out) > MAX_SIZE:
        return None
    return Op("broadcast", (b,), out, [], lambda x: jnp.broadcast_to(x[None], out),
              f"x = jnp.broadcast_to(x[None], {out})")


OPS: Dict[str, Builder] = {
    # elementwise arithmetic
    "add": _binary("add", lambda x, y: x + y, "x = x + a0"),
    "sub": _binary("sub", lambda x, y: x - y, "x = x - a0"),
    "mul": _binary("mul", lambda x, y: x * y, "x = x * a0"),
    "mul_self": _unary("mul_self", lambda x: x * x, "x = x * x"),
    "div": _binary("div", lambda x, y: x / y, "x = x / a0"),
    "const": b_const,
    "neg": _unary("neg", lambda x: -x, "x = -x"),
    "abs": _unary("abs", jnp.abs, "x = jnp.abs(x)"),
    "maximum": _binary("maximum", jnp.maximum, "x = jnp.maximum(x, a0)"),
    "minimum": _binary("minimum", jnp.minimum, "x = jnp.minimum(x, a0)"),
    "relu": _unary("relu", jax.nn.relu, "x = jax.nn.relu(x)"),
    "where": b_where,
    # non-linear
    "exp": _unary("exp", jnp.exp, "x = jnp.exp(x)"),
    "log": _unary("log", lambda x: jnp.log(jnp.abs(x)), "x = jnp.log(jnp.abs(x))"),
    "tanh": _unary("tanh", jnp.tanh, "x = jnp.tanh(x)"),
    "logistic": _unary("logistic", jax.nn.sigmoid, "x = jax.nn.sigmoid(x)"),
    "sqrt": _unary("sqrt", lambda x: jnp.sqrt(jnp.abs(x)), "x = jnp.sqrt(jnp.abs(x))"),
    "rsqrt": _unary("rsqrt", lambda x: lax.rsqrt(jnp.abs(x)), "x = lax.rsqrt(jnp.abs(x))"),
    "square": _unary("square", lambda x: x**2, "x = x**2"),
    "cube": _unary("cube", lambda x: x**3, "x = x**3"),
    "power": b_power,
    "gelu": _unary("gelu", jax.nn.gelu, "x = jax.nn.gelu(x)"),
    "silu": _unary("silu", jax.nn.silu, "x = jax.nn.silu(x)"),
    "softmax": _unary("softmax", lambda x: jax.nn.softmax(x, axis=-1), "x = jax.nn.softmax(x, axis=-1)"),
    "log_softmax": _unary("log_softmax", lambda x: jax.nn.log_softmax(x, axis=-1),
                          "x = jax.nn.log_softmax(x, axis=-1)"),
    # reductions and normalisation
    "sum": _reduction("sum", jnp.sum, "x = jnp.sum(x, axis={axis}, keepdims={keep})"),
    "mean": _reduction("mean", jnp.mean, "x = jnp.mean(x, axis={axis}, keepdims={keep})"),
    "max": _reduction("max", jnp.max, "x = jnp.max(x, axis={axis}, keepdims={keep})"),
    "var": _reduction("var", jnp.var, "x = jnp.var(x, axis={axis}, keepdims={keep})"),
    "layernorm": _unary("layernorm", _layernorm,
                        "x = (x - x.mean(-1, keepdims=True)) * lax.rsqrt(x.var(-1, keepdims=True) + 2**-20)"),
    "rmsnorm": _unary("rmsnorm", _rmsnorm, "x = x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 2**-20)"),
    # contractions
    "matmul": b_matmul,
    "einsum": b_einsum,
    "self_matmul": b_self_matmul,
    # control flow
    "scan": b_scan,
    "cond": b_cond,
    "fori": b_fori,
    # indexing
    "gather": b_gather,
    "take_along_axis": b_take_along,
    "dynamic_slice": b_dynamic_slice,
    "scatter_add": b_scatter_add,
    # shape
    "reshape": b_reshape,
    "transpose": b_transpose,
    "concatenate": b_concat,
    "broadcast": b_broadcast,
}
FLOAT8_EXCLUDED = ("exp", "log", "softmax", "log_softmax", "cube", "power",  # ill-conditioned
                   "mean", "var", "layernorm", "rmsnorm")  # 1/n is not exact in float8
FLOAT8_OPS = tuple(k for k in OPS if k not in FLOAT8_EXCLUDED)


@dataclasses.dataclass
class Case:
    seed: int
    index: int
    mode: str
    dtype: str
    x0: Input
    ops: List[Op]
    w: Optional[Input]  # grad mode: the cotangent weight
    values: List[np.ndarray]  # float32/int32/bool values of all inputs, x0 first, w last

    @property
    def name(self) -> str:
        return f"{self.seed}:{self.index}"

    @property
    def inputs(self) -> List[Input]:
        out = [self.x0] + [i for op in self.ops for i in op.inputs]
        return out + ([self.w] if self.w is not None else [])

    @property
    def key(self) -> tuple:
        return (self.mode, self.dtype, self.x0.shape, tuple((op.name, op.params, op.out_shape) for op in self.ops),
                tuple((i.kind, i.shape) for i in self.inputs))


def draw_case(seed: int, index: int) -> Case:
    """The case ``seed:index``: a function of the two numbers alone."""
    rng = np.random.default_rng([seed, index])
    mode = "grad" if rng.uniform() < 0.4 else "fwd"
    dtype = str(rng.choice(list(DTYPES), p=[0.45, 0.3, 0.25]))
    ctx = Ctx(dtype, mode)
    rank = int(rng.integers(1, 4))
    while True:
        shape = tuple(_dim(rng) for _ in range(rank))
        if _size(shape) <= MAX_SIZE // 2:
            break
    x0 = _float_input(rng, shape, "x")
    names = FLOAT8_OPS if dtype == "float8_e4m3fn" else tuple(OPS)
    n_ops = int(rng.integers(2, 9))
    ops: List[Op] = []
    while len(ops) < n_ops:
        op = OPS[str(rng.choice(names))](rng, shape, ctx)
        if op is None:
            continue
        ops.append(op)
        shape = op.out_shape
    w = Input("float", shape, dist="normal", exp=0, role="w") if mode == "grad" else None
    case = Case(seed, index, mode, dtype, x0, ops, w, [])
    case.values = [_values(i, rng) for i in case.inputs]
    return case


def chain(case: Case, args: Sequence[Any]) -> List[Any]:
    """Run the op chain on ``args`` (x0 first): the intermediates after each op (the
    last is the result)."""
    x, k, out = args[0], 1, []
    for op in case.ops:
        n = len(op.inputs)
        x = op.fn(x, *args[k:k + n])
        k += n
        out.append(x)
    return out


def float_positions(case: Case) -> Tuple[int, ...]:
    n = len(case.inputs) - (1 if case.w is not None else 0)
    return tuple(i for i, inp in enumerate(case.inputs[:n]) if inp.kind == "float")


def program(case: Case, all_outputs: bool = False) -> Callable[..., Any]:
    """The function checked: ``f`` (fwd) or the gradient of ``sum(f * w)`` with respect
    to every float input (grad; ``w`` is the last argument). ``all_outputs``: forward
    intermediates too (for the culprit search)."""
    if case.mode == "fwd":
        def f(*args):
            inter = chain(case, args)
            return inter if all_outputs else inter[-1]
        return f
    argnums = float_positions(case)

    def f(*args):
        *xs, w = args

        def loss(*xs):
            inter = chain(case, xs)
            return jnp.sum(inter[-1] * w), inter
        grads, inter = jax.grad(loss, argnums=argnums, has_aux=True)(*xs)
        return (inter, grads) if all_outputs else grads
    return f


def round_ideal(x: Any, dtype: np.dtype) -> Any:
    """``x`` (float32) rounded to the precision of ``dtype`` (its mantissa bits) with
    float32's exponent range: rounding at an ideal scale, per element (no overflow,
    no underflow). Elementwise, so XLA fuses it into the program (`round_tensor`'s
    reduction per primitive costs compile time, most of a case's cost). It is a lower
    bound of `round_tensor`'s error: they differ for elements far below the tensor's
    largest (which a per-tensor scale leaves subnormal or zero), whose rounding weighs
    little in an L2 error unless a later op magnifies them."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=int(ml_dtypes.finfo(dtype).nmant))


def _scale_exponent(x: Any, dtype: np.dtype, kind: str) -> Any:
    """The exponent ``k`` of the ideal power-of-two scale ``2**k`` of the tensor ``x``
    for data of ``dtype``: ``kind="rms"``, the power of two at or below the RMS (unit
    scaling, `sfy.as_scaled_array`'s choice); ``kind="amax"``, the largest magnitude one
    binade below the format's maximum (all the format's range below it). -inf for an
    all-zero tensor."""
    a = jnp.abs(x).astype(jnp.float32)
    amax = jnp.max(a)
    ok = (amax > 0) & jnp.isfinite(amax)
    amax = jnp.where(ok, amax, 1.0)
    if kind == "rms":
        top = amax * jnp.sqrt(jnp.mean(jnp.square(a / amax)))
        shift = 0
    else:
        top, shift = amax, min(int(np.floor(np.log2(float(ml_dtypes.finfo(dtype).max)))) - 1, 14)
    return jnp.where(ok, jnp.clip(jnp.floor(jnp.log2(top)) - shift, -120, 120), -jnp.inf)


def _round_at(x: Any, k: Any, dtype: np.dtype) -> Any:
    """``x`` rounded to ``dtype`` data at scale ``2**k`` (saturating at the format's
    largest finite value), as float32 (``k = -inf``: unchanged)."""
    fmax = float(ml_dtypes.finfo(dtype).max)
    ok = jnp.isfinite(k)
    k = jnp.where(ok, k, 0.0)
    d = jnp.clip(x * jnp.exp2(-k), -fmax, fmax)
    return jnp.where(ok, d.astype(dtype).astype(x.dtype) * jnp.exp2(k), x)


def _per_tensor(kind: str) -> Callable[[Any, np.dtype], Any]:
    def rnd(x: Any, dtype: np.dtype) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
            return x
        return _round_at(x, _scale_exponent(x, dtype, kind), dtype)
    rnd.kind = kind
    rnd.__name__ = f"round_tensor_{kind}"
    rnd.__doc__ = (f"``x`` (float32) rounded to ``dtype`` at the ideal ``{kind}`` power-of-two scale "
                   "of the whole tensor (`_scale_exponent`), as float32.")
    return rnd


round_tensor_rms = _per_tensor("rms")
round_tensor_amax = _per_tensor("amax")
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")


def _aligned_comparison(p: Any, a: Any, b: Any, dtype: np.dtype, kind: str, **params: Any) -> Any:
    """A comparison of operands held at different per-tensor scales, on both rounded to
    the coarser one (as scalify compares aligned data): ``max(x, y) == x`` in a max's
    derivative holds for the rounded max."""
    if not (jnp.issubdtype(jnp.result_type(a), jnp.floating) and jnp.issubdtype(jnp.result_type(b), jnp.floating)):
        return p.bind(a, b, **params)
    a, b = jnp.asarray(a), jnp.asarray(b)
    k = jnp.maximum(_scale_exponent(a, dtype, kind) if a.size else -jnp.inf,
                    _scale_exponent(b, dtype, kind) if b.size else -jnp.inf)
    return p.bind(_round_at(a, k, dtype), _round_at(b, k, dtype), **params)


def rounded_eval(closed: Any, args: Sequence[Any], dtype: np.dtype, rnd: Callable[..., Any] = round_ideal,
                 observe: Optional[Callable[[str, Any, Sequence[Any]], None]] = None) -> List[Any]:
    """Evaluate a float32 ``ClosedJaxpr`` with the output of every primitive rounded by
    ``rnd`` to ``dtype``: the program as a low-precision computation with ideal
    scales, rounding at the same points as scalify's rules. Control flow runs through
    `lax.scan` / `lax.switch` / `lax.while_loop` with rounded bodies; calls (jit,
    custom_jvp/vjp, remat) are inlined. ``observe(name, value, operands)`` sees every primitive's
    output outside control-flow bodies."""
    from jax.extend import core as jcore
    P = jcore.primitives
    jaxpr = closed.jaxpr
    env: Dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]
    for v, a in zip(jaxpr.constvars, closed.consts):
        env[v] = a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        inv = [read(v) for v in eqn.invars]
        p, prm = eqn.primitive, eqn.params
        if p is P.scan_p:
            nc, nk = prm["num_consts"], prm["num_carry"]
            consts, init, xs = inv[:nc], inv[nc:nc + nk], inv[nc + nk:]

            def body(carry, x, body=prm["jaxpr"], consts=consts, nk=nk):
                out = rounded_eval(body, [*consts, *carry, *x], dtype, rnd)
                return out[:nk], out[nk:]
            carry, ys = lax.scan(body, init, xs, length=prm["length"], reverse=prm["reverse"])
            outs = [*carry, *ys]
        elif p is P.cond_p:
            branches = [functools.partial(lambda b, *ops: rounded_eval(b, ops, dtype, rnd), b) for b in prm["branches"]]
            outs = lax.switch(inv[0], branches, *inv[1:])
        elif p is P.while_p:
            cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
            cc, bc, init = inv[:cn], inv[cn:cn + bn], inv[cn + bn:]
            outs = lax.while_loop(lambda c: rounded_eval(prm["cond_jaxpr"], [*cc, *c], dtype, rnd)[0],
                                  lambda c: rounded_eval(prm["body_jaxpr"], [*bc, *c], dtype, rnd), list(init))
        elif p in (P.jit_p, P.custom_jvp_call_p, P.custom_vjp_call_p, P.closed_call_p, P.remat_p):
            sub = prm.get("jaxpr", prm.get("call_jaxpr"))
            if not isinstance(sub, jcore.ClosedJaxpr):
                sub = jcore.ClosedJaxpr(sub, ())
            outs = rounded_eval(sub, inv, dtype, rnd, observe)
        elif hasattr(rnd, "kind") and p.name in _COMPARISONS:
            outs = [_aligned_comparison(p, *inv, dtype, rnd.kind, **prm)]
        else:
            outs = p.bind(*inv, **prm)
            outs = [rnd(o, dtype) for o in (outs if p.multiple_results else [outs])]
        if observe is not None:
            for o in outs:
                observe(p.name, o, inv)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


# Primitives whose float32 result is 0 only where an operand is 0 (or, for div, the
# divisor infinite): a 0 elsewhere is an underflow of float32, not the value.
_ZERO_ONLY_FROM_ZERO = {"mul": "all", "integer_pow": "all", "square": "all", "div": "first"}


def _underflowed(name: str, o: Any, operands: Sequence[Any]) -> Any:
    """True where a product-like primitive's float32 result flushed to 0 although its
    operands make it non-zero (``x * x`` of ``x`` at 2**-77): float32 is no reference
    for the value there (a ScaledArray holds it)."""
    which = _ZERO_ONLY_FROM_ZERO.get(name)
    if which is None:
        return jnp.bool_(False)
    ops = [jnp.asarray(v) for v in operands if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    ops = ops[:1] if which == "first" else ops
    nonzero = functools.reduce(jnp.logical_and, [(v != 0) & jnp.isfinite(v) for v in ops], jnp.bool_(True))
    if name == "div" and len(operands) > 1:
        nonzero = nonzero & jnp.isfinite(jnp.asarray(operands[1]))
    return jnp.any((o == 0) & nonzero)


def reference_out_of_range(case: Case, x32: Sequence[Any]) -> Optional[str]:
    """The first primitive of the float32 reference (backward pass included, bodies of
    control flow excepted) whose output is out of range as `in_range` says (not
    finite, largest magnitude above ``2**100``, RMS non-zero and below ``2**-100``), or
    flushed to 0 by float32 where its operands make it non-zero (`_underflowed`), or
    None. The op-level intermediates may be in range when a primitive inside an op was
    not: ``rsqrt(var(v))`` of ``var(v) = inf`` is 0. Run for failing cases only."""
    fn = program(case)
    names: List[str] = []

    def stats(*args):
        closed = jax.make_jaxpr(fn)(*args)
        out = []

        def observe(name, o, operands):
            if jnp.issubdtype(o.dtype, jnp.floating) and o.size:
                a = jnp.abs(o.astype(jnp.float32))
                amax = jnp.max(a)
                norm = jnp.where((amax > 0) & jnp.isfinite(amax), amax, 1.0)
                rms = norm * jnp.sqrt(jnp.mean(jnp.square(a / norm)))
                ok = jnp.all(jnp.isfinite(o)) & ~_underflowed(name, o, operands)
                out.append(jnp.stack([ok.astype(jnp.float32), amax, rms]))
                names.append(name)
        rounded_eval(closed, jax.tree.leaves(args), DTYPES[case.dtype], lambda o, d: o, observe)
        return out
    for name, (finite, amax, rms) in zip(names, np.asarray(jax.jit(stats)(*x32)).reshape(-1, 3)):
        if not finite or amax > RANGE_MAX or (amax > 0 and rms < RANGE_MIN):
            return name
    return None


def oracle(case: Case, all_outputs: bool = False, per_tensor: Optional[str] = None) -> Callable[..., Any]:
    """`program` evaluated by `rounded_eval` (its float32 jaxpr, every primitive's output
    rounded to the data dtype at an ideal scale): what scalify computes when every scale
    it picks is ideal. Same output structure as `program`."""
    fn = program(case, all_outputs=all_outputs)

    def f(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        rnd = {None: round_ideal, "rms": round_tensor_rms, "amax": round_tensor_amax}[per_tensor]
        flat = rounded_eval(closed, jax.tree.leaves(args), DTYPES[case.dtype], rnd)
        return jax.tree.unflatten(jax.tree.structure(shape), flat)
    return f


# ---------------------------------------------------------------------------------------
# Running and classifying.
# ---------------------------------------------------------------------------------------

_CACHE: "collections.OrderedDict[tuple, Tuple[Any, Any]]" = collections.OrderedDict()
_CACHE_SIZE = 256
CACHE_STATS = {"hits": 0, "misses": 0}


def compiled(case: Case) -> Tuple[Any, Any, Dict[str, float]]:
    """``(reference, scalified, seconds)``: the float32 reference (``f`` with every
    forward intermediate as an output, for the range check, and the oracle), and
    ``jax.jit(sfy.scalify(f))``, compiled once per program structure, with the seconds
    spent tracing (scalify's interpretation included) and compiling. Compiling is most
    of a case's time."""
    key = case.key
    if key in _CACHE:
        CACHE_STATS["hits"] += 1
        _CACHE.move_to_end(key)
        return (*_CACHE[key], {"trace": 0.0, "compile": 0.0})
    CACHE_STATS["misses"] += 1
    plain, orc = program(case, all_outputs=True), oracle(case)
    scaled, x32 = scaled_inputs(case)
    t0 = time.perf_counter()
    try:
        ref = jax.jit(lambda *x: (plain(*x), orc(*x))).trace(*x32).lower()
    except Exception as e:
        raise RuntimeError(f"reference failed on case {case.name}: {e}") from e
    t1 = time.perf_counter()
    sfy_lowered = jax.jit(sfy.scalify(program(case))).trace(*scaled).lower()  # may raise
    t2 = time.perf_counter()
    fns = (ref.compile(), sfy_lowered.compile())
    t3 = time.perf_counter()
    _CACHE[key] = fns
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return (*fns, {"trace": (t1 - t0) + (t2 - t1), "compile": t3 - t2})


@functools.lru_cache(maxsize=None)
def _zero_scale() -> float:
    """The scale `sfy.as_scaled_array` gives an all-zero tensor (0, or 1 in older
    versions), asked once."""
    return float(sfy.as_scaled_array(jnp.zeros((1,), jnp.float32)).scale)


def unit_scale(x: np.ndarray) -> np.float32:
    """`scalify.core.datatype.unit_scale` on the host (NumPy): the power of two at or
    below the RMS (in float32, after normalising by the power of two at or below the
    largest magnitude); `_zero_scale` for an all-zero tensor, 1 for an empty one."""
    x = x.astype(np.float32)
    amax = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
    if amax == 0:
        return np.float32(_zero_scale() if x.size else 1)
    if not np.isfinite(amax):
        return np.float32(1)
    norm = np.float32(pow2_round_down(amax))
    rms = np.float32(norm * np.sqrt(np.mean(np.square(x / norm), dtype=np.float32)))
    ok = rms > np.finfo(np.float32).tiny and np.isfinite(rms)
    return np.float32(pow2_round_down(rms)) if ok else np.float32(1)


def scaled_inputs(case: Case) -> Tuple[list, list]:
    """``(scaled, x32)``: ``sfy.as_scaled_array(values, dtype=data_dtype)`` and the
    float32 values the ScaledArrays represent, ``sfy.asarray(scaled, jnp.float32)``
    (integers and booleans unchanged), computed on the host with NumPy: through JAX,
    each small op of the conversion compiles anew for every new shape, at more cost than
    the case's own programs. `tests/test_fuzz.py` checks that both agree bit for bit."""
    dtype = DTYPES[case.dtype]
    scaled, x32 = [], []
    for v in case.values:
        if v.dtype.kind != "f":
            scaled.append(jnp.asarray(v))
            x32.append(v)
            continue
        s = unit_scale(v)
        data = (v.astype(np.float32) / (s if s != 0 else np.float32(1))).astype(dtype)
        scaled.append(sfy.ScaledArray(jnp.asarray(data), jnp.asarray(s)))
        x32.append(data.astype(np.float32) * s)
    return scaled, x32


def _leaves(x: Any) -> List[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in jax.tree.leaves(x)]


def in_range(a: np.ndarray) -> bool:
    if not np.all(np.isfinite(a)):
        return False
    if a.size == 0:
        return True
    amax = float(np.max(np.abs(a)))
    rms = float(np.sqrt(np.mean(np.square(a))))
    return amax <= RANGE_MAX and (amax == 0 or rms >= RANGE_MIN)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    den = float(np.linalg.norm(ref.ravel()))
    with np.errstate(over="ignore", invalid="ignore"):
        num = float(np.linalg.norm((got - ref).ravel()))
    if den == 0:
        return 0.0 if num <= RANGE_MIN else math.inf
    return num / den


def _judge(got: List[np.ndarray], ref: List[np.ndarray], orc: List[np.ndarray], dtype: str, n_ops: int) -> Dict[str, Any]:
    """Classify one output (list of leaves) against reference and oracle."""
    if not all(in_range(r) for r in ref):
        return {"cls": "out_of_range_skipped"}
    if not all(np.all(np.isfinite(g)) for g in got):
        bad = sum(int(np.sum(~np.isfinite(g))) for g in got)
        if not all(np.all(np.isfinite(o)) for o in orc):  # no scale could have helped
            return {"cls": "ill_conditioned_skipped", "reason": "oracle_nonfinite"}
        return {"cls": "nonfinite", "n_nonfinite": bad, "n": sum(g.size for g in got)}
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    orcs = [rel_err(o, r) if np.all(np.isfinite(o)) else math.inf for o, r in zip(orc, ref)]
    err, e_orc = max(errs, default=0.0), max(orcs, default=0.0)
    tol = tolerance(dtype, n_ops, e_orc)
    out = {"err": err, "oracle": e_orc, "tol": tol, "ratio": err / max(e_orc, error_floor(dtype, n_ops))}
    if C_ORACLE * e_orc > TOL_CAP:
        out["cls"], out["reason"] = "ill_conditioned_skipped", "oracle_error"
    elif err > tol:
        out["cls"] = "inaccurate"
    else:
        out["cls"] = "ok"
    return out


def _exc(e: BaseException) -> Dict[str, Any]:
    cls = "unsupported" if isinstance(e, sfy.UnsupportedPrimitiveError) else "error"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    out = {"cls": cls, "error": f"{type(e).__name__}: {first}"}
    if cls == "unsupported":
        import re
        m = re.search(r"primitive '([^']+)'", first)
        out["primitive"] = m.group(1) if m else "?"
    return out


def run_case(case: Case, locate: bool = True) -> Dict[str, Any]:
    t0 = time.perf_counter()
    times = {"trace": 0.0, "compile": 0.0}
    try:
        ref_fn, sfy_fn, times = compiled(case)
        scaled, x32 = scaled_inputs(case)
        ref, orc_out = ref_fn(*x32)
        got = host_f32(sfy_fn(*scaled))
        res = None
    except RuntimeError as e:
        if str(e).startswith("reference failed"):
            raise
        res = _exc(e)
    except Exception as e:
        res = _exc(e)
    if res is None:
        ref_inter, ref_out = ref if case.mode == "grad" else (ref, ref[-1])
        inters_ok = all(in_range(r) for r in _leaves(ref_inter))
        res = _judge(_leaves(got), _leaves(ref_out), _leaves(orc_out), case.dtype, len(case.ops))
        if not inters_ok and res["cls"] != "out_of_range_skipped":
            res = {"cls": "out_of_range_skipped"}
        elif res["cls"] in ("nonfinite", "inaccurate"):
            # Judge again against a per-tensor oracle (dearer: a reduction per
            # primitive, compiled for failing cases only), which alone sees a tensor
            # whose elements span more binades than the format holds.
            kind = PER_TENSOR_ORACLE[res["cls"]]
            pt = jax.jit(oracle(case, per_tensor=kind))(*x32)
            res = _judge(_leaves(got), _leaves(ref_out), _leaves(pt), case.dtype, len(case.ops))
            res["oracle_kind"] = kind
            if res["cls"] in ("nonfinite", "inaccurate"):
                bad = reference_out_of_range(case, x32)
                if bad is not None:
                    res = {"cls": "out_of_range_skipped", "primitive": bad}
    res["t_case"] = time.perf_counter() - t0
    res["t_trace"], res["t_compile"] = times["trace"], times["compile"]
    if locate and res["cls"] in FAILURES:
        try:
            res["culprit"] = culprit(case, res)
        except Exception as e:  # locating is best effort
            res["culprit"] = f"? ({type(e).__name__})"
    return res


def host_f32(tree: Any) -> Any:
    """``sfy.asarray(tree, dtype=jnp.float32)`` computed on the host: ``data`` cast to
    float32 times ``scale`` (as `ScaledArray.to_array`), without compiling a
    multiplication for every new shape."""
    def convert(x):
        with np.errstate(over="ignore", invalid="ignore"):  # inf * 0: NaN, as in JAX
            if isinstance(x, sfy.ScaledArray):
                return np.asarray(x.data).astype(np.float32) * np.asarray(x.scale).astype(np.float32)
            return np.asarray(x).astype(np.float32)
    return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, sfy.ScaledArray))


def culprit(case: Case, res: Dict[str, Any]) -> str:
    """The op to blame: the first intermediate of the scalified chain that fails (for an
    exception, the shortest prefix that raises); ``backward`` in grad mode when every
    forward intermediate passes."""
    scaled, plain = scaled_inputs(case)
    fwd = dataclasses.replace(case, mode="fwd", w=None)
    if res["cls"] in ("error", "unsupported"):
        for n in range(1, len(case.ops) + 1):
            sub = dataclasses.replace(case, ops=case.ops[:n])
            args = scaled[:1 + sum(len(op.inputs) for op in sub.ops)]
            if case.mode == "grad":  # a stand-in cotangent weight of the prefix's shape
                args = args + [sfy.as_scaled_array(jnp.ones(sub.ops[-1].out_shape, DTYPES[case.dtype]))]
            try:
                jax.block_until_ready(jax.jit(sfy.scalify(program(sub)))(*args))
            except Exception:
                return f"op{n - 1}:{case.ops[n - 1].name}"
        return "?"
    nin = 1 + sum(len(op.inputs) for op in case.ops)
    got = jax.jit(sfy.scalify(program(fwd, all_outputs=True)))(*scaled[:nin])
    got = host_f32(got)
    ref = jax.jit(program(fwd, all_outputs=True))(*plain[:nin])
    orc = jax.jit(oracle(fwd, all_outputs=True, per_tensor=PER_TENSOR_ORACLE[res["cls"]]))(*plain[:nin])
    for i, (g, r, o) in enumerate(zip(got, ref, orc)):
        j = _judge(_leaves(g), _leaves(r), _leaves(o), case.dtype, i + 1)
        if j["cls"] in FAILURES:
            return f"op{i}:{case.ops[i].name}"
        if j["cls"] == "out_of_range_skipped":
            break
    return "backward" if case.mode == "grad" else "?"


def describe(case: Case, res: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    d = {"case": case.name, "mode": case.mode, "dtype": case.dtype,
         "ops": [op.label for op in case.ops], "shapes": [list(case.x0.shape)] + [list(op.out_shape) for op in case.ops],
         "inputs": [i.describe() for i in case.inputs]}
    if res is not None:
        for k in ("cls", "error", "primitive", "err", "tol", "oracle", "n_nonfinite", "n", "culprit"):
            if k in res:
                v = res[k]
                d[k] = float(f"{v:.3g}") if isinstance(v, float) and math.isfinite(v) else v if not isinstance(v, float) else str(v)
    return d


def source(case: Case) -> str:
    """The case as a standalone Python snippet."""
    lines = ["import jax, jax.numpy as jnp, numpy as np, ml_dtypes", "from jax import lax", "import scalify as sfy",
             "", "def f(x, *a):"]
    k = 0
    for op in case.ops:
        s = op.src
        for j in reversed(range(len(op.inputs))):
            s = s.replace(f"a{j}", f"a[{k + j}]")
        lines.append("    " + s)
        k += len(op.inputs)
    lines.append("    return x")
    if case.mode == "grad":
        lines += ["", "fn = lambda *a: jax.grad(lambda *b: jnp.sum(f(*b[:-1]) * b[-1]), "
                      f"argnums={float_positions(case)})(*a)"]
    else:
        lines += ["", "fn = f"]
    lines += [f"import sys; sys.path.insert(0, 'benchmarks'); import fuzz  # inputs (x, a[0], ...{', w' if case.w else ''})",
              f"vals = fuzz.draw_case({case.seed}, {case.index}).values",
              f"args = sfy.as_scaled_array([jnp.asarray(v) for v in vals], dtype=jnp.{case.dtype})",
              "got = sfy.asarray(jax.jit(sfy.scalify(fn))(*args), dtype=jnp.float32)",
              "want = fn(*sfy.asarray(args, dtype=jnp.float32))"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------


def _record(seed: int, index: int, locate: bool) -> Dict[str, Any]:
    case = draw_case(seed, index)
    res = run_case(case, locate=locate)
    rec = {"index": index, "dtype": case.dtype, "mode": case.mode, "ops": sorted({op.name for op in case.ops}),
           "cls": res["cls"], "t_case": res["t_case"], "t_trace": res["t_trace"], "t_compile": res["t_compile"]}
    if "ratio" in res:
        rec["ratio"] = res["ratio"]
    if res["cls"] in FAILURES:
        rec["failure"] = describe(case, res)
        rec["culprit"] = res.get("culprit", "?")
        rec["primitive"] = res.get("primitive")
    return rec


def _chunk(seed: int, indices: Sequence[int], locate: bool) -> List[Dict[str, Any]]:
    out = [_record(seed, i, locate) for i in indices]
    _CACHE.clear()
    jax.clear_caches()  # bound the memory of thousands of compiled programs
    return out


def run(seed: int, n: int, progress: bool = True, locate: bool = True, jobs: int = 1,
        start: int = 0) -> Dict[str, Any]:
    """Cases ``seed:start`` .. ``seed:start+n-1``, in ``jobs`` processes."""
    indices = list(range(start, start + n))
    size = max(1, min(50, n // (4 * max(jobs, 1))))  # chunks: caches are cleared after each
    chunks = [indices[i:i + size] for i in range(0, n, size)]
    records: List[Dict[str, Any]] = []
    t0 = time.perf_counter()

    def report(done):
        if progress:
            el = time.perf_counter() - t0
            fails = sum(r["cls"] in FAILURES for r in records)
            print(f"  {done}/{n} cases, {el:.0f} s ({el / max(done, 1) * 1e3:.0f} ms/case), {fails} failures",
                  file=sys.stderr, flush=True)
    if jobs <= 1:
        for c in chunks:
            records += _chunk(seed, c, locate)
            report(len(records))
    else:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for fut in concurrent.futures.as_completed([ex.submit(_chunk, seed, c, locate) for c in chunks]):
                records += fut.result()
                report(len(records))
    total = time.perf_counter() - t0
    records.sort(key=lambda r: r["index"])
    results = summarise(records)
    results.update({
        "benchmark": "fuzz", "seed": seed, "start": start, "cases": n, "jobs": jobs,
        "jax_version": jax.__version__, "scalify_version": sfy.__version__,
        "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tolerance": {"unit_roundoff": UNIT_ROUNDOFF, "c_oracle": C_ORACLE, "cap": TOL_CAP,
                      "range": [RANGE_MIN, RANGE_MAX]},
    })
    results["time"] = {"wall_s": total, "per_case_s": total / max(n, 1)}
    for k in ("case", "trace", "compile"):
        results["time"][f"{k}_s_per_case"] = sum(r[f"t_{k}"] for r in records) / max(n, 1)
    results["time"]["programs_reused"] = sum(r["t_trace"] == 0 and r["cls"] not in ("error", "unsupported")
                                             for r in records)
    results["failures"] = [dict(r["failure"]) for r in records if "failure" in r]
    return results


def summarise(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts per class, per op (cases containing it), per dtype and mode, per culprit
    op, and of unsupported primitives."""
    counts = collections.Counter()
    groups: Dict[str, Dict[str, collections.Counter]] = {
        g: collections.defaultdict(collections.Counter) for g in ("per_op", "per_dtype", "per_mode", "culprits")}
    unsupported = collections.Counter()
    for r in records:
        cls = r["cls"]
        counts[cls] += 1
        for name in r["ops"]:
            groups["per_op"][name][cls] += 1
        groups["per_dtype"][r["dtype"]][cls] += 1
        groups["per_mode"][r["mode"]][cls] += 1
        if cls in FAILURES:
            groups["culprits"][r.get("culprit", "?").split(":", 1)[-1]][cls] += 1
            if cls == "unsupported":
                unsupported[r.get("primitive") or "?"] += 1
    out: Dict[str, Any] = {"counts": {c: counts[c] for c in CLASSES}}
    for g, d in groups.items():
        out[g] = {k: {c: v[c] for c in CLASSES if v[c]} for k, v in sorted(d.items())}
    out["unsupported_primitives"] = dict(unsupported)
    # err / max(e_oracle, e_floor) of the cases checked for accuracy: how close scalify
    # comes to the oracle (C_ORACLE is the bound).
    ratios = np.asarray([r["ratio"] for r in records if "ratio" in r and math.isfinite(r["ratio"])])
    if ratios.size:
        out["ratio_to_oracle"] = {f"p{q}": float(f"{np.percentile(ratios, q):.3g}") for q in (50, 90, 99, 100)}
    return out


_SHORT = {"ok": "ok", "nonfinite": "nonfin", "inaccurate": "inacc", "error": "error", "unsupported": "unsup",
          "out_of_range_skipped": "skip:range", "ill_conditioned_skipped": "skip:cond"}


def table(results: Dict[str, Any]) -> str:
    cols = list(CLASSES)
    head = f"{'':<16}{'cases':>6}" + "".join(f"{_SHORT[c]:>11}" for c in cols) + f"{'culprit':>9}"
    lines = [head, "-" * len(head)]

    def row(name, cnt, culp=""):
        n = sum(cnt.values())
        return f"{name:<16}{n:>6}" + "".join(f"{cnt.get(c, 0) or '.':>11}" for c in cols) + f"{culp:>9}"
    for name, cnt in results["per_op"].items():
        culp = sum(results["culprits"].get(name, {}).values())
        lines.append(row(name, cnt, culp or "."))
    lines.append("-" * len(head))
    for group in ("per_dtype", "per_mode"):
        for name, cnt in results[group].items():
            lines.append(row(name, cnt))
    lines.append(row("all", results["counts"], sum(sum(v.values()) for v in results["culprits"].values()) or "."))
    if results["culprits"]:
        lines.append("culprits (first failing op of the chain): " + ", ".join(
            f"{k} {dict(v)}" for k, v in results["culprits"].items()))
    if "ratio_to_oracle" in results:
        lines.append(f"error / max(oracle, floor) of checked cases (bound {C_ORACLE:g}): {results['ratio_to_oracle']}")
    if results["unsupported_primitives"]:
        lines.append(f"unsupported primitives: {results['unsupported_primitives']}")
    t = results.get("time")
    if t:
        lines.append(f"{results['cases']} cases in {t['wall_s']:.0f} s with {results['jobs']} process(es): "
                     f"{t['per_case_s'] * 1e3:.0f} ms/case wall; in each process, per case: "
                     f"{t['case_s_per_case'] * 1e3:.0f} ms, of which tracing {t['trace_s_per_case'] * 1e3:.0f} ms "
                     f"(scalify's interpretation included), compiling {t['compile_s_per_case'] * 1e3:.0f} ms; "
                     f"culprit search extra; {t['programs_reused']} compiled programs reused)")
    return "\n".join(lines)


def verbose(seed: int, index: int) -> Dict[str, Any]:
    case = draw_case(seed, index)
    print(f"case {case.name}: mode={case.mode} dtype={case.dtype}")
    print("inputs:", ", ".join(i.describe() for i in case.inputs))
    shape = case.x0.shape
    for i, op in enumerate(case.ops):
        print(f"  op{i}: {op.label:<40} {list(shape)} -> {list(op.out_shape)}")
        shape = op.out_shape
    print("\n" + source(case) + "\n")
    res = run_case(case)
    scaled, plain = scaled_inputs(case)
    nin = 1 + sum(len(op.inputs) for op in case.ops)
    fwd = dataclasses.replace(case, mode="fwd", w=None)
    print("forward intermediates (scalify vs float32 reference):")
    try:
        got = host_f32(jax.jit(sfy.scalify(program(fwd, all_outputs=True)))(*scaled[:nin]))
    except Exception as e:
        got = None
        print(f"  scalify raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    ref = jax.jit(program(fwd, all_outputs=True))(*plain[:nin])
    orc = jax.jit(oracle(fwd, all_outputs=True, per_tensor=PER_TENSOR_ORACLE.get(res["cls"], "rms")))(*plain[:nin])
    for i in range(len(case.ops)):
        r = np.asarray(ref[i], np.float64)
        line = f"  op{i} {case.ops[i].name:<16} ref rms {np.sqrt(np.mean(np.square(r))) if r.size else 0:.3g}"
        if got is not None:
            g = np.asarray(got[i], np.float64)
            j = _judge([g], [r], [np.asarray(orc[i], np.float64)], case.dtype, i + 1)
            line += (f"  got rms {np.sqrt(np.mean(np.square(g))) if g.size else 0:.3g}  "
                     + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in j.items()))
        print(line)
    if case.mode == "grad":
        print("gradients (scalify / oracles: element-wise, per-tensor rms, per-tensor amax; vs float32 reference):")
        g_ref = _leaves(jax.jit(program(case))(*plain))
        g_ew = _leaves(jax.jit(oracle(case))(*plain))
        g_pt = _leaves(jax.jit(oracle(case, per_tensor="rms"))(*plain))
        g_am = _leaves(jax.jit(oracle(case, per_tensor="amax"))(*plain))
        try:
            g_got = _leaves(host_f32(jax.jit(sfy.scalify(program(case)))(*scaled)))
        except Exception as e:
            g_got = [None] * len(g_ref)
            print(f"  scalify raised {type(e).__name__}")
        names = [case.inputs[k].describe() for k in float_positions(case)]
        for name, r, g, e, p, m in zip(names, g_ref, g_got, g_ew, g_pt, g_am):
            rms = lambda a: float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0  # noqa: E731
            got = "raised" if g is None else f"err {rel_err(g, r):.3g} (rms {rms(g):.3g}, {int(np.sum(~np.isfinite(g)))} nonfinite)"
            print(f"  d/d {name:<28} ref rms {rms(r):.3g}: scalify {got}; oracles {rel_err(e, r):.3g} / "
                  f"{rel_err(p, r):.3g} / {rel_err(m, r):.3g}")
    print(f"\nresult: {json.dumps(describe(case, res))}")
    return res


def main(argv: Any = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fuzz.json"))
    parser.add_argument("--case", help="S:I, rerun one case verbosely")
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--no-locate", action="store_true", help="skip the culprit search of failing cases")
    args = parser.parse_args(argv)
    if args.case:
        s, i = args.case.split(":")
        return verbose(int(s), int(i))
    print(f"fuzz: seed {args.seed}, {args.cases} cases, jax {jax.__version__}")
    results = run(args.seed, args.cases, locate=not args.no_locate, jobs=args.jobs, start=args.start)
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
