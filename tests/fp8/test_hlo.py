"""`scalify.fp8._hlo`: reading the products of optimised GPU HLO text."""
import pytest

from scalify import fp8
from tests.fp8.common import E4M3, E5M2


GPU_HLO = """
HloModule jit_step, entry_computation_layout={(f8e4m3fn[16,32]{1,0}, f8e4m3fn[32,16]{1,0})->f32[16,16]{1,0}}

%fused_convert (param_0.1: f8e5m2[16,32]) -> f16[16,32] {
  %param_0.1 = f8e5m2[16,32]{1,0} parameter(0)
  ROOT %convert.3 = f16[16,32]{1,0} convert(%param_0.1)
}

%gemm_fusion_dot.7_computation (parameter_0: f8e5m2[16,32], parameter_1: f8e4m3fn[32,16]) -> bf16[16,16] {
  %parameter_0 = f8e5m2[16,32]{1,0} parameter(0)
  %parameter_1 = f8e4m3fn[32,16]{1,0} parameter(1)
  ROOT %dot.7 = bf16[16,16]{1,0} dot(f8e5m2[16,32]{1,0} %parameter_0, f8e4m3fn[32,16]{1,0} %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (x.1: f8e4m3fn[16,32], y.1: f8e4m3fn[32,16], g.1: f8e5m2[16,32]) -> f32[16,16] {
  %x.1 = f8e4m3fn[16,32]{1,0} parameter(0)
  %y.1 = f8e4m3fn[32,16]{1,0} parameter(1)
  %g.1 = f8e5m2[16,32]{1,0} parameter(2)
  %transpose.1 = f8e4m3fn[16,32]{1,0} transpose(f8e4m3fn[32,16]{1,0} %y.1), dimensions={1,0}
  %constant.1 = f32[] constant(1)
  %cublas-lt-matmul.1 = (f32[16,16]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16,32]{1,0} %x.1, f8e4m3fn[16,32]{1,0} %transpose.1, f32[] %constant.1, f32[] %constant.1), custom_call_target="__cublas$lt$matmul$f8", backend_config={"gemm_backend_config":{"alpha_real":1}}
  %gte.1 = f32[16,16]{1,0} get-tuple-element((f32[16,16]{1,0}, s8[33554432]{0}) %cublas-lt-matmul.1), index=0
  %fusion.2 = f16[16,32]{1,0} fusion(f8e5m2[16,32]{1,0} %g.1), kind=kLoop, calls=%fused_convert
  %convert.4 = f16[16,32]{1,0} convert(f8e4m3fn[16,32]{1,0} %x.1)
  %cublas-gemm.2 = (f16[32,32]{1,0}, s8[4194304]{0}) custom-call(f16[16,32]{1,0} %fusion.2, f16[16,32]{1,0} %convert.4), custom_call_target="__cublas$gemm"
  %gemm_fusion_dot.7 = bf16[16,16]{1,0} fusion(f8e5m2[16,32]{1,0} %g.1, f8e4m3fn[32,16]{1,0} %y.1), kind=kCustom, calls=%gemm_fusion_dot.7_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %gte.2 = f32[16,16]{1,0} get-tuple-element((f32[16,16]{1,0}, s8[33554432]{0}) %cublas-lt-matmul.1), index=0
}
"""


def test_report_parses_gpu_hlo():
    report = fp8.matmul_report(GPU_HLO, platform="gpu")
    assert report.stage == "hlo" and report.fp8_kernel is True
    triton, gemm, upcast = report.entries
    assert triton.kernel == "__triton_gemm" and triton.fp8_operands and not triton.fallback
    assert triton.k == 32 and triton.flops == 2 * 16 * 16 * 32
    assert gemm.kernel == fp8.FP8_GEMM_TARGET and gemm.fp8_operands and not gemm.fallback
    assert upcast.kernel == "__cublas$gemm" and upcast.fp8 and not upcast.fp8_operands
    assert (upcast.lhs_origin, upcast.rhs_origin) == (E5M2, E4M3)
    assert "wide-type kernel" in upcast.fallback
    with pytest.raises(fp8.Fp8FallbackError, match="__cublas\\$gemm"):
        fp8.matmul_report(GPU_HLO, platform="gpu", raise_on_fallback=True)
