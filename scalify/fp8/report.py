"""`matmul_report`: what a lowered or compiled program really does with its matmuls.

`autocast` asks for float8 products; whether the program runs them in float8 is up to
JAX's lowering and XLA's compiler, which may upcast an operand or pick a wide-type
kernel without a word. The report lists every matrix product of the program text
(`scalify.fp8._hlo` reads it) with its operand types and their origins, flags the
*fallbacks* -- products that should run in float8 and do not -- and can raise on them,
so that a test or a training script can insist on float8.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, Union

import jax
import numpy as np

from scalify.fp8 import _hlo
from scalify.fp8._hlo import is_f8

# The custom call by which XLA's GPU compiler runs a float8 GEMM on cuBLASLt (Ada, Hopper).
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
        return is_f8(self.lhs_origin) and is_f8(self.rhs_origin)

    @property
    def fp8_operands(self) -> bool:
        """Both operands are float8 as stored (no upcast in between)."""
        return is_f8(self.lhs_dtype) and is_f8(self.rhs_dtype)

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
        lf, rf = is_f8(e.lhs_origin), is_f8(e.rhs_origin)
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
        entries = [MatmulEntry(**p) for p in _hlo.stablehlo_products(text)]
        fp8_kernel = None
    else:
        entries = [MatmulEntry(**p) for p in _hlo.hlo_products(text)]
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


