"""`scalify.fp8.policy`: `Fp8Policy`, and which matmuls keep their precision (``keep``,
``keep_output``)."""
import dataclasses

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


# --- Fp8Policy: every option in one value ------------------------------------------------


def test_policy_is_a_checked_value():
    p = fp8.Fp8Policy(fwd_dtype=jnp.float8_e5m2, keep="head")
    assert p.fwd_dtype == np.dtype(jnp.float8_e5m2) and p.bwd_dtype == fp8.E5M2
    assert callable(p.keep) and p.keep.__name__ == "keep_names('head',)"
    assert p.rescale == "grad" and p.keep_output and not p.conv
    assert fp8.Fp8Policy() == fp8.Fp8Policy() and hash(fp8.Fp8Policy()) == hash(fp8.Fp8Policy())
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.conv = True
    assert dataclasses.replace(p, conv=True).conv
    with pytest.raises(ValueError, match="rescale"):
        fp8.Fp8Policy(rescale="l1")
    with pytest.raises(ValueError, match="rescale"):
        dataclasses.replace(p, rescale="l1")
    with pytest.raises(TypeError, match="floating dtype"):
        fp8.Fp8Policy(bwd_dtype=jnp.int8)
    with pytest.raises(TypeError, match="keep"):
        fp8.Fp8Policy(keep=3)


def test_autocast_takes_a_policy_or_keyword_options():
    def f(x, w):
        with jax.named_scope("head"):
            y = x @ w
        return jnp.sum(jnp.tanh(y @ w.T) ** 2)

    x, w = np.ones((8, 16), np.float32), np.ones((16, 16), np.float32)

    def lowered(g):
        return jax.jit(jax.grad(g, argnums=(0, 1))).lower(x, w).as_text()

    policy = fp8.Fp8Policy(keep="head", rescale=None, keep_output=False)
    by_keywords = lowered(fp8.autocast(f, keep=policy.keep, rescale=None, keep_output=False))
    assert lowered(fp8.autocast(f, policy)) == by_keywords
    assert lowered(fp8.autocast(policy=policy)(f)) == by_keywords  # as a decorator
    assert lowered(fp8.autocast(f, fp8.Fp8Policy())) == lowered(fp8.autocast(f))
    report = fp8.matmul_report(jax.jit(jax.grad(fp8.autocast(f, policy))).lower(x, w))
    # d(x): forward and d(lhs) of each product; the head's two stay float32.
    assert report.fp8_count == 2 and len(report.entries) == 4, str(report)
    assert all(e.fp8 == (e.lhs_dtype != "float32") for e in report.entries), str(report)
    with pytest.raises(TypeError, match="not both"):
        fp8.autocast(f, policy, conv=True)
    with pytest.raises(TypeError, match="Fp8Policy"):
        fp8.autocast(f, "head")
