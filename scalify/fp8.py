"""Float8 matmuls for unmodified models: `autocast` and `matmul_report`.

``autocast(loss)`` returns a function that computes ``loss`` with every matrix product
(``dot_general``: dense layers, attention einsums, ...; optionally convolutions) run as a
*real* float8 ``dot_general``:

- forward: both operands are cast (saturating) to ``fwd_dtype`` (E4M3 by default) and
  multiplied with float32 accumulation, the result in the original output dtype;
- backward: the output cotangent is cast to ``bwd_dtype`` (E5M2 by default) and both
  operand gradients are float8 ``dot_general``s (E5M2 x E4M3), in the operands' dtypes.

The policy acts on the function *before* it is differentiated (it rewrites the traced
jaxpr, replacing each targeted matmul by a `jax.custom_vjp`), so the forward and the
two backward products of every matmul are told apart. Apply it to the loss, then
differentiate and scalify::

    loss = sfy.fp8.autocast(loss)
    step = jax.jit(sfy.scalify(jax.value_and_grad(loss)))

Inside `scalify` the casts act on a `ScaledArray`'s data and keep its scale: the
magnitude lives in the scale, so a cast to float8 is all that float8 needs (no amax
history, no loss scaling). By default (``rescale="grad"``) the output cotangent's data
is first brought to unit RMS by moving its norm into the (power-of-two) scale -- one
reduction per backward product, which keeps gradients deep in a network, whose data
can drift far from unit scale, from flushing to zero in E5M2; ``rescale=None`` makes
every float8 conversion a plain cast. Outside
`scalify` the same function runs on plain arrays (values beyond float8's range then
saturate or flush to zero: use it with scalify).

Scales and XLA: a ScaledArray's scale is one float32 per tensor, so the program is the
per-tensor-scaled float8 GEMM that XLA's GPU compiler maps onto cuBLASLt on Ada/Hopper
(see the comment in `_dot_fwd`). `jax.nn.scaled_matmul` is a different thing: block
scales (MXFP8: one E8M0 scale per 32 values) for cuDNN's block-scaled GEMM on Blackwell.

`matmul_report` checks what a program really does: it lists every matrix product of a
lowered (StableHLO) or compiled (HLO) program with its operand dtypes and, on GPU,
whether XLA emitted its float8 GEMM, and can raise when a product fell back to a wider
type.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from scalify import _jax_compat
from scalify.core import walker
from scalify.core.datatype import ScaledArray, is_scaled_leaf
from scalify.core.interpreter import scalify

E4M3 = np.dtype(jnp.float8_e4m3fn)
E5M2 = np.dtype(jnp.float8_e5m2)

# Dtypes of the matmuls the policy targets: a float64 product is a deliberate request
# for precision, a float8 one is already float8.
_WIDE = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


# --------------------------------------------------------------------------------------
# Which matmuls: `MatmulInfo` and the `keep` filters.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulInfo:
    """What `autocast`'s ``keep`` filter sees of one matrix product of the traced function.

    Attributes:
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
      lhs_shape, rhs_shape, out_shape: shapes of the operands and the result.
      lhs_dtype, rhs_dtype, out_dtype: their dtypes.
      name: the equation's name stack, e.g. ``"Transformer/head"`` (Flax module paths,
        `jax.named_scope` names; nested jit/scan bodies are joined with ``/``).
      source: the user's source line, ``"file.py:12 (fn)"``.
      params: the primitive's parameters (``dimension_numbers``, ...).
    """

    primitive: str
    lhs_shape: Tuple[int, ...]
    rhs_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_dtype: np.dtype
    name: str
    source: str
    params: Dict[str, Any] = dataclasses.field(repr=False, compare=False, hash=False)

    @property
    def flops(self) -> int:
        """Multiply-adds times two: ``2 * prod(out_shape) * K``."""
        if self.primitive == "dot_general":
            (lc, _), _ = self.params["dimension_numbers"]
            k = int(np.prod([self.lhs_shape[d] for d in lc], dtype=np.int64))
        else:  # convolution: K = kernel size / output features
            k = int(np.prod(self.rhs_shape, dtype=np.int64)) // max(self._out_features(), 1)
        return 2 * int(np.prod(self.out_shape, dtype=np.int64)) * k

    def _out_features(self) -> int:
        dn = self.params.get("dimension_numbers")
        spec = getattr(dn, "rhs_spec", None)
        return int(self.rhs_shape[spec[0]]) if spec is not None else int(self.rhs_shape[0])


def _name_segments(name: str) -> List[str]:
    """``"jvp(Model)/head"`` -> ``["Model", "head"]`` (transform wrappers removed)."""
    out = []
    for seg in name.split("/"):
        while True:
            m = re.fullmatch(r"[\w.\-]+\((.*)\)", seg)
            if not m:
                break
            seg = m.group(1)
        if seg:
            out.append(seg)
    return out


def keep_names(*names: str) -> Callable[[MatmulInfo], bool]:
    """A ``keep`` filter: keep in higher precision the matmuls whose name stack contains
    one of ``names`` as a path component (``"head"`` matches ``"Model/head"`` and
    ``"Model/head/Dense_0"``, not ``"Model/header"``); a name with ``/`` matches
    consecutive components (``"decoder/head"``).

    Names come from Flax module paths (``nn.Dense(..., name="head")``) and from
    `jax.named_scope`.
    """
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("keep_names expects one or more non-empty strings.")
    wanted = [_name_segments(n) for n in names]

    def keep(info: MatmulInfo) -> bool:
        segs = _name_segments(info.name)
        for w in wanted:
            for i in range(len(segs) - len(w) + 1):
                if segs[i : i + len(w)] == w:
                    return True
        return False

    keep.__name__ = f"keep_names{names!r}"
    return keep


def _as_keep(keep: Any) -> Optional[Callable[[MatmulInfo], bool]]:
    if keep is None or callable(keep):
        return keep
    if isinstance(keep, str):
        return keep_names(keep)
    if isinstance(keep, (list, tuple)) and all(isinstance(k, str) for k in keep):
        return keep_names(*keep)
    raise TypeError(
        "autocast: `keep` must be None, a callable MatmulInfo -> bool, a name or a list of "
        f"names, got {keep!r}."
    )


# --------------------------------------------------------------------------------------
# The float8 operations (custom VJPs) that replace the targeted matmuls.
# --------------------------------------------------------------------------------------


def _cast(x: Any, dtype: np.dtype, rescale: bool) -> Any:
    """Saturating cast to ``dtype`` (`scalify.ops.cast_on_forward`): inside scalify it
    casts a ScaledArray's data and keeps its scale. With ``rescale``, the data's RMS is
    first moved into the scale (`scalify.ops.dynamic_rescale_l2`; a plain array outside
    scalify is left as it is)."""
    from scalify import ops

    if rescale:
        x = ops.dynamic_rescale_l2(x)
    return ops.cast_on_forward(x, dtype)


@dataclasses.dataclass(frozen=True)
class _DotSpec:
    dimension_numbers: Any
    out_sharding: Any
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_dtype: np.dtype
    fwd_dtype: np.dtype
    bwd_dtype: np.dtype
    rescale: Optional[str]


def _dot_fwd(spec: _DotSpec, x: Any, y: Any) -> Tuple[Any, Tuple[Any, Any]]:
    # XLA's GPU gemm rewriter turns a dot whose operands are float8 *directly* into the
    # cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`): MatchFp8Param's "directly operating
    # on an FP8 operand" case, besides the convert(f8) [* scalar scale] dequantize
    # pattern; outputs f32/bf16/f16/f8 are accepted, one operand must be E4M3, each
    # operand needs one contracting and one non-contracting dimension (after XLA's dot
    # canonicalisation), and a following multiply by a broadcast scalar constant is
    # folded into the GEMM's alpha (HandleMultiply). Source: openxla/xla,
    # xla/service/gpu/transforms/gemm_rewriter.cc (MatchFp8Param, CreateF8CustomCall,
    # HandleMultiply); the rewriter itself transposes operands to the layout cuBLASLt
    # wants and pads dimensions to multiples of 16. When it cannot, it silently turns
    # the dot into a float16 one (TurnF8DotIntoF16Dot): `matmul_report` catches that.
    # Inside scalify the data are float8 and the scale stays outside, so the program is
    # exactly dot(f8, f8) -> f32 times a power-of-two constant (the fan-in factor) for a
    # float32 result, and dot(f8, f8) -> bf16 for a narrower one (float16 data): float32
    # accumulation inside the GEMM, half the bytes out of it, which is also the dtype in
    # which XLA's SPMD partitioner sums a sharded contraction's partial results
    # (scalify.rules.linalg._reduction_dtype).
    x8 = _cast(x, spec.fwd_dtype, spec.rescale == "all")
    y8 = _cast(y, spec.fwd_dtype, spec.rescale == "all")
    out = lax.dot_general(
        x8,
        y8,
        spec.dimension_numbers,
        preferred_element_type=spec.out_dtype,
        out_sharding=spec.out_sharding,
    )
    return out, (x8, y8)


def _sharding_of(x: Any) -> Any:
    """The sharding in ``x``'s type (JAX's sharding in types), or None."""
    try:
        s = jax.typeof(x).sharding
        return None if s is None or s.mesh.empty else s
    except Exception:
        return None


def _permuted_sharding(sharding: Any, axes: Sequence[int], *others: Any) -> Any:
    """``sharding`` for an array whose dimension ``i`` is the operand's ``axes[i]``: the
    cotangent keeps the operand's sharding (as in JAX's own dot_general transpose), and
    a product contracting sharded dimensions must be told its output sharding. An
    operand without a sharded type (e.g. a ScaledArray's data traced by scalify) next
    to sharded ones gets a replicated cotangent on their mesh."""
    if sharding is None:
        for o in others:
            s = _sharding_of(o)
            if s is not None:
                return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*[None] * len(axes)))
        return None
    try:
        parts = tuple(sharding.spec[a] if a < len(sharding.spec) else None for a in axes)
        return jax.sharding.NamedSharding(sharding.mesh, sharding.spec.update(partitions=parts))
    except Exception:
        return None


def _dot_grad(
    g: Any, other: Any, dims: Any, operand_ndim: int, side: int, dtype: Any, operand_sharding: Any = None
) -> Any:
    """Cotangent of operand ``side`` (0: lhs, 1: rhs) of ``dot_general(lhs, rhs, dims)``
    from the output cotangent ``g`` and the other operand: one ``dot_general`` of ``g``
    with ``other`` (float32 accumulation, result in ``dtype``) and a transpose."""
    (lc, rc), (lb, rb) = dims
    mine_c, other_c = (lc, rc) if side == 0 else (rc, lc)
    mine_b, other_b = (lb, rb) if side == 0 else (rb, lb)
    other_ndim = np.ndim(other) if not hasattr(other, "ndim") else other.ndim
    lhs_ndim = operand_ndim if side == 0 else other_ndim
    rhs_ndim = other_ndim if side == 0 else operand_ndim
    lhs_free = [d for d in range(lhs_ndim) if d not in lc and d not in lb]
    rhs_free = [d for d in range(rhs_ndim) if d not in rc and d not in rb]
    nb = len(lb)
    # g's dimensions: batch, lhs free, rhs free.
    g_lhs_free = list(range(nb, nb + len(lhs_free)))
    g_rhs_free = list(range(nb + len(lhs_free), nb + len(lhs_free) + len(rhs_free)))
    other_free = rhs_free if side == 0 else lhs_free
    mine_free = lhs_free if side == 0 else rhs_free
    g_other_free = g_rhs_free if side == 0 else g_lhs_free
    # The product's dimensions: batch (my batch dims), my free dims, then the other
    # operand's contracting dims in increasing order, i.e. my paired contracting dims.
    other_c = list(other_c)
    paired = [mine_c[other_c.index(d)] for d in sorted(other_c)]
    axes = list(mine_b) + mine_free + paired
    out = lax.dot_general(
        g,
        other,
        ((tuple(g_other_free), tuple(other_free)), (tuple(range(nb)), tuple(other_b))),
        preferred_element_type=dtype,
        out_sharding=_permuted_sharding(operand_sharding, axes, g, other),
    )
    perm = tuple(int(i) for i in np.argsort(axes))
    if perm != tuple(range(len(perm))):
        out = lax.transpose(out, perm)
    return out


def _dot_bwd(spec: _DotSpec, res: Tuple[Any, Any], g: Any) -> Tuple[Any, Any]:
    x8, y8 = res
    g8 = _cast(g, spec.bwd_dtype, spec.rescale is not None)
    dims = spec.dimension_numbers
    dx = _dot_grad(g8, y8, dims, x8.ndim, 0, spec.lhs_dtype, _sharding_of(x8))
    dy = _dot_grad(g8, x8, dims, y8.ndim, 1, spec.rhs_dtype, _sharding_of(y8))
    return dx, dy


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_dot(spec: _DotSpec, x: Any, y: Any) -> Any:
    return _dot_fwd(spec, x, y)[0]


_fp8_dot.defvjp(_dot_fwd, _dot_bwd)


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    params: Tuple[Tuple[str, Any], ...]  # conv_general_dilated params, sorted
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_dtype: np.dtype
    fwd_dtype: np.dtype
    bwd_dtype: np.dtype
    rescale: Optional[str]

    def conv(self, x: Any, w: Any, out_dtype: Any) -> Any:
        params = dict(self.params)
        params["preferred_element_type"] = np.dtype(out_dtype)
        return lax.conv_general_dilated_p.bind(x, w, **params)


def _conv_fwd(spec: _ConvSpec, x: Any, w: Any) -> Tuple[Any, Tuple[Any, Any]]:
    # cuDNN's float8 convolution graph (XLA: F8GraphConv in openxla/xla,
    # xla/service/gpu/transforms/cudnn_fused_conv_rewriter.cc) takes float8 operands
    # directly or as convert(f8) [* scalar scale], forward convolutions only.
    x8 = _cast(x, spec.fwd_dtype, spec.rescale == "all")
    w8 = _cast(w, spec.fwd_dtype, spec.rescale == "all")
    return spec.conv(x8, w8, spec.out_dtype), (x8, w8)


def _conv_bwd(spec: _ConvSpec, res: Tuple[Any, Any], g: Any) -> Tuple[Any, Any]:
    # `lax.conv_general_dilated` wants operands of one dtype, so E5M2 x E4M3 gradients
    # are computed on float8-rounded values in the wide dtype (exact upcasts: the
    # products and float32 accumulation are those of a float8 convolution).
    x8, w8 = res
    g8 = _cast(g, spec.bwd_dtype, spec.rescale is not None)
    wide = np.dtype(np.float32)
    xw, ww = x8.astype(wide), w8.astype(wide)
    _, vjp = jax.vjp(lambda a, b: spec.conv(a, b, wide), xw, ww)
    dx, dw = vjp(g8.astype(wide))
    return dx.astype(spec.lhs_dtype), dw.astype(spec.rhs_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_conv(spec: _ConvSpec, x: Any, w: Any) -> Any:
    return _conv_fwd(spec, x, w)[0]


_fp8_conv.defvjp(_conv_fwd, _conv_bwd)


# --------------------------------------------------------------------------------------
# The jaxpr rewrite.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Policy:
    fwd_dtype: np.dtype
    bwd_dtype: np.dtype
    keep: Optional[Callable[[MatmulInfo], bool]]
    conv: bool
    rescale: Optional[str]
    keep_output: bool = True
    # Per trace: ids of the output matmuls that `keep_output` keeps (`_output_matmuls`).
    kept: frozenset = frozenset()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix and name else (prefix or name)


def _info(eqn: Any, name: str) -> MatmulInfo:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    return MatmulInfo(
        primitive=eqn.primitive.name,
        lhs_shape=tuple(lhs.shape),
        rhs_shape=tuple(rhs.shape),
        out_shape=tuple(out.shape),
        lhs_dtype=np.dtype(lhs.dtype),
        rhs_dtype=np.dtype(rhs.dtype),
        out_dtype=np.dtype(out.dtype),
        name=name,
        source=_jax_compat.source_line(eqn),
        params=dict(eqn.params),
    )


def _is_target(eqn: Any, policy: _Policy, name: str) -> bool:
    prim = eqn.primitive
    if prim is not lax.dot_general_p and not (policy.conv and prim is lax.conv_general_dilated_p):
        return False
    try:
        dtypes = [np.dtype(v.aval.dtype) for v in (*eqn.invars[:2], eqn.outvars[0])]
    except TypeError:  # extended dtypes
        return False
    if not all(d in _WIDE for d in dtypes):
        return False
    if id(eqn) in policy.kept:
        return False
    return not (policy.keep is not None and policy.keep(_info(eqn, name)))


def _is_matmul(eqn: Any, policy: _Policy) -> bool:
    return eqn.primitive is lax.dot_general_p or (policy.conv and eqn.primitive is lax.conv_general_dilated_p)


def _count_matmuls(jaxpr: Jaxpr, policy: _Policy) -> int:
    """The number of matmul equations in ``jaxpr`` and its sub-jaxprs (each body once)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += _is_matmul(eqn, policy)
        n += sum(_count_matmuls(body, policy) for body in walker.sub_jaxprs(eqn.params))
    return n


def _output_matmuls(jaxpr: Jaxpr, outvars: Sequence[Any], policy: _Policy) -> set:
    """Ids of the matmul equations from which one of ``outvars`` is reached with no other
    matmul in between: the output projection (the logits of a language model, a
    classifier's last layer). The search goes back through every other equation, and
    into the bodies of calls whose outputs are the body's (jit, remat, custom
    derivatives); loops and conditionals are passed through to their inputs."""
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    found: set = set()
    seen: set = set()
    stack = [v for v in outvars if not isinstance(v, Literal)]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        eqn = producer.get(v)
        if eqn is None:
            continue
        if _is_matmul(eqn, policy):
            found.add(id(eqn))
            continue
        bodies = [b for _, b in walker.jaxpr_params(eqn.params) if isinstance(b, (ClosedJaxpr, Jaxpr))]
        if len(bodies) == 1 and len(walker.unpack(bodies[0])[0].outvars) == len(eqn.outvars):
            body = walker.unpack(bodies[0])[0]
            inner = _output_matmuls(body, [body.outvars[eqn.outvars.index(v)]], policy)
            if inner:
                found |= inner
                continue
        stack.extend(x for x in eqn.invars if not isinstance(x, Literal))
    return found


def _has_target(jaxpr: Jaxpr, policy: _Policy, prefix: str) -> bool:
    for eqn in jaxpr.eqns:
        name = _join(prefix, _jax_compat.name_stack(eqn))
        if _is_target(eqn, policy, name):
            return True
        if any(_has_target(body, policy, name) for body in walker.sub_jaxprs(eqn.params)):
            return True
    return False


def _aval_spec(aval: Any) -> Any:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def _rewrite_sub(sub: Any, policy: _Policy, prefix: str) -> Any:
    """A rewritten copy of a sub-jaxpr (same input and output avals)."""
    jaxpr, consts = walker.unpack(sub)
    if not isinstance(sub, ClosedJaxpr) and jaxpr.constvars:
        raise NotImplementedError("an open sub-jaxpr with constants")
    if not _has_target(jaxpr, policy, prefix):
        return sub

    def fn(*args: Any) -> List[Any]:
        return _eval(jaxpr, consts, args, policy, prefix)

    new = jax.make_jaxpr(fn)(*[_aval_spec(v.aval) for v in jaxpr.invars])
    if isinstance(sub, ClosedJaxpr):
        return new
    if new.consts:
        raise NotImplementedError("the rewritten body of an open sub-jaxpr captured constants")
    return new.jaxpr


def _rewrite_params(eqn: Any, policy: _Policy, name: str) -> Optional[Dict[str, Any]]:
    subs = list(walker.jaxpr_params(eqn.params))
    if not subs:
        return None
    params = dict(eqn.params)
    changed = False
    try:
        for k, v in subs:
            if isinstance(v, (tuple, list)):
                new = type(v)(
                    _rewrite_sub(b, policy, name) if isinstance(b, (ClosedJaxpr, Jaxpr)) else b for b in v
                )
                changed |= any(a is not b for a, b in zip(new, v))
            else:
                new = _rewrite_sub(v, policy, name)
                changed |= new is not v
            params[k] = new
    except Exception as e:  # e.g. shard_map bodies that need their mesh axes in scope
        warnings.warn(
            f"scalify.fp8.autocast: could not rewrite the body of '{eqn.primitive.name}' "
            f"({type(e).__name__}: {e}); its matmuls keep their precision. Apply autocast "
            "inside it instead (e.g. to the loss inside the shard_map).",
            stacklevel=3,
        )
        return None
    return params if changed else None


def _replace(eqn: Any, invals: Sequence[Any], policy: _Policy) -> Any:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out_dtype = np.dtype(eqn.outvars[0].aval.dtype)
    if eqn.primitive is lax.dot_general_p:
        dims = eqn.params["dimension_numbers"]
        dims = tuple(tuple(tuple(int(d) for d in ds) for ds in pair) for pair in dims)
        spec = _DotSpec(
            dimension_numbers=dims,
            out_sharding=eqn.params.get("out_sharding"),
            lhs_dtype=np.dtype(lhs.dtype),
            rhs_dtype=np.dtype(rhs.dtype),
            out_dtype=out_dtype,
            fwd_dtype=policy.fwd_dtype,
            bwd_dtype=policy.bwd_dtype,
            rescale=policy.rescale,
        )
        return _fp8_dot(spec, *invals)
    params = {k: v for k, v in eqn.params.items() if k != "preferred_element_type"}
    spec = _ConvSpec(
        params=tuple(sorted(params.items())),
        lhs_dtype=np.dtype(lhs.dtype),
        rhs_dtype=np.dtype(rhs.dtype),
        out_dtype=out_dtype,
        fwd_dtype=policy.fwd_dtype,
        bwd_dtype=policy.bwd_dtype,
        rescale=policy.rescale,
    )
    return _fp8_conv(spec, *invals)


def _eval(
    jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], policy: _Policy, prefix: str
) -> List[Any]:
    """Evaluate ``jaxpr`` binding every equation as it is, except the targeted matmuls
    (float8 custom VJPs) and the sub-jaxprs that contain some (rewritten copies). Each
    equation is bound under its own source line and name stack: scalify's errors and
    telemetry, and the ``keep`` filters of a later trace, still name the user's code."""

    def evaluate(eqn: Any, invals: List[Any]) -> List[Any]:
        name = _join(prefix, _jax_compat.name_stack(eqn))
        if _is_target(eqn, policy, name):
            return [_replace(eqn, invals, policy)]
        return walker.bind(eqn, invals, _rewrite_params(eqn, policy, name))

    return walker.eval_jaxpr(jaxpr, consts, args, evaluate, source_context=True)


