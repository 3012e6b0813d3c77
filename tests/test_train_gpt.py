"""benchmarks/train_gpt.py runs end to end (--quick) and benchmarks/readme_tables.py
renders its JSON (and the other benchmarks') into the README's results section."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import readme_tables  # noqa: E402


def _quick_run(out):
    import train_gpt

    return train_gpt.main(["--quick", "--configs", "float32", "float16", "scalify-fp16",
                           "--no-plots", "--out", str(out)])


def test_quick_run_end_to_end(tmp_path):
    """One quick training run (about 100 s on 2 cores), checked three ways. One test
    rather than a module fixture shared by three: under `pytest -n`, each worker that
    ran one of them would train again."""
    out = tmp_path / "train_gpt.json"
    quick_run = (_quick_run(out), out)
    _check_writes_json(quick_run)
    _check_plain_float16_fails_and_scalify_float16_tracks_float32(quick_run)
    tables = tmp_path / "tables"
    tables.mkdir()
    _check_readme_tables_render_all_benchmarks(quick_run, tables)


def _check_writes_json(quick_run):
    results, out = quick_run
    with open(out) as f:
        on_disk = json.load(f)
    assert on_disk["benchmark"] == "train_gpt"
    assert on_disk["device"] and on_disk["device"] == results["device"]
    assert set(on_disk["runs"]) == {"float32", "float16", "scalify-fp16"}
    for r in on_disk["runs"].values():
        assert {"final_train_loss", "final_val_loss", "val_ratio", "step_time_ratio", "state_bytes",
                "train_curve", "val_curve"} <= set(r)


def _check_plain_float16_fails_and_scalify_float16_tracks_float32(quick_run):
    runs = quick_run[0]["runs"]
    # Plain float16 Adam: eps=1e-8 and the second moment underflow to 0 -> non-finite.
    assert runs["float16"]["nonfinite_step"] is not None
    s16, f32 = runs["scalify-fp16"], runs["float32"]
    assert s16["nonfinite_step"] is None
    assert all(math.isfinite(x) for x in s16["train_curve"])
    assert f32["train_curve"][-1] < f32["train_curve"][0]  # it learns
    assert abs(s16["final_val_loss"] / f32["final_val_loss"] - 1) < 0.01
    # Adam state stored in float16 ScaledArrays: about half the float32 bytes.
    assert 0.49 < s16["state_bytes"] / f32["state_bytes"] < 0.52


def _check_readme_tables_render_all_benchmarks(quick_run, tmp_path):
    results, _ = quick_run
    (tmp_path / "train_gpt.json").write_text(json.dumps(results))
    (tmp_path / "overhead.json").write_text(json.dumps({
        "device": "TestCPU", "cases": {"mlp-float16": {"ratio": {"trace": 2.0, "compile": 1.5, "run": 1.02},
                                                       "median_s": {"jax": {"run": 1e-3}, "scalify": {"run": 1.02e-3}},
                                                       "decomposition": {"static-scales": {"compile": 1.25, "run": 1.01},
                                                                         "static-sums": {"compile": 1.125, "run": 0.99}}}}}))
    (tmp_path / "optimizer_memory.json").write_text(json.dumps({
        "model": "GPT-2 small", "n_params": 124e6, "optimizer": "optax.adam",
        "rows": {"float32": {"params_bytes": 4e8, "state_bytes": 8e8, "total_bytes": 1.2e9, "total_ratio": 1.0}}}))
    (tmp_path / "fp8_matmul.json").write_text(json.dumps({
        "device": "gpu: H100", "platform": "gpu", "rows": [
            {"shape": "square", "M": 8192, "K": 8192, "N": 8192, "bf16_tflops": 600.0, "fp8_tflops": 1100.0,
             "fp8_vs_bf16": 1.83, "fp8_kernel": "yes"}]}))
    body = readme_tables.render(str(tmp_path))
    assert results["device"] in body and "TestCPU" in body and "gpu: H100" in body
    assert "scalify-fp16" in body and "1.83x" in body and "GPT-2 small" in body
    assert "non-finite at step" in body  # the plain float16 row
    assert "| mlp-float16 | 1.50x | 1.25x | 1.12x | 1.02x | 1.01x | 0.99x |" in body  # --decompose

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{readme_tables.START}\nold\n{readme_tables.END}\n\nafter\n")
    assert readme_tables.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    assert readme_tables.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "\nold\n" not in text and text.startswith("# title\n\nintro") and text.endswith("after\n")
    assert "| scalify-fp16 |" in text
    assert readme_tables.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 0


def test_readme_tables_needs_markers(tmp_path):
    with pytest.raises(ValueError):
        readme_tables.replace_section("no markers here", "body")
