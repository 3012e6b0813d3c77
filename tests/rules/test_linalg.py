"""Contraction rules: dot_general and conv_general_dilated move pow2(sqrt(K)) into the
scale, contract the data in their own dtypes (float8 included) with float32 accumulation."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import scalify as sfy
from scalify.rules.linalg import conv_fan_in, scaled_dot_general
from tests.utils import both, assert_close, assert_finite, assert_pow2_scales, oracle, rtol_of, scaled

DTYPES = [np.float32, np.float16, jnp.bfloat16]
E4M3 = ml_dtypes.float8_e4m3fn
E5M2 = ml_dtypes.float8_e5m2
RNG = np.random.default_rng(2)


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)



def pow2_sqrt_down(n):
    return 2.0 ** np.floor(np.log2(np.sqrt(n))) if n > 1 else 1.0


def values64(out):
    return np.asarray(out.data, np.float64) * float(out.scale)


def check(out, want64, dtype):
    """Each element within the dtype's tolerance (absolute floor at the subnormals of the
    data format, relative to the output scale)."""
    atol = float(out.scale) * max(2 * float(jnp.finfo(dtype).smallest_normal), 1e-6)
    np.testing.assert_allclose(values64(out), want64, rtol=rtol_of(dtype), atol=atol)


def data64(x):
    return np.asarray(x.data, np.float64)


# --- dot_general ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_values_and_scale(dtype):
    a = scaled(normal(8, 32), 2.0**-3, dtype)
    b = scaled(normal(32, 5), 2.0**10, dtype)
    f = lambda a, b: a @ b  # noqa: E731
    for fn in both(f):
        out = fn(a, b)
        assert out.dtype == np.dtype(dtype) and out.shape == (8, 5)
        assert float(out.scale) == 2.0**-3 * 2.0**10 * pow2_sqrt_down(32)
        assert_pow2_scales(out)
        check(out, data64(a) @ data64(b) * 2.0**7, dtype)
        assert_close(out, oracle(f, a, b), dtype, atol=float(out.scale) * 2.0**-13)


@pytest.mark.parametrize("sa,sb", [(2.0**-60, 2.0**60), (2.0**60, 2.0**60), (2.0**-60, 2.0**-60)])
def test_matmul_range_float16(sa, sb):
    a, b = scaled(normal(4, 64), sa), scaled(normal(64, 3), sb)
    out = jax.jit(sfy.scalify(lambda a, b: a @ b))(a, b)
    assert_finite(out)
    assert float(out.scale) == sa * sb * 8
    check(out, data64(a) @ data64(b) * (sa * sb), np.float16)


def test_dot_keeps_unit_variance():
    a = scaled(RNG.standard_normal((64, 256)), 1.0)
    b = scaled(RNG.standard_normal((256, 64)), 1.0)
    out = jax.jit(sfy.scalify(jnp.matmul))(a, b)
    assert float(out.scale) == 16.0
    assert 0.5 <= float(np.std(np.asarray(out.data, np.float32))) <= 2.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eq", ["bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"])
def test_attention_einsums(eq, dtype):
    shapes = {"b": 2, "h": 3, "q": 4, "k": 5, "d": 8}
    lhs, rhs = eq.split("->")[0].split(",")
    a = scaled(normal(*[shapes[c] for c in lhs]), 2.0**-30, dtype)
    b = scaled(normal(*[shapes[c] for c in rhs]), 2.0**20, dtype)
    f = lambda a, b: jnp.einsum(eq, a, b)  # noqa: E731
    k = shapes["d"] if eq.startswith("bhqd") else shapes["k"]
    for fn in both(f):
        out = fn(a, b)
        assert out.dtype == np.dtype(dtype)
        assert float(out.scale) == 2.0**-10 * pow2_sqrt_down(k)
        check(out, np.einsum(eq, data64(a), data64(b)) * 2.0**-10, dtype)


def test_several_contracting_dims_and_batch_dims():
    a = scaled(normal(3, 4, 5, 6), 2.0**5)
    b = scaled(normal(6, 3, 5, 7), 2.0**-9)
    dn = (((1 + 1, 3), (2, 0)), ((0,), (1,)))  # contract a(5,6)~b(5,6); batch a0~b1
    f = lambda a, b: lax.dot_general(a, b, dn)  # noqa: E731
    want = np.einsum("bicd,dbce->bie", data64(a), data64(b)) * 2.0**-4
    for fn in both(f):
        out = fn(a, b)
        assert out.shape == (3, 4, 7)
        assert float(out.scale) == 2.0**-4 * pow2_sqrt_down(30)
        check(out, want, np.float16)
    g = lambda a, b: jnp.einsum("ijk,jkl->il", a, b)  # noqa: E731
    x, y = scaled(normal(2, 6, 8), 2.0**3), scaled(normal(6, 8, 3), 1.0)
    out = jax.jit(sfy.scalify(g))(x, y)
    assert float(out.scale) == 2.0**3 * pow2_sqrt_down(48)
    check(out, np.einsum("ijk,jkl->il", data64(x), data64(y)) * 2.0**3, np.float16)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_preferred_element_type(dtype):
    a, b = scaled(normal(4, 16), 2.0**40, dtype), scaled(normal(16, 3), 2.0**-2, dtype)
    f = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
    for fn in both(f):
        out = fn(a, b)
        assert out.dtype == np.float32
        check(out, data64(a) @ data64(b) * 2.0**38, np.float32)
    text = jax.jit(sfy.scalify(f)).lower(a, b).as_text()
    narrow = "f16" if dtype == np.float16 else "bf16"
    assert re.search(rf"dot_general.*tensor<4x16x{narrow}>.*tensor<16x3x{narrow}>.*->\s*tensor<4x3xf32>", text)


def test_params_are_forwarded():
    a, b = scaled(normal(4, 16), 2.0**-5, np.float32), scaled(normal(16, 3), 2.0**2, np.float32)
    f = lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST)  # noqa: E731
    text = jax.jit(sfy.scalify(f)).lower(a, b).as_text()
    assert "HIGHEST" in text
    check(sfy.scalify(f)(a, b), data64(a) @ data64(b) * 2.0**-3, np.float32)


def test_one_plain_operand():
    a = scaled(normal(4, 16), 2.0**-50)
    w = jnp.asarray(normal(16, 3), np.float16)  # plain traced: scale 1
    v = jnp.asarray(normal(5, 4), np.float16)
    f = lambda a, w: a @ w  # noqa: E731
    for fn in both(f):
        out = fn(a, w)
        assert float(out.scale) == 2.0**-50 * 4
        check(out, data64(a) @ np.asarray(w, np.float64) * 2.0**-50, np.float16)
        out = fn(v, a)  # plain lhs
        assert isinstance(out, sfy.ScaledArray) and float(out.scale) == 2.0**-50 * 2
        check(out, np.asarray(v, np.float64) @ data64(a) * 2.0**-50, np.float16)


def test_static_constant_operand_uses_its_pow2_scale():
    a = scaled(normal(4, 8), 2.0**-40)
    f = lambda a: a @ jnp.full((8, 2), 1e3, a.dtype)  # noqa: E731  (folded: static operand)
    for fn in both(f):
        out = fn(a)
        assert float(out.scale) == 2.0**-40 * 512 * pow2_sqrt_down(8)
        check(out, data64(a) @ np.full((8, 2), np.float64(np.float16(1e3))) * 2.0**-40, np.float16)


@pytest.mark.parametrize("rhs_dtype", [E4M3, E5M2])
def test_float8_dot_stays_float8(rhs_dtype):
    a = scaled(normal(16, 32), 2.0**-20, E4M3)
    b = scaled(normal(32, 8), 2.0**30, rhs_dtype)
    f = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
    text = jax.jit(sfy.scalify(f)).lower(a, b).as_text()
    rname = "f8E4M3FN" if rhs_dtype == E4M3 else "f8E5M2"
    assert re.search(rf"dot_general.*tensor<16x32xf8E4M3FN>.*tensor<32x8x{rname}>.*->\s*tensor<16x8xf32>", text), text
    want = data64(a) @ data64(b) * 2.0**10
    for fn in both(f):
        out = fn(a, b)
        assert out.dtype == np.float32 and float(out.scale) == 2.0**10 * pow2_sqrt_down(32)
        check(out, want, np.float32)  # float8 inputs are exact; float32 accumulation


def test_float8_dot_with_float8_output_saturates():
    # jnp.matmul of float8 arrays returns float8 (no preferred type in the user's code).
    a = scaled(normal(8, 64), 2.0**-3, E4M3)
    b = scaled(normal(64, 4), 2.0**3, E4M3)
    out = jax.jit(sfy.scalify(jnp.matmul))(a, b)
    assert out.dtype == np.dtype(E4M3)
    check(out, data64(a) @ data64(b), E4M3)
    text = jax.jit(sfy.scalify(jnp.matmul)).lower(a, b).as_text()
    # float32 accumulation inside the dot, bfloat16 out of it (float32's exponent range at
    # half the bytes: what XLA's SPMD partitioner sums across devices), then the guard.
    assert re.search(r"dot_general.*tensor<8x64xf8E4M3FN>.*tensor<64x4xf8E4M3FN>.*->\s*tensor<8x4xbf16>", text)
    ones = scaled(np.full((2, 1024), 448.0), 1.0, E4M3)  # sum 448*1024/32 = 14336 > 448
    out = sfy.scalify(jnp.matmul)(ones, scaled(np.ones((1024, 2)), 1.0, E4M3))
    # Range-guarded: the excess goes into the scale (no saturation, no NaN).
    assert np.all(np.isfinite(np.asarray(out.data, np.float32)))
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)), 448.0 * 1024)
    with sfy.ScalifyConfig(range_guard=False):  # the static estimate alone saturates
        out = sfy.scalify(jnp.matmul)(ones, scaled(np.ones((1024, 2)), 1.0, E4M3))
    assert np.all(np.asarray(out.data, np.float32) == 448.0)


@pytest.mark.parametrize(
    "lhs,rhs,out,dot_out",
    [
        (np.float16, np.float16, None, "f16"),  # prescaled, measured headroom
        (jnp.bfloat16, jnp.bfloat16, None, "bf16"),
        (E4M3, E4M3, np.float16, "bf16"),  # float8 products: float32's exponent range
        (E5M2, E4M3, np.float16, "bf16"),
        (np.float16, np.float16, np.float32, "f32"),  # a float32 result: as before
    ],
)
@pytest.mark.parametrize("narrow", [True, False])
def test_narrow_data_leave_the_dot_narrow(lhs, rhs, out, dot_out, narrow):
    """Narrow data are contracted with float32 accumulation into a narrow dot output:
    XLA's SPMD partitioner sums a sharded contraction's partial results in the dot's
    output dtype (tests/test_comm_bytes.py), so gradients cross devices at 16 bits.
    float16 results do so only with `narrow_contractions` (by default: several devices);
    otherwise the dot outputs float32 and the result is rounded once after it."""
    a, b = scaled(normal(8, 64), 2.0**-7, lhs), scaled(normal(64, 4), 2.0**9, rhs)
    f = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=out)  # noqa: E731
    if not narrow and dot_out == "f16":
        dot_out = "f32"
    config = sfy.ScalifyConfig(narrow_contractions=narrow)
    with config:
        text = jax.jit(sfy.scalify(f)).lower(a, b).as_text()
    assert re.search(rf"dot_general.*->\s*tensor<8x4x{dot_out}>", text), text
    out_dtype = np.dtype(out or lhs)
    for fn in both(f):
        with config:
            got = fn(a, b)
        assert got.dtype == out_dtype and float(got.scale) == 2.0**2 * 8
        check(got, data64(a) @ data64(b) * 2.0**2, out_dtype if out_dtype.itemsize > 1 else np.float16)


@pytest.mark.parametrize("narrow", [True, False])
def test_float16_partial_sums_cannot_overflow(narrow):
    """Every product 2**20 and K = 4096: the sum, 2**32, and the static estimate's data,
    2**26, are far beyond float16; the measured headroom divides an operand by more than
    pow2(sqrt(K)) before the dot, the guard moves the excess into the scale, and the value
    is exact (and the guard off, as before, the static estimate overflows)."""
    a = scaled(np.full((2, 4096), 2.0**10), 2.0**-50)
    b = scaled(np.full((4096, 3), -(2.0**10)), 2.0**-50)
    with sfy.ScalifyConfig(narrow_contractions=narrow):
        out = jax.jit(sfy.scalify(jnp.matmul))(a, b)
    assert_finite(out)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(out, dtype=jnp.float32)), np.float32(-(2.0**-68)))
    with sfy.ScalifyConfig(range_guard=False, narrow_contractions=narrow):
        out = jax.jit(sfy.scalify(jnp.matmul))(a, b)
    assert not np.any(np.isfinite(np.asarray(out.data, np.float32)))


def test_weight_gradient_transpose_stays_on_the_contraction():
    # A float32 weight gradient reaches the jaxpr as transpose(dot_general): the division
    # by pow2(sqrt(K)) waits until after the transpose, so XLA can fold the transpose
    # into the contraction (no transposed copy, no pass over an operand).
    dtype = np.float32
    x, g, w = scaled(normal(32, 8), 2.0**-3, dtype), scaled(normal(32, 4), 2.0**5, dtype), scaled(normal(8, 4), 1.0, dtype)

    def step(w, x, g):
        gw = jax.vjp(lambda w: x @ w, w)[1](g)[0]  # dot_general then transpose
        return w - 0.5 * gw, gw

    want = oracle(step, w, x, g)
    for fn in both(step):
        new_w, gw = fn(w, x, g)
        assert_pow2_scales([new_w, gw])
        assert float(gw.scale) == 2.0**-3 * 2.0**5 * pow2_sqrt_down(32)
        check(gw, np.asarray(want[1], np.float64), dtype)
        check(new_w, np.asarray(want[0], np.float64), dtype)
    eqns = jax.make_jaxpr(sfy.scalify(step))(w, x, g).jaxpr.eqns
    made_by = {v: e.primitive.name for e in eqns for v in e.outvars}
    (tr,) = [e for e in eqns if e.primitive.name == "transpose"]
    assert made_by[tr.invars[0]] == "dot_general"
    (dot,) = [e for e in eqns if tr.invars[0] in e.outvars]
    assert not any(made_by.get(v) == "mul" for v in dot.invars)  # no operand divided either
    # ... and a contraction that is the function's result is divided before it leaves.
    out = jax.jit(sfy.scalify(lambda x, g: x.T @ g))(x, g)
    assert isinstance(out, sfy.ScaledArray) and float(out.scale) == float(gw.scale)
    check(out, data64(x).T @ data64(g) * float(x.scale) * float(g.scale), dtype)


def test_observers_see_scaled_arrays():
    seen = []

    def observer(eqn, invals, outs):
        seen.extend(type(v).__name__ for v in list(invals) + list(outs) if not isinstance(v, np.ndarray))

    x, g = scaled(normal(32, 8), 1.0, np.float32), scaled(normal(32, 4), 1.0, np.float32)
    with sfy.core.interpreter.observe(observer):
        jax.make_jaxpr(sfy.scalify(lambda x, g: (x.T @ g).T))(x, g)
    assert seen and set(seen) <= {"ScaledArray", "DynamicJaxprTracer"}, set(seen)


def test_scaled_dot_general_helper():
    a = scaled(normal(2, 3, 16), 2.0**7, E4M3)
    b = scaled(normal(2, 16, 5), 2.0**-1, E5M2)
    dn = (([2], [1]), ([0], [0]))  # lists are accepted as lax.dot_general accepts them

    def f(a, b):
        return scaled_dot_general(a, b, dn, preferred_element_type=jnp.bfloat16)

    for fn in (f, jax.jit(f)):
        out = fn(a, b)
        assert out.dtype == np.dtype(jnp.bfloat16) and float(out.scale) == 2.0**6 * 4
        check(out, np.einsum("bij,bjk->bik", data64(a), data64(b)) * 2.0**6, jnp.bfloat16)
    assert "f8E4M3FN" in jax.jit(f).lower(a, b).as_text()


def test_rounding_mode_up():
    a, b = scaled(normal(4, 8), 1.0), scaled(normal(8, 4), 1.0)
    with sfy.ScalifyConfig(rounding_mode=sfy.Pow2RoundMode.UP):
        out = jax.jit(sfy.scalify(jnp.matmul))(a, b)
    assert float(out.scale) == 4.0  # pow2 up of sqrt(8)
    check(out, data64(a) @ data64(b), np.float16)


# --- conv_general_dilated -------------------------------------------------------------

CONVS = {
    # name: (lhs shape, rhs shape, kwargs)
    "1d": ((2, 3, 16), (4, 3, 3), dict(window_strides=(1,), padding="SAME")),
    "1d_strided_dilated": ((2, 3, 17), (4, 3, 3), dict(window_strides=(2,), padding=((2, 1),), rhs_dilation=(2,))),
    "1d_lhs_dilation": ((1, 2, 8), (3, 2, 2), dict(window_strides=(1,), padding=((1, 1),), lhs_dilation=(2,))),
    "2d": ((2, 4, 8, 8), (6, 4, 3, 3), dict(window_strides=(1, 1), padding="SAME")),
    "2d_stride_pad": ((1, 2, 9, 7), (3, 2, 3, 2), dict(window_strides=(2, 1), padding=((1, 1), (0, 2)))),
    "2d_groups": ((2, 6, 6, 6), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME", feature_group_count=2)),
    "2d_depthwise": ((1, 4, 6, 6), (4, 1, 3, 3), dict(window_strides=(1, 1), padding="VALID", feature_group_count=4)),
    "2d_batch_groups": ((4, 3, 5, 5), (6, 3, 2, 2), dict(window_strides=(1, 1), padding="VALID", batch_group_count=2)),
}


def _conv(kwargs):
    return lambda x, k: lax.conv_general_dilated(x, k, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_values_and_scale(name, dtype):
    lshape, rshape, kwargs = CONVS[name]
    x, k = scaled(normal(*lshape), 2.0**-12, dtype), scaled(normal(*rshape), 2.0**4, dtype)
    f = _conv(kwargs)
    fan_in = int(np.prod(rshape[1:]))
    want = np.asarray(f(jnp.asarray(data64(x), np.float32), jnp.asarray(data64(k), np.float32)), np.float64) * 2.0**-8
    for fn in both(f):
        out = fn(x, k)
        assert out.dtype == np.dtype(dtype)
        assert float(out.scale) == 2.0**-8 * pow2_sqrt_down(fan_in)
        check(out, want, dtype)


def test_conv_nhwc_and_preferred_type():
    x, k = scaled(normal(2, 7, 7, 4), 2.0**50), scaled(normal(3, 3, 4, 5), 2.0**-55)
    kw = dict(
        window_strides=(1, 2),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )
    f = _conv(kw)
    assert conv_fan_in(k.shape, lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))) == 36
    want = np.asarray(f(jnp.asarray(data64(x), np.float32), jnp.asarray(data64(k), np.float32)), np.float64) * 2.0**-5
    for fn in both(f):
        out = fn(x, k)
        assert out.dtype == np.float32 and float(out.scale) == 2.0**-5 * 4
        check(out, want, np.float32)


def test_conv_float8_operands_stay_float8():
    x, k = scaled(normal(1, 4, 8, 8), 2.0**-20, E4M3), scaled(normal(8, 4, 3, 3), 2.0**20, E4M3)
    f = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", preferred_element_type=jnp.float32)  # noqa: E731
    text = jax.jit(sfy.scalify(f)).lower(x, k).as_text()
    assert re.search(r"convolution.*tensor<1x4x8x8xf8E4M3FN>.*tensor<8x4x3x3xf8E4M3FN>", text)
    out = jax.jit(sfy.scalify(f))(x, k)
    want = np.asarray(f(jnp.asarray(data64(x), np.float32), jnp.asarray(data64(k), np.float32)), np.float64)
    check(out, want, np.float32)


# --- property test --------------------------------------------------------------------


@st.composite
def dot_cases(draw):
    nb = draw(st.integers(0, 2))
    nc = draw(st.integers(1, 2))
    batch = draw(st.lists(st.integers(1, 3), min_size=nb, max_size=nb))
    contract = draw(st.lists(st.integers(1, 9), min_size=nc, max_size=nc))
    m, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16, E4M3, E5M2]))
    preferred = draw(st.sampled_from([None, np.float32]))
    ea, eb = draw(st.integers(-60, 60)), draw(st.integers(-60, 60))
    perm_a = draw(st.permutations(range(nb + nc + 1)))
    perm_b = draw(st.permutations(range(nb + nc + 1)))
    return batch, contract, m, n, dtype, preferred, ea, eb, perm_a, perm_b, draw(st.integers(0, 2**16))


@given(dot_cases())
def test_property_dot_general(case):
    batch, contract, m, n, dtype, preferred, ea, eb, perm_a, perm_b, seed = case
    rng = np.random.default_rng(seed)
    nb, nc = len(batch), len(contract)
    # canonical layouts: a = (batch, m, contract), b = (batch, contract, n), then permuted
    a0 = rng.standard_normal((*batch, m, *contract))
    b0 = rng.standard_normal((*batch, *contract, n))
    a_pos = np.argsort(perm_a)  # where each canonical axis went
    b_pos = np.argsort(perm_b)
    a = scaled(np.transpose(a0, perm_a), 2.0**ea, dtype)
    b = scaled(np.transpose(b0, perm_b), 2.0**eb, dtype)
    dn = (
        (tuple(int(a_pos[nb + 1 + i]) for i in range(nc)), tuple(int(b_pos[nb + i]) for i in range(nc))),
        (tuple(int(a_pos[i]) for i in range(nb)), tuple(int(b_pos[i]) for i in range(nb))),
    )
    out = sfy.scalify(lambda a, b: lax.dot_general(a, b, dn, preferred_element_type=preferred))(a, b)
    want = lax.dot_general(
        jnp.asarray(data64(a), np.float32), jnp.asarray(data64(b), np.float32), dn, precision=lax.Precision.HIGHEST
    )
    k = int(np.prod(contract))
    assert float(out.scale) == 2.0 ** (ea + eb) * pow2_sqrt_down(k)
    out_dtype = np.dtype(dtype if preferred is None else preferred)
    assert out.dtype == out_dtype and out.shape == want.shape
    assert_pow2_scales(out)
    check(out, np.asarray(want, np.float64) * 2.0 ** (ea + eb), out_dtype)


def test_explicit_sharding_out_sharding_is_forwarded():
    n = len(jax.devices())
    if n < 2:
        pytest.skip("needs several (simulated) devices")
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Explicit,))
    with jax.sharding.set_mesh(mesh):
        rep = NamedSharding(mesh, P())
        a = scaled(normal(2 * n, 8), 2.0**-3)
        a = sfy.ScaledArray(jax.device_put(a.data, NamedSharding(mesh, P("x", None))), jax.device_put(a.scale, rep))
        b = scaled(normal(8, 4), 2.0**3)
        b = sfy.ScaledArray(jax.device_put(b.data, rep), jax.device_put(b.scale, rep))
        dn = (((1,), (0,)), ((), ()))
        f = lambda a, b: lax.dot_general(a, b, dn, out_sharding=P(None, None))  # noqa: E731
        for fn in both(f):
            out = fn(a, b)
            assert out.data.sharding.spec == P(None, None)  # not the natural P("x", None)
            check(out, data64(a) @ data64(b), np.float16)