def _float_dtype(name: str, dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"autocast: {name} must be a floating dtype, got {d}.")
    return d


def autocast(
    fn: Optional[Callable] = None,
    *,
    fwd_dtype: Any = E4M3,
    bwd_dtype: Any = E5M2,
    keep: Any = None,
    conv: bool = False,
    rescale: Optional[str] = "grad",
    keep_output: bool = True,
) -> Callable:
    """Run the matrix products of ``fn`` as float8 ``dot_general``\\ s.

    Args:
      fn: the function, typically a loss ``loss(params, batch)``; apply `autocast`
        *before* `jax.grad` (``jax.value_and_grad(autocast(loss))``) so that the
        backward products are float8 too. ``autocast(keep=...)`` without ``fn`` returns a
        decorator.
      fwd_dtype: the operands' format on the forward pass (default E4M3).
      bwd_dtype: the output cotangent's format on the backward pass (default E5M2); the
        operand gradients are ``bwd_dtype x fwd_dtype`` products.
      keep: matmuls to keep in their own precision: a callable ``MatmulInfo -> bool``
        (e.g. ``lambda m: m.out_shape[-1] == vocab``), a name or a list of names
        (`keep_names`: Flax module paths, `jax.named_scope` names).
      conv: also run ``conv_general_dilated`` in float8 (forward float8 convolution;
        gradients from float8-rounded operands and cotangent).
      rescale: inside `scalify`, which float8 casts first bring the data to unit RMS
        by moving its norm into the (power-of-two) scale (`scalify.ops.
        dynamic_rescale_l2`, one reduction per tensor): ``"grad"`` (default) the output
        cotangents before their E5M2 cast -- the rules' static scales let gradient data
        drift from unit scale through deep backward passes (layer norms, softmax,
        residual sums), and E5M2 would flush what drifts below ~2^-16; ``"all"`` the
        forward operands too; ``None`` none (plain casts: the cheapest program, exactly
        as the rules propagate scales). Plain arrays outside scalify are never rescaled.
      keep_output: keep the output projection in its own precision (default True): the
        matmuls from which ``fn``'s outputs are reached with no other matmul in between
        (a language model's logits, a classifier's last layer). Their results feed the
        softmax directly, where E4M3's 3-bit mantissa costs most: a Llama-style model's
        untied head in float8 trained to a 3% higher validation loss on
        `benchmarks/train_gpt.py`, within 0.01% of float32 kept. One matmul per model;
        False runs it in float8 too. A function whose only matmuls are its output
        projection runs them in float8.

    Returns:
      A function with ``fn``'s signature. It traces ``fn`` (ScaledArray arguments as
      their data's shape and dtype, as `scalify` does) and re-evaluates the jaxpr with
      every targeted matmul -- one whose operands and result are float32, bfloat16 or
      float16 -- replaced by a float8 ``jax.custom_vjp``. Every other equation is bound
      unchanged; the bodies of jit, scan, while, cond, remat and custom_jvp/custom_vjp
      functions are rewritten the same way (same signature). Matmuls inside the
      *derivative rules* of custom_jvp/custom_vjp functions keep their precision. Called
      with ScaledArray arguments outside `scalify`, the function runs through `scalify`.

    The result composes with `jax.jit`, `jax.grad`, `jax.vmap`, `scalify`, `lax.scan`,
    `jax.checkpoint`, Flax and Equinox models.
    """
    if fn is None:
        return functools.partial(
            autocast, fwd_dtype=fwd_dtype, bwd_dtype=bwd_dtype, keep=keep, conv=conv, rescale=rescale,
            keep_output=keep_output,
        )
    if rescale not in (None, "grad", "all"):
        raise ValueError(f"autocast: rescale must be None, 'grad' or 'all', got {rescale!r}.")
    policy = _Policy(
        fwd_dtype=_float_dtype("fwd_dtype", fwd_dtype),
        bwd_dtype=_float_dtype("bwd_dtype", bwd_dtype),
        keep=_as_keep(keep),
        conv=bool(conv),
        rescale=rescale,
        keep_output=bool(keep_output),
    )

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_scaled_leaf)
        traced = walker.trace(fn, leaves, treedef)
        closed = traced.jaxpr

        traced_policy = policy
        if policy.keep_output:
            kept = _output_matmuls(closed.jaxpr, closed.jaxpr.outvars, policy)
            # A function that is only its output projection (one matmul) runs in float8.
            if _count_matmuls(closed.jaxpr, policy) > len(kept):
                traced_policy = dataclasses.replace(policy, kept=frozenset(kept))

        def run(*flat: Any) -> Any:
            return traced.rebuild(_eval(closed.jaxpr, closed.consts, flat, traced_policy, ""))

        if any(isinstance(x, ScaledArray) for x in traced.args):
            return scalify(run)(*traced.args)
        return run(*traced.args)

    return wrapped


