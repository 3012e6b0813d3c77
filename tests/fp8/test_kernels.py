"""`scalify.fp8.kernels`: the float8 custom VJPs -- their products, numerics and casts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scalify as sfy
from scalify import fp8
from tests.fp8.common import E4M3, E5M2, normal, rel_err
from tests.utils import count_eqns


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


# --- convolutions ------------------------------------------------------------------------


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
