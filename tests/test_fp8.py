"""`scalify.fp8`: float8 matmuls by `autocast`, checked with `matmul_report`.

The oracle is plain float32 JAX. Float8 results are compared within float8 tolerance
(E4M3 operands: ~2^-4 relative rounding each; E5M2 cotangents: ~2^-3), and every
numerical test also checks that float8 really happened (the error is not float32's).
"""
import inspect
import json as _json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import scalify as sfy
from scalify import fp8

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpt  # noqa: E402

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"


def normal(shape, seed, scale=1.0):
    """Test data from NumPy (eager `jax.random` compiles a program per shape)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def init_gpt(cfg):
    return jax.jit(gpt.init_params, static_argnums=1)(jax.random.key(0), cfg)


def rel_err(got, want):
    got = np.asarray(sfy.asarray(got, dtype=jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def tree_rel_errs(got, want):
    got = sfy.asarray(got, dtype=jnp.float32)
    return {
        jax.tree_util.keystr(path): rel_err(g, w)
        for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got))
    }


def count_eqns(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    n += count_eqns(getattr(sub, "jaxpr", sub), name)
    return n


# --- the backward products are the transposes of the forward one -------------------------

DOT_CASES = [
    ((4, 8), (8, 6), (((1,), (0,)), ((), ()))),  # matmul
    ((2, 3, 8), (8, 5), (((2,), (0,)), ((), ()))),  # dense layer on a batch
    ((2, 5, 3, 4), (2, 7, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention logits
    ((2, 3, 5, 7), (2, 7, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),  # probs @ values
    ((3, 4, 5), (5, 4, 6), (((1, 2), (1, 0)), ((), ()))),  # two contracting dims, crossed
    ((6, 2, 4), (4, 2, 3), (((2,), (0,)), ((1,), (1,)))),  # batch dims not leading
]


def test_backward_products_are_exact_transposes():
    """With float32 in place of float8 the custom VJP equals JAX's own derivative, for
    every layout of contracting and batch dimensions; in float8 it is the same program:
    one forward and two backward products."""
    cases = []
    for i, (lhs_shape, rhs_shape, dims) in enumerate(DOT_CASES):
        f = lambda x, y, dims=dims: lax.dot_general(x, y, dims)  # noqa: E731
        x = normal(lhs_shape, 3 * i)
        y = normal(rhs_shape, 3 * i + 1)
        g = normal(jax.eval_shape(f, x, y).shape, 3 * i + 2)
        cases.append((f, x, y, g))

    @jax.jit
    def run(args):
        out = []
        for (f, *_), (x, y, g) in zip(cases, args):
            f32 = fp8.autocast(f, fwd_dtype=jnp.float32, bwd_dtype=jnp.float32)
            o, vjp = jax.vjp(f32, x, y)
            o0, vjp0 = jax.vjp(f, x, y)
            out.append(((o, *vjp(g)), (o0, *vjp0(g))))
        return out

    for got, want in run([c[1:] for c in cases]):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def fp8_vjps(args):
        return [jax.vjp(fp8.autocast(f), x, y)[1](g) for (f, *_), (x, y, g) in zip(cases, args)]

    args = [c[1:] for c in cases]
    assert count_eqns(jax.make_jaxpr(fp8_vjps)(args).jaxpr, "dot_general") == 3 * len(cases)
    report = fp8.matmul_report(jax.jit(fp8_vjps).lower(args))
    # The primal outputs are unused: two float8 products (E5M2 x E4M3) per case.
    assert report.fp8_count == 2 * len(cases) == len(report.entries) and not report.fallbacks
    assert all({e.lhs_dtype, e.rhs_dtype} == {E4M3, E5M2} for e in report.entries)


# --- a transformer training step: every product float8 in the lowered program ---------

CFG = gpt.GPTConfig(vocab=80, seq_len=16, d_model=32, n_heads=2, n_layers=1)


def gpt_loss(p, t, y):
    return gpt.loss_fn(p, t, y, CFG)


def test_gpt_step_all_products_float8():
    """A transformer training step (scan over layers, attention, embeddings) under
    scalify: every product of the forward and backward passes is a float8 product."""
    params = init_gpt(CFG)
    tok = np.zeros((2, CFG.seq_len), np.int32)
    n_fwd = count_eqns(jax.make_jaxpr(gpt_loss)(params, tok, tok).jaxpr, "dot_general")
    step = jax.jit(sfy.scalify(jax.value_and_grad(fp8.autocast(gpt_loss, keep_output=False))))
    lowered = step.lower(sfy.as_scaled_array(params), tok, tok)
    assert n_fwd == 7  # head + (qkv, logits, probs @ v, out, mlp in, mlp out) in the scan
    report = fp8.matmul_report(lowered, expect_fp8="all", raise_on_fallback=True)
    fwd = [e for e in report.entries if (e.lhs_dtype, e.rhs_dtype) == (E4M3, E4M3)]
    bwd = [e for e in report.entries if E5M2 in (e.lhs_dtype, e.rhs_dtype)]
    assert len(fwd) == n_fwd, str(report)
    assert len(bwd) == 2 * n_fwd, str(report)  # d(lhs) and d(rhs) of every product
    assert len(report.entries) == 3 * n_fwd
    # Gradients are E5M2 x E4M3 (one operand of each), as cuBLASLt's FP8 GEMM wants.
    assert all({e.lhs_dtype, e.rhs_dtype} == {E4M3, E5M2} for e in bwd)
    assert all(e.out_dtype == "float32" for e in report.entries)


# --- keep: chosen products stay in their own precision -----------------------------------


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


# --- numerics: float8 through scalify at any magnitude ---------------------------------


@pytest.mark.parametrize("log2_scale", [-60, 40])
def test_float8_matmul_at_any_magnitude(log2_scale):
    x = normal((32, 64), 3)
    w = normal((64, 48), 4, 1 / 8)

    def f(x, w):  # homogeneous, so that the same relative error is expected at any scale
        return jax.nn.relu(x @ w) @ w.T

    def loss(x, w):
        return jnp.sum(f(x, w) * np.linspace(-1, 1, 64, dtype=np.float32))

    s = np.float32(2.0**log2_scale)
    xs = sfy.ScaledArray(x.astype(jnp.bfloat16), jnp.float32(s))
    ws = sfy.as_scaled_array(w.astype(jnp.bfloat16))
    x_val = x.astype(jnp.bfloat16).astype(jnp.float32) * s
    w_val = w.astype(jnp.bfloat16).astype(jnp.float32)

    out = jax.jit(fp8.autocast(f))(xs, ws)  # ScaledArray arguments: runs through scalify
    want = jax.jit(f)(x_val, w_val)
    err = rel_err(out, want)
    assert 1e-3 < err < 0.1, err  # float8, not bfloat16 (~4e-3) nor broken
    assert out.data.dtype == jnp.bfloat16

    g = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss), argnums=(0, 1))))(xs, ws)
    g0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(x_val, w_val)
    for a, b in zip(g, g0):
        assert 1e-3 < rel_err(a, b) < 0.25, (rel_err(a, b), log2_scale)

    if log2_scale != 0:
        # Without scalify, float8 cannot hold these values: the product is ruined.
        plain = jax.jit(fp8.autocast(f))(x_val, w_val)
        assert not (rel_err(plain, want) < 0.1)


def test_rescale_options():
    """Default: forward casts are plain casts, the cotangent is brought to unit RMS
    (a reduction) before its E5M2 cast; ``"all"`` rescales forward operands too;
    ``None`` rescales nothing."""

    def f(x, w):
        return x @ w

    def vjp(rescale):
        def run(x, w, g):
            return jax.vjp(fp8.autocast(f, rescale=rescale), x, w)[1](g)

        return jax.jit(sfy.scalify(run)).lower(*sfy.as_scaled_array((ones, ones, ones))).as_text()

    def fwd(rescale):
        fn = jax.jit(sfy.scalify(fp8.autocast(f, rescale=rescale)))
        return fn.lower(*sfy.as_scaled_array((ones, ones))).as_text()

    ones = np.ones((16, 16), np.float32)
    rms = "applies stablehlo.add"  # the RMS reduction of a rescaling (a sum of squares)
    assert rms not in fwd("grad") and rms in fwd("all") and rms not in fwd(None)
    assert rms in vjp("grad") and rms not in vjp(None)
    assert fp8.matmul_report(vjp(None)).fp8_count == 2
    # The range guard of the float8 casts measures a max-abs (no sum); off, none is left.
    assert "applies stablehlo.maximum" in fwd(None)
    with sfy.ScalifyConfig(range_guard=False):
        assert "reduce" not in fwd("grad") and "reduce" not in fwd(None)
    with pytest.raises(ValueError, match="rescale"):
        fp8.autocast(f, rescale="l1")


# --- composition: jit, grad, remat, cond, vmap, Equinox, convolutions ---------------------


def test_composes_with_jit_remat_cond_and_vmap():
    def layer(x, w):
        return jnp.tanh(x @ w)

    @jax.jit
    def inner(x, w):
        return jax.checkpoint(layer)(x, w)

    def loss(x, w, flag):
        h = inner(x, w)
        h = lax.cond(flag, lambda h: h @ w, lambda h: -h @ w, h)
        return jnp.sum(jax.vmap(lambda r: r @ w)(h) ** 2)

    x = normal((8, 32), 1)
    w = normal((32, 32), 2, 1 / 6)
    grad = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss, keep_output=False), argnums=(0, 1))))
    args = (sfy.as_scaled_array(x), sfy.as_scaled_array(w), True)
    report = fp8.matmul_report(grad.lower(*args), expect_fp8="all", raise_on_fallback=True)
    assert report.fp8_count >= 8, str(report)  # 3 forward (+ cond's other branch) + 6 backward
    g = grad(*args)
    g0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, True)
    for a, b in zip(g, g0):
        assert 1e-3 < rel_err(a, b) < 0.3


def test_python_numbers_stay_static_and_errors_name_the_user_line():
    """A Python bool or float argument is not traced (as under `scalify`): Python code
    can branch on it. Rebound equations keep their source lines, so that scalify's
    error for an unsupported primitive still names the user's code."""

    def loss(x, w, train, k):
        h = x @ w
        if train:
            h = h * k
        return jnp.sum(h**2)

    x, w = normal((8, 16), 1), normal((16, 4), 2, 1 / 4)
    g = jax.grad(fp8.autocast(loss, keep_output=False), argnums=1)(x, w, True, 2.0)
    g0 = jax.grad(loss, argnums=1)(x, w, True, 2.0)
    assert 1e-3 < rel_err(g, g0) < 0.3

    prim = jax.extend.core.Primitive("my_custom_op")
    prim.def_abstract_eval(lambda a: a)

    def f(x, w):
        return prim.bind(x) @ w

    with pytest.raises(sfy.UnsupportedPrimitiveError) as info:
        sfy.scalify(fp8.autocast(f))(sfy.as_scaled_array(x), w)
    msg = str(info.value)
    assert "my_custom_op" in msg and os.path.basename(__file__) in msg, msg