# --------------------------------------------------------------------------------------
# matmul_report: what the lowered / compiled program really does.
# --------------------------------------------------------------------------------------

FP8_GEMM_TARGET = "__cublas$lt$matmul$f8"


class Fp8FallbackError(RuntimeError):
    """A matrix product that should run in float8 runs in a wider type."""


@dataclasses.dataclass(frozen=True)
class MatmulEntry:
    """One matrix product of a program, as `matmul_report` found it.

    Attributes:
      op: ``"dot_general"``/``"convolution"`` (StableHLO), ``"dot"``/``"convolution"``
        (HLO), or ``"custom-call:<target>"`` for a library GEMM/convolution call.
      lhs_dtype, rhs_dtype, out_dtype: operand and result types (NumPy names).
      lhs_shape, rhs_shape, out_shape: shapes.
      lhs_origin, rhs_origin: the operand's type before any upcast: ``"float8_e4m3fn"``
        for ``convert(f8 -> f32)`` (possibly through transposes, reshapes, a multiply
        by a scalar...), else the operand's own type.
      kernel: the library call that runs it (``"__cublas$lt$matmul$f8"``, ...), if any.
      where: the enclosing function / computation.
      fallback: why this product counts as a float8 fallback, or None.
      k: the contracted size (product of the lhs contracting dimensions), when read.
    """

    op: str
    lhs_dtype: str
    rhs_dtype: str
    out_dtype: str
    lhs_shape: Tuple[int, ...]
    rhs_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    lhs_origin: str
    rhs_origin: str
    kernel: Optional[str]
    where: str
    fallback: Optional[str] = None
    k: Optional[int] = None

    @property
    def fp8(self) -> bool:
        """Both operands are float8 (directly, or dequantized: convert from float8)."""
        return _is_f8(self.lhs_origin) and _is_f8(self.rhs_origin)

    @property
    def fp8_operands(self) -> bool:
        """Both operands are float8 as stored (no upcast in between)."""
        return _is_f8(self.lhs_dtype) and _is_f8(self.rhs_dtype)

    @property
    def flops(self) -> Optional[int]:
        """``2 * prod(out_shape) * K`` for products whose contracted size K was read
        (``dot_general``/``dot`` and library GEMM calls), else None."""
        if self.k is None:
            return None
        return 2 * int(np.prod(self.out_shape, dtype=np.int64)) * self.k

    def describe(self) -> str:
        def t(d: str, o: str) -> str:
            return d if d == o else f"{d}<-{o}"

        return (
            f"{self.op}({t(self.lhs_dtype, self.lhs_origin)}{list(self.lhs_shape)}, "
            f"{t(self.rhs_dtype, self.rhs_origin)}{list(self.rhs_shape)}) -> "
            f"{self.out_dtype}{list(self.out_shape)} in {self.where}"
        )


