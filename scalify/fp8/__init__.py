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
every float8 conversion a plain cast. Outside `scalify` the same function runs on plain
arrays (values beyond float8's range then saturate or flush to zero: use it with
scalify).

`matmul_report` checks what a program really does: it lists every matrix product of a
lowered (StableHLO) or compiled (HLO) program with its operand dtypes and, on GPU,
whether XLA emitted its float8 GEMM, and can raise when a product fell back to a wider
type.

One concept per module:

- `scalify.fp8.policy`: what to run in float8 and how (`Fp8Policy`, the ``keep``
  filters: `MatmulInfo`, `keep_names`);
- `scalify.fp8.kernels`: the float8 custom VJPs that replace the matmuls;
- `scalify.fp8.rewrite`: `autocast`, the jaxpr rewrite;
- `scalify.fp8.report`: `matmul_report` and its `MatmulReport`, `MatmulEntry`,
  `Fp8FallbackError`; the text readers it uses are private (`_hlo`).
"""
from scalify.fp8.policy import E4M3, E5M2, Fp8Policy, MatmulInfo, keep_names
from scalify.fp8.report import FP8_GEMM_TARGET, Fp8FallbackError, MatmulEntry, MatmulReport, matmul_report
from scalify.fp8.rewrite import autocast

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_GEMM_TARGET",
    "Fp8FallbackError",
    "Fp8Policy",
    "MatmulEntry",
    "MatmulInfo",
    "MatmulReport",
    "autocast",
    "keep_names",
    "matmul_report",
]