def test_equinox_mlp():
    import equinox as eqx

    model = eqx.filter_jit(lambda k: eqx.nn.MLP(16, 4, 32, depth=2, key=k))(jax.random.key(0))
    x = normal((8, 16), 1)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, x):
        m = eqx.combine(params, static)
        return jnp.mean(jax.vmap(m)(x) ** 2)

    grad = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss, keep_output=False))))
    sparams = sfy.as_scaled_array(params)
    report = fp8.matmul_report(grad.lower(sparams, x), expect_fp8="all", raise_on_fallback=True)
    assert report.fp8_count == 3 + 5, str(report)  # 3 forward; d(first layer input) unused
    g = grad(sparams, x)
    g0 = jax.jit(jax.grad(loss))(params, x)
    errs = tree_rel_errs(g, g0)
    assert max(errs.values()) < 0.3, errs


def test_convolution_in_float8():
    x = normal((2, 8, 8, 3), 5)
    w = normal((3, 3, 3, 4), 6, 1 / 5)

    def loss(x, w):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) * np.arange(4.0, dtype=np.float32))

    grad = jax.jit(sfy.scalify(jax.grad(fp8.autocast(loss, conv=True), argnums=(0, 1))))
    args = sfy.as_scaled_array((x, w))
    report = fp8.matmul_report(grad.lower(*args))
    convs = [e for e in report.entries if e.op == "convolution"]
    assert len(convs) == 3 and all(e.fp8 for e in convs), str(report)
    assert sum(e.fp8_operands for e in convs) == 1  # forward: float8 operands directly
    g = grad(*args)
    g0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    for a, b in zip(g, g0):
        assert 1e-3 < rel_err(a, b) < 0.3
    # Without conv=True convolutions keep their precision.
    report = fp8.matmul_report(jax.jit(jax.grad(fp8.autocast(loss))).lower(x, w))
    assert report.fp8_count == 0 and len(report.entries) == 2