@dataclasses.dataclass
class MatmulReport:
    """The matrix products of a program (see `matmul_report`).

    Attributes:
      entries: every dot / convolution / library GEMM call.
      stage: ``"stablehlo"`` (a `jax.stages.Lowered`) or ``"hlo"`` (a `Compiled`).
      platform: ``"cpu"``, ``"gpu"``, ... (``None`` when unknown).
      fp8_kernel: for compiled GPU programs, whether at least one product runs on
        float8 operands (cuBLASLt's ``__cublas$lt$matmul$f8``, a Triton GEMM fusion, a
        cuDNN float8 convolution); ``None`` on CPU.
      emulated: float8 products that a platform without float8 units (CPU) runs upcast.
    """

    entries: List[MatmulEntry]
    stage: str
    platform: Optional[str]
    fp8_kernel: Optional[bool]

    @property
    def fallbacks(self) -> List[MatmulEntry]:
        return [e for e in self.entries if e.fallback]

    @property
    def fp8_count(self) -> int:
        return sum(e.fp8 for e in self.entries)

    @property
    def emulated(self) -> bool:
        return self.stage == "hlo" and self.platform == "cpu" and any(e.fp8 for e in self.entries)

    def raise_on_fallback(self) -> None:
        if self.fallbacks:
            lines = "\n  ".join(f"{e.describe()}: {e.fallback}" for e in self.fallbacks)
            raise Fp8FallbackError(
                f"{len(self.fallbacks)} matrix product(s) fell back from float8:\n  {lines}"
            )

    def __str__(self) -> str:
        head = f"{len(self.entries)} matrix products ({self.stage}"
        head += f", {self.platform})" if self.platform else ")"
        head += f": {self.fp8_count} float8"
        if self.fp8_kernel is not None:
            head += f", FP8 GEMM {'used' if self.fp8_kernel else 'NOT used'}"
        if self.emulated:
            head += " (emulated: no float8 units on CPU)"
        rows = [head]
        for e in self.entries:
            flag = "fp8 " if e.fp8 else "    "
            if e.fallback:
                flag = "FALLBACK "
            rows.append(f"  {flag}{e.describe()}" + (f" [{e.kernel}]" if e.kernel else "") +
                        (f"  <- {e.fallback}" if e.fallback else ""))
        return "\n".join(rows)


