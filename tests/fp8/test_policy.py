"""`scalify.fp8.policy`: which matmuls keep their precision (``keep``, ``keep_output``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify import fp8
from tests.fp8.common import CFG, gpt_loss, init_gpt


def test_keep_excludes_chosen_products_and_report_raises():
    params = init_gpt(CFG)
    tok = np.zeros((2, CFG.seq_len), np.int32)
    is_head = lambda m: m.rhs_shape[-1] == CFG.vocab or m.lhs_shape[-1] == CFG.vocab  # noqa: E731
    loss = fp8.autocast(gpt_loss, keep=is_head)
    lowered = jax.jit(sfy.scalify(jax.value_and_grad(loss))).lower(sfy.as_scaled_array(params), tok, tok)
    report = fp8.matmul_report(lowered)
    wide = [e for e in report.entries if not e.fp8]
    assert len(wide) == 3 and all(e.lhs_dtype == "float32" for e in wide), str(report)
    assert report.fp8_count == 18 and not report.fallbacks
    with pytest.raises(fp8.Fp8FallbackError, match="expected in float8"):
        fp8.matmul_report(lowered, expect_fp8="all", raise_on_fallback=True)
    with pytest.raises(fp8.Fp8FallbackError, match="at least 20"):
        fp8.matmul_report(lowered, expect_fp8=20, raise_on_fallback=True)
    # A predicate selecting only float8 products passes.
    not_head = lambda m: CFG.vocab not in m.lhs_shape + m.rhs_shape + m.out_shape  # noqa: E731
    fp8.matmul_report(lowered, expect_fp8=not_head, raise_on_fallback=True)


def test_keep_output_keeps_only_the_output_projection():
    """By default the output projection (the head: its result reaches the loss through
    no other matmul) keeps its precision, forward and backward; every other product is
    float8. A function that is only its output projection runs it in float8."""
    params = init_gpt(CFG)
    tok = np.zeros((2, CFG.seq_len), np.int32)
    lowered = jax.jit(sfy.scalify(jax.value_and_grad(fp8.autocast(gpt_loss)))).lower(
        sfy.as_scaled_array(params), tok, tok)
    report = fp8.matmul_report(lowered)
    wide = [e for e in report.entries if not e.fp8]
    assert len(wide) == 3 and report.fp8_count == 18, str(report)
    assert all(CFG.vocab in (*e.lhs_shape, *e.rhs_shape, *e.out_shape) for e in wide), str(report)
    x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
    single = fp8.matmul_report(jax.jit(jax.grad(fp8.autocast(lambda x, w: jnp.sum(x @ w)))).lower(x, w))
    assert single.fp8_count == len(single.entries) >= 1, str(single)


def test_keep_names_flax_module_path():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.gelu(nn.Dense(32, name="body")(x))
            return nn.Dense(8, name="head")(x)

    net = Net()
    x = np.ones((4, 16), np.float32)
    variables = jax.jit(net.init)(jax.random.key(0), x)

    def loss(v, x):
        return jnp.mean(net.apply(v, x) ** 2)

    seen = []

    def keep(info):
        seen.append(info.name)
        return fp8.keep_names("head")(info)

    lowered = jax.jit(jax.grad(fp8.autocast(loss, keep=keep, keep_output=False))).lower(variables, x)
    report = fp8.matmul_report(lowered)
    assert any(s.endswith("head") for s in seen) and any(s.endswith("body") for s in seen), seen
    # body: forward and d(weight) in float8 (no d(input)); head: forward, d(weight) and
    # d(input) kept in float32.
    assert report.fp8_count == 2 and len(report.entries) == 5, str(report)
    # String shorthand: the same as keep_names.
    lowered = jax.jit(jax.grad(fp8.autocast(loss, keep="head", keep_output=False))).lower(variables, x)
    assert fp8.matmul_report(lowered).fp8_count == 2


def test_keep_names_matches_path_components():
    def info(name):
        f32 = np.dtype(np.float32)
        return fp8.MatmulInfo("dot_general", (2, 2), (2, 2), (2, 2), f32, f32, f32, name, "", {})

    keep = fp8.keep_names("head", "decoder/out")
    assert keep(info("Model/head"))
    assert keep(info("jvp(Model)/head/Dense_0"))
    assert keep(info("Model/decoder/out"))
    assert not keep(info("Model/header"))
    assert not keep(info("Model/out"))
    assert not keep(info(""))
