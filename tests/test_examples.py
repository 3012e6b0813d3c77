"""The examples run end to end in their --quick mode, and the scalified model trains like
the float32 one (same data order, same optimizer) with finite losses."""
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(results, metric, tol):
    by_mode = {r["mode"]: r for r in results}
    ref = by_mode.pop("float32")
    assert by_mode, "no scalify run"
    for mode, r in by_mode.items():
        assert math.isfinite(r["final_loss"]), (mode, r)
        # One minibatch's loss after a few steps: float8 rounding moves the trajectory by
        # several percent (digits_mlp, 25 steps: fp8 7% above float32; at 60 steps 22%
        # below), so the held-out metric below is the tight check.
        assert abs(r["final_loss"] - ref["final_loss"]) <= 0.1 * ref["final_loss"], (mode, r, ref)
        assert abs(r[metric] - ref[metric]) <= tol * max(abs(ref[metric]), 1e-3), (mode, r, ref)


@pytest.mark.parametrize("name, metric, tol", [
    ("digits_mlp", "test_accuracy", 0.05),
    ("flax_linen_digits", "test_accuracy", 0.05),
    ("equinox_digits", "test_accuracy", 0.05),
    ("flax_nnx_charlm", "val_loss", 0.02),
])
def test_example_quick(name, metric, tol, capsys):
    results = _load(name).main(["--quick"])
    out = capsys.readouterr().out
    assert "float32" in out and "scalify" in out
    _check(results, metric, tol)