_MLIR_TYPES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "i1": "bool", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "ui8": "uint8", "ui16": "uint16", "ui32": "uint32", "ui64": "uint64",
    "pred": "bool", "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
}


def _norm_dtype(t: str) -> str:
    t = t.strip()
    low = t.lower()
    if low.startswith("f8") or low.startswith("f4") or low.startswith("f6"):
        return f"float{low[1]}_{low[2:]}"
    return _MLIR_TYPES.get(low, low)


def _is_f8(d: str) -> bool:
    return d.startswith("float8_")


# ---- StableHLO (MLIR) text ----------------------------------------------------------

_TENSOR = re.compile(r"tensor<([^<>]*)>")
_SSA_DEF = re.compile(r"^\s*((?:%[\w#.\-]+(?::\d+)?)(?:\s*,\s*%[\w#.\-]+)*)\s*=\s*\"?([\w.]+)\"?(.*)$")
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@([\w.\-$]+)")
_OPERAND = re.compile(r"%[\w.\-]+(?:#\d+)?")


def _parse_tensor(t: str) -> Tuple[Tuple[int, ...], str]:
    body = t.split(",")[0].strip()  # drop encodings
    parts = body.split("x")
    dtype = _norm_dtype(parts[-1])
    shape = tuple(int(p) if p.isdigit() else -1 for p in parts[:-1])
    return shape, dtype


