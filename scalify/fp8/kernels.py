"""The float8 custom VJPs that replace the targeted matmuls.

Forward, both operands are cast (saturating) to the forward format (E4M3) and
multiplied with float32 accumulation, the result in the original output dtype.
Backward, the output cotangent is cast to the backward format (E5M2) and each operand
gradient is a float8 product of it with the other operand (E5M2 x E4M3), in the
operand's dtype.

Inside `scalify` the casts act on a `ScaledArray`'s data and keep its scale: the
magnitude lives in the scale, so a cast to float8 is all that float8 needs (no amax
history, no loss scaling). A ScaledArray's scale is one float32 per tensor, so the
program is the per-tensor-scaled float8 GEMM that XLA's GPU compiler maps onto
cuBLASLt on Ada/Hopper (see the comment in `_Dot.forward`). `jax.nn.scaled_matmul` is a
different thing: block scales (MXFP8: one E8M0 scale per 32 values) for cuDNN's
block-scaled GEMM on Blackwell.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax import lax

from scalify import ops

def _cast(x: Any, dtype: np.dtype, rescale: bool) -> Any:
    """Saturating cast to ``dtype`` (`scalify.ops.cast_on_forward`): inside scalify it
    casts a ScaledArray's data and keeps its scale. With ``rescale``, the data's RMS is
    first moved into the scale (`scalify.ops.dynamic_rescale_l2`; a plain array outside
    scalify is left as it is)."""
    if rescale:
        x = ops.dynamic_rescale_l2(x)
    return ops.cast_on_forward(x, dtype)


# --------------------------------------------------------------------------------------
# The products: how each multiplies and how its operand gradients are computed.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dot:
    """``dot_general`` with the equation's dimension numbers and output sharding."""

    dimension_numbers: Any
    out_sharding: Any

    @classmethod
    def of(cls, params: Dict[str, Any]) -> "_Dot":
        dims = tuple(tuple(tuple(int(d) for d in ds) for ds in pair) for pair in params["dimension_numbers"])
        return cls(dims, params.get("out_sharding"))

    def forward(self, x: Any, y: Any, out_dtype: np.dtype) -> Any:
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
        return lax.dot_general(
            x, y, self.dimension_numbers, preferred_element_type=out_dtype, out_sharding=self.out_sharding
        )

    def backward(self, g: Any, x: Any, y: Any, lhs_dtype: np.dtype, rhs_dtype: np.dtype) -> Tuple[Any, Any]:
        dims = self.dimension_numbers
        dx = _dot_grad(g, y, dims, x.ndim, 0, lhs_dtype, _sharding_of(x))
        dy = _dot_grad(g, x, dims, y.ndim, 1, rhs_dtype, _sharding_of(y))
        return dx, dy


@dataclasses.dataclass(frozen=True)
class _Conv:
    """``conv_general_dilated`` with the equation's parameters (sorted, hashable), its
    output type left to each call."""

    params: Tuple[Tuple[str, Any], ...]

    @classmethod
    def of(cls, params: Dict[str, Any]) -> "_Conv":
        return cls(tuple(sorted((k, v) for k, v in params.items() if k != "preferred_element_type")))

    def forward(self, x: Any, w: Any, out_dtype: np.dtype) -> Any:
        # cuDNN's float8 convolution graph (XLA: F8GraphConv in openxla/xla,
        # xla/service/gpu/transforms/cudnn_fused_conv_rewriter.cc) takes float8 operands
        # directly or as convert(f8) [* scalar scale], forward convolutions only.
        params = dict(self.params)
        params["preferred_element_type"] = np.dtype(out_dtype)
        return lax.conv_general_dilated_p.bind(x, w, **params)

    def backward(self, g: Any, x: Any, w: Any, lhs_dtype: np.dtype, rhs_dtype: np.dtype) -> Tuple[Any, Any]:
        # `lax.conv_general_dilated` wants operands of one dtype, so E5M2 x E4M3 gradients
        # are computed on float8-rounded values in the wide dtype (exact upcasts: the
        # products and float32 accumulation are those of a float8 convolution).
        wide = np.dtype(np.float32)
        _, vjp = jax.vjp(lambda a, b: self.forward(a, b, wide), x.astype(wide), w.astype(wide))
        dx, dw = vjp(g.astype(wide))
        return dx.astype(lhs_dtype), dw.astype(rhs_dtype)


_PRODUCTS = {lax.dot_general_p: _Dot.of, lax.conv_general_dilated_p: _Conv.of}


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


# --------------------------------------------------------------------------------------
# The one custom VJP: float8 casts around any product.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One targeted matmul, as its custom VJP needs it (hashable: a static argument)."""

    product: Union[_Dot, _Conv]
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_dtype: np.dtype
    fwd_dtype: np.dtype
    bwd_dtype: np.dtype
    rescale: Optional[str]


def _fwd(spec: _Spec, x: Any, y: Any) -> Tuple[Any, Tuple[Any, Any]]:
    x8 = _cast(x, spec.fwd_dtype, spec.rescale == "all")
    y8 = _cast(y, spec.fwd_dtype, spec.rescale == "all")
    return spec.product.forward(x8, y8, spec.out_dtype), (x8, y8)


def _bwd(spec: _Spec, res: Tuple[Any, Any], g: Any) -> Tuple[Any, Any]:
    x8, y8 = res
    g8 = _cast(g, spec.bwd_dtype, spec.rescale is not None)
    return spec.product.backward(g8, x8, y8, spec.lhs_dtype, spec.rhs_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_product(spec: _Spec, x: Any, y: Any) -> Any:
    return _fwd(spec, x, y)[0]


_fp8_product.defvjp(_fwd, _bwd)


def fp8_matmul(
    primitive: Any,
    params: Dict[str, Any],
    x: Any,
    y: Any,
    *,
    dtypes: Tuple[Any, Any, Any],
    fwd_dtype: np.dtype,
    bwd_dtype: np.dtype,
    rescale: Optional[str],
) -> Any:
    """``primitive`` (``dot_general`` or ``conv_general_dilated``) with ``params``, on
    ``x`` and ``y``, as a product of float8 values whose operand gradients are products
    of float8 values too.

    ``dtypes`` are the matmul's lhs, rhs and result dtypes: the result and the operand
    gradients keep them. ``rescale`` is `autocast`'s: which casts first move the data's
    RMS into the scale (``"grad"``: the cotangent's; ``"all"``: the operands' too)."""
    lhs_dtype, rhs_dtype, out_dtype = (np.dtype(d) for d in dtypes)
    spec = _Spec(_PRODUCTS[primitive](params), lhs_dtype, rhs_dtype, out_dtype, fwd_dtype, bwd_dtype, rescale)
    return _fp8_product(spec, x, y)
