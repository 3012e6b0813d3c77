"""`scalify.fp8.report`: fallbacks found in lowered and compiled programs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalify import fp8
from tests.fp8.common import E4M3


# --- matmul_report: fallbacks ------------------------------------------------------------


def test_report_detects_deliberate_fallback():
    def f(x, w):
        x8 = x.astype(jnp.float8_e4m3fn).astype(jnp.float32)  # float8 upcast...
        return x8 @ w  # ... against a float32 operand

    x = np.ones((16, 32), np.float32)
    w = np.ones((32, 8), np.float32)
    lowered = jax.jit(f).lower(x, w)
    report = fp8.matmul_report(lowered)
    (entry,) = report.entries
    assert entry.lhs_origin == E4M3 and entry.rhs_origin == "float32"
    assert entry.fallback and "one operand is float8" in entry.fallback
    with pytest.raises(fp8.Fp8FallbackError, match="fell back"):
        fp8.matmul_report(lowered, raise_on_fallback=True)
    # The compiled CPU program emulates float8: listed, not a fallback.
    ok = jax.jit(fp8.autocast(lambda x, w: x @ w)).lower(x, w).compile()
    report = fp8.matmul_report(ok, raise_on_fallback=True)
    assert report.stage == "hlo" and report.platform == "cpu" and report.emulated
    assert report.fp8_count == 1 and report.fp8_kernel is None