def _signature(rest: str) -> Tuple[List[Tuple[Tuple[int, ...], str]], List[Tuple[Tuple[int, ...], str]]]:
    """Operand and result tensor types from the trailing ``: (A, B) -> C`` (or ``: T``)."""
    idx = rest.rfind(" : ")
    if idx < 0:
        return [], []
    sig = rest[idx + 3 :]
    if "->" in sig:
        ins, outs = sig.rsplit("->", 1)
    else:
        ins, outs = sig, sig
    return [_parse_tensor(t) for t in _TENSOR.findall(ins)], [_parse_tensor(t) for t in _TENSOR.findall(outs)]


# Ops between a float8 value and a product that keep it "float8 data": data movement, and
# a multiply/divide (by a scale) as in the dequantize pattern XLA fuses.
_CONTRACT_PATTERNS = (
    re.compile(r"contracting_dims\s*=\s*\[([\d,\s]*)\]\s*x"),  # StableHLO pretty form
    re.compile(r"lhs_contracting_dimensions\s*=\s*\[([\d,\s]*)\]"),  # StableHLO generic form
    re.compile(r"lhs_contracting_dims=\{([\d,]*)\}"),  # HLO dot
    re.compile(r'"lhs_contracting_dimensions":\[([\d",]*)\]'),  # GEMM backend_config
)


def _contracted(text: str, lhs_shape: Tuple[int, ...]) -> Optional[int]:
    for pat in _CONTRACT_PATTERNS:
        m = pat.search(text)
        if m:
            dims = [int(d) for d in re.findall(r"\d+", m.group(1))]
            if all(0 <= d < len(lhs_shape) for d in dims):
                return int(np.prod([lhs_shape[d] for d in dims], dtype=np.int64))
    return None


_PASS_THROUGH = {
    "transpose", "reshape", "broadcast_in_dim", "broadcast", "copy", "slice", "dynamic_slice",
    "bitcast", "pad", "reverse", "multiply", "divide", "select", "get-tuple-element",
    "optimization_barrier",
}


def _stablehlo_entries(text: str) -> List[MatmulEntry]:
    defs: Dict[Tuple[str, str], Tuple[str, List[str], List[str]]] = {}
    lines = text.splitlines()
    parsed = []
    func = "<module>"
    for line in lines:
        m = _FUNC.search(line)
        if m:
            func = m.group(1)
            continue
        m = _SSA_DEF.match(line)
        if not m:
            continue
        results = [r.strip() for r in m.group(1).split(",")]
        op = m.group(2).split(".")[-1]
        rest = m.group(3)
        ins, outs = _signature(rest)
        sig_at = rest.rfind(" : ")
        operands = _OPERAND.findall(rest[: sig_at if sig_at >= 0 else len(rest)])
        in_types = [d for _, d in ins]
        for r in results:
            base = r.split(":")[0]
            defs[(func, base)] = (op, operands, in_types)
        parsed.append((func, op, operands, ins, outs, rest))

    def origin(func: str, name: str, dtype: str, depth: int = 0) -> str:
        if _is_f8(dtype) or depth > 12:
            return dtype
        d = defs.get((func, name.split("#")[0]))
        if d is None:
            return dtype
        op, operands, in_types = d
        if op in ("constant", "iota"):
            return "constant"
        if op == "convert":
            return in_types[0] if in_types and _is_f8(in_types[0]) else dtype
        if op in _PASS_THROUGH:
            got = []
            for i, o in enumerate(operands):
                t = in_types[i] if i < len(in_types) else (in_types[0] if in_types else dtype)
                got.append(origin(func, o, t, depth + 1))
            for g in got:
                if _is_f8(g):
                    return g
            if got and all(g == "constant" for g in got):
                return "constant"
        return dtype

    entries = []
    for func, op, operands, ins, outs, rest in parsed:
        if op not in ("dot_general", "dot", "convolution") or len(ins) < 2 or len(operands) < 2:
            continue
        (ls, ld), (rs, rd) = ins[0], ins[1]
        os_, od = outs[0] if outs else ((), "?")
        if op == "dot":  # plain matmul / matvec: lhs's last dimension
            k = ls[-1] if ls else None
        else:
            k = _contracted(rest, ls) if op == "dot_general" else None
        entries.append(
            MatmulEntry(
                op=op, lhs_dtype=ld, rhs_dtype=rd, out_dtype=od,
                lhs_shape=ls, rhs_shape=rs, out_shape=os_,
                lhs_origin=origin(func, operands[0], ld), rhs_origin=origin(func, operands[1], rd),
                kernel=None, where=func, k=k,
            )
        )
    return entries