def test_sharded_data_parallel_and_shard_map():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",))
    x = jax.device_put(normal((8, 16), 7), NamedSharding(mesh, P("d", None)))
    w = jax.device_put(normal((16, 16), 8, 1 / 4), NamedSharding(mesh, P()))

    def loss(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    # Batch-sharded data: d(w) contracts the sharded batch, its sharding is w's.
    lowered = jax.jit(jax.grad(fp8.autocast(loss))).lower(w, x)
    assert fp8.matmul_report(lowered, expect_fp8="all", raise_on_fallback=True).fp8_count == 2

    def step(w, x):
        return lax.pmean(jax.grad(fp8.autocast(loss))(w, x), "d")

    in_shard_map = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d", None)), out_specs=P())
    assert fp8.matmul_report(jax.jit(in_shard_map).lower(w, x), expect_fp8="all", raise_on_fallback=True)
    # Around a shard_map (whose body needs its mesh axes) the body is left as it is,
    # with a warning.
    sm = jax.shard_map(lambda x, w: lax.psum(x @ w, "d"), mesh=mesh,
                       in_specs=(P(None, "d"), P("d", None)), out_specs=P())
    xs = jax.device_put(normal((8, 16), 9), NamedSharding(mesh, P(None, "d")))
    ws = jax.device_put(normal((16, 16), 10), NamedSharding(mesh, P("d", None)))
    with pytest.warns(UserWarning, match="could not rewrite the body of 'shard_map'"):
        report = fp8.matmul_report(jax.jit(fp8.autocast(sm)).lower(xs, ws))
    assert report.fp8_count == 0 and len(report.entries) == 1


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


# --- training: 200 steps of a small transformer in float8 under scalify ----------------


@pytest.mark.slow
def test_training_200_steps_fp8_within_3_percent_of_float32():
    cfg = gpt.GPTConfig(vocab=96, seq_len=16, d_model=32, n_heads=2, n_layers=1)
    text = inspect.getsource(_json.decoder) + inspect.getsource(_json.encoder)
    data = np.array([min(max(ord(c) - 32, 0), 95) for c in text], np.int32)
    steps, batch = 200, 16
    starts = np.random.default_rng(0).integers(0, len(data) - cfg.seq_len - 1, size=(steps, batch))
    batches = jnp.asarray(np.stack([[data[s : s + cfg.seq_len + 1] for s in row] for row in starts]))

    def loss(p, t, y):
        return gpt.loss_fn(p, t, y, cfg)

    def fp8_value_and_grad(p, t, y):
        v, g = sfy.scalify(jax.value_and_grad(fp8.autocast(loss)))(sfy.as_scaled_array(p), t, y)
        return sfy.asarray(v), sfy.asarray(g)

    opt = optax.adam(1e-2)

    def train(value_and_grad, params):
        def step(carry, b):
            p, s = carry
            v, g = value_and_grad(p, b[:, :-1], b[:, 1:])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        _, losses = lax.scan(step, (params, opt.init(params)), batches)
        return losses

    params = init_gpt(cfg)
    l32 = np.asarray(jax.jit(lambda p: train(jax.value_and_grad(loss), p))(params))
    l8 = np.asarray(jax.jit(lambda p: train(fp8_value_and_grad, p))(params))
    assert abs(l8[0] - l32[0]) < 0.02 * l32[0]  # same parameters, same batch
    final32, final8 = l32[-20:].mean(), l8[-20:].mean()
    assert final32 < 0.7 * l32[0]  # it learned
    assert abs(final8 - final32) < 0.03 * final32, (final8, final32)
    assert not np.allclose(l8, l32, rtol=1e-4)  # and it really ran in float8