# ---- HLO text -----------------------------------------------------------------------

_HLO_COMP = re.compile(  # "ENTRY %main (a: f32[2]) -> f32[2] {" or "%region_0 {"
    r"^\s*(ENTRY\s+)?%?([\w.\-$]+)\s*(\(.*\))?\s*->.*\{\s*$|^\s*(ENTRY\s+)?%?([\w.\-$]+)\s*\{\s*$"
)
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-$]+)")
_HLO_SHAPE = re.compile(r"^([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _split_top(s: str) -> List[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at ``s[start]``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


def _hlo_type(t: str) -> Tuple[Tuple[int, ...], str]:
    t = t.strip()
    if t.startswith("("):
        first = _split_top(t[1 : _balanced(t, 0) - 1])
        return _hlo_type(first[0]) if first else ((), "tuple")
    m = _HLO_SHAPE.match(t)
    if not m:
        return (), t
    dims = tuple(int(x) for x in m.group(2).split(",") if x)
    return dims, _norm_dtype(m.group(1))


def _parse_hlo_instr(line: str) -> Optional[Dict[str, Any]]:
    s = line.strip()
    root = s.startswith("ROOT ")
    if root:
        s = s[5:]
    eq = s.find(" = ")
    if eq < 0 or not (s[:eq].startswith("%") or re.fullmatch(r"[\w.\-]+", s[:eq])):
        return None
    name = s[:eq].lstrip("%")
    rest = s[eq + 3 :]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_str, rest = rest[:end], rest[end:].lstrip()
    else:
        sp = rest.find(" ")
        if sp < 0:
            return None
        type_str, rest = rest[:sp], rest[sp + 1 :].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    end = _balanced(rest, m.end() - 1)
    operand_str = rest[m.end() : end - 1]
    attrs = rest[end:]
    operands = []
    for tok in _split_top(operand_str):
        parts = tok.rsplit(" ", 1)
        if len(parts) == 2 and parts[1].startswith("%"):
            operands.append((parts[1].lstrip("%"), _hlo_type(parts[0])))
        else:
            operands.append((tok.lstrip("%"), None))
    return {"name": name, "type": _hlo_type(type_str), "opcode": opcode, "operands": operands,
            "attrs": attrs, "root": root}


def _hlo_entries(text: str) -> List[MatmulEntry]:
    comps: Dict[str, Dict[str, Dict[str, Any]]] = {}
    order: List[Tuple[str, Dict[str, Any]]] = []
    callers: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
    roots: Dict[str, str] = {}
    comp = "<module>"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " = " not in stripped.split("(")[0]:
            m = _HLO_COMP.match(line)
            if m:
                comp = m.group(2) or m.group(5)
                comps.setdefault(comp, {})
                continue
        ins = _parse_hlo_instr(line)
        if ins is None:
            continue
        comps.setdefault(comp, {})[ins["name"]] = ins
        if ins["root"]:
            roots[comp] = ins["name"]
        order.append((comp, ins))
        for called in _CALLED.findall(ins["attrs"]):
            callers.setdefault(called, []).append((comp, ins))

    def type_of(comp: str, name: str, given: Any) -> Tuple[Tuple[int, ...], str]:
        if given is not None:
            return given
        d = comps.get(comp, {}).get(name)
        return d["type"] if d else ((), "?")

    def origin(comp: str, name: str, depth: int = 0) -> str:
        d = comps.get(comp, {}).get(name)
        if d is None:
            return "?"
        dtype = d["type"][1]
        if _is_f8(dtype) or depth > 16:
            return dtype
        op = d["opcode"]
        if op in ("constant", "iota"):
            return "constant"
        if op == "parameter":
            idx = int(d["operands"][0][0]) if d["operands"] and d["operands"][0][0].isdigit() else None
            for pcomp, call in callers.get(comp, []):
                if call["opcode"] == "fusion" and idx is not None and idx < len(call["operands"]):
                    got = origin(pcomp, call["operands"][idx][0], depth + 1)
                    if _is_f8(got) or got == "constant":
                        return got
            return dtype
        if op == "convert":
            src = d["operands"][0]
            t = type_of(comp, src[0], src[1])[1]
            if _is_f8(t):
                return t
            return origin(comp, src[0], depth + 1) if t == "?" else dtype
        if op == "fusion":  # look inside: the fused computation's root
            m = re.search(r"calls=%?([\w.\-$]+)", d["attrs"])
            if m and m.group(1) in roots:
                got = origin(m.group(1), roots[m.group(1)], depth + 1)
                return got if _is_f8(got) or got == "constant" else dtype
            return dtype
        if op in _PASS_THROUGH:
            got = [origin(comp, o, depth + 1) for o, _ in d["operands"]]
            for g in got:
                if _is_f8(g):
                    return g
            if got and all(g == "constant" for g in got):
                return "constant"
        return dtype

    def fused_kernel(comp: str) -> Optional[str]:
        """The kind of a custom fusion calling ``comp`` (e.g. a Triton GEMM), if any."""
        for _, call in callers.get(comp, []):
            m = re.search(r'"kind":"(__[\w$]+)"', call["attrs"])
            if call["opcode"] == "fusion" and m and "kCustom" in call["attrs"]:
                return m.group(1)
        return None

    entries = []
    for comp_name, ins in order:
        op = ins["opcode"]
        target = None
        if op == "custom-call":
            m = re.search(r'custom_call_target="([^"]+)"', ins["attrs"])
            target = m.group(1) if m else None
            if target is None or not any(k in target.lower() for k in ("matmul", "gemm", "conv")):
                continue
        elif op in ("dot", "convolution"):
            target = fused_kernel(comp_name)
        else:
            continue
        if len(ins["operands"]) < 2:
            continue
        (ln, lt), (rn, rt) = ins["operands"][0], ins["operands"][1]
        (ls, ld), (rs, rd) = type_of(comp_name, ln, lt), type_of(comp_name, rn, rt)
        lo = ld if _is_f8(ld) else origin(comp_name, ln)
        ro = rd if _is_f8(rd) else origin(comp_name, rn)
        lo = ld if lo == "?" else lo
        ro = rd if ro == "?" else ro
        os_, od = ins["type"]
        entries.append(
            MatmulEntry(
                op=f"custom-call:{target}" if op == "custom-call" else op,
                lhs_dtype=ld, rhs_dtype=rd, out_dtype=od,
                lhs_shape=ls, rhs_shape=rs, out_shape=os_,
                lhs_origin=lo, rhs_origin=ro, kernel=target, where=comp_name,
                k=_contracted(ins["attrs"], ls) if op != "convolution" else None,
            )
        )
    return entries


def _platform_of(stage: Any) -> Optional[str]:
    try:
        shardings = stage.input_shardings
        leaves = jax.tree.leaves(shardings)
        for s in leaves:
            devs = getattr(s, "device_set", None)
            if devs:
                return next(iter(devs)).platform
    except Exception:
        pass
    try:
        return jax.default_backend()
    except Exception:  # pragma: no cover
        return None


def _flag(entries: List[MatmulEntry], stage: str, platform: Optional[str], expect: Any) -> List[MatmulEntry]:
    out = []
    for e in entries:
        reason = None
        lf, rf = _is_f8(e.lhs_origin), _is_f8(e.rhs_origin)
        if "constant" in (e.lhs_origin, e.rhs_origin):
            # A product with a compile-time constant (e.g. XLA folded the cast of a
            # constant cotangent) is not a float8 matmul the program asked for.
            pass
        elif lf != rf:
            reason = "one operand is float8, the other is not: the product runs in the wider type"
        elif lf and rf and stage == "hlo" and platform != "cpu" and not e.fp8_operands:
            # The kernel (library call or fused dot) receives upcast operands.
            if e.kernel is None:
                reason = "float8 operands upcast before the product (no float8 kernel)"
            else:
                reason = f"float8 operands upcast and run by '{e.kernel}', a wide-type kernel"
        if reason is None and not e.fp8 and _is_float(e.lhs_dtype):
            wanted = expect == "all" or (callable(expect) and expect(e))
            if wanted:
                reason = "expected in float8 (expect_fp8), runs in " + "/".join(
                    sorted({e.lhs_dtype, e.rhs_dtype})
                )
        out.append(dataclasses.replace(e, fallback=reason))
    return out


def _is_float(d: str) -> bool:
    return d.startswith("float") or d.startswith("bfloat")


def matmul_report(
    stage: Any,
    *,
    expect_fp8: Union[None, int, str, Callable[[MatmulEntry], bool]] = None,
    raise_on_fallback: bool = False,
    platform: Optional[str] = None,
) -> MatmulReport:
    """List the matrix products of a lowered or compiled program and their dtypes.

    Args:
      stage: a `jax.stages.Lowered` (``jax.jit(f).lower(...)``: StableHLO, what JAX
        asked for), a `jax.stages.Compiled` (``.compile()``: the optimised HLO, what XLA
        runs; on GPU it shows whether the float8 GEMM ``__cublas$lt$matmul$f8`` was
        emitted), or the text of either.
      expect_fp8: which products must run in float8, besides the default checks:
        ``None``; ``"all"`` (every floating product); an int (at least that many float8
        products); or a predicate on `MatmulEntry` (e.g. ``lambda m: m.flops > 2**20``).
      raise_on_fallback: raise `Fp8FallbackError` listing the fallbacks, if any.
      platform: for text input, the platform it was compiled for (``"gpu"``, ``"cpu"``).

    A product is a *fallback* when:
      - one operand is float8 (or converted from float8) and the other is not: JAX/XLA
        run it in the wider type;
      - (compiled, GPU) both operands come from float8 but XLA upcast them to a wider
        GEMM (e.g. a shape or layout cuBLASLt's FP8 GEMM does not take, a pre-Ada GPU);
        on CPU, which has no float8 units, float8 products are emulated, not fallbacks;
      - ``expect_fp8`` selects it and it is not float8.

    Returns:
      A `MatmulReport` (``print`` it for a table).
    """
    if expect_fp8 is True:
        expect_fp8 = "all"
    if isinstance(stage, str):
        text = stage
        kind = "stablehlo" if "stablehlo." in text or "func.func" in text else "hlo"
    else:
        if not hasattr(stage, "as_text"):
            raise TypeError(
                "matmul_report expects jax.jit(f).lower(...) (a Lowered), its .compile() (a "
                f"Compiled) or their text, got {type(stage).__name__}."
            )
        text = stage.as_text()
        kind = "stablehlo" if type(stage).__name__ == "Lowered" or "stablehlo." in text else "hlo"
        if platform is None and kind == "hlo":
            platform = _platform_of(stage)
        elif platform is None:
            platform = _platform_of(stage) if hasattr(stage, "compile") else None
    if kind == "stablehlo":
        entries = _stablehlo_entries(text)
        fp8_kernel = None
    else:
        entries = _hlo_entries(text)
        fp8_kernel = any(e.fp8_operands for e in entries) if platform != "cpu" else None
    entries = _flag(entries, kind, platform, expect_fp8 if not isinstance(expect_fp8, int) else None)
    report = MatmulReport(entries=entries, stage=kind, platform=platform, fp8_kernel=fp8_kernel)
    if isinstance(expect_fp8, int) and not isinstance(expect_fp8, bool) and report.fp8_count < expect_fp8:
        if raise_on_fallback:
            raise Fp8FallbackError(
                f"expected at least {expect_fp8} float8 matrix products, found {report.fp8_count}:\n{report}"
            )
    if raise_on_fallback:
        report.raise_on_fallback()
    return report


__all__ = [
    "E4M3",
    "E5M2",
    "FP8_GEMM_TARGET",
    "Fp8FallbackError",
    "MatmulEntry",
    "MatmulInfo",
    "MatmulReport",
    "autocast",
    "keep_names",
    "matmul_report",
]
