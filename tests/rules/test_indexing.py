"""Indexing rules: gather/scatter, dynamic slices, sorts, cumulative ops, pooling and
their gradients. Plain float32 JAX on the unscaled values is the oracle."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import primitives as P

import scalify as sfy
from scalify.core import get_scaled_rule
from tests.utils import both, assert_close, assert_finite, assert_gathered_scale, assert_pow2_scales, oracle, rtol_of, scaled

DTYPES = [np.float32, np.float16]
RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 8)).astype(np.float32)
Y = RNG.standard_normal((3, 8)).astype(np.float32)
IDX = np.array([4, 0, 4], np.int32)  # a duplicate: scatter-add accumulates
S_X, S_Y = 2.0**-6, 2.0**3






def leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda z: isinstance(z, sfy.ScaledArray))


def check(f, *args, dtype=np.float32, atol=0.0, finite=True, out_atol=0.0, eager=True):
    """``scalify(f)`` (eager and jitted) equals ``f`` on float32 values; scales are
    powers of two; returns the eager output. ``out_atol`` is an absolute tolerance in
    units of each output's scale: values far below the scale underflow in the data
    (the price of one scale per tensor when aligning to the largest)."""
    want = oracle(f, *args)
    outs = [fn(*args) for fn in (both(f) if eager else both(f)[1:])]
    for out in outs:
        got, exp = leaves(out), jax.tree.leaves(want)
        assert len(got) == len(exp)
        for o, e in zip(got, exp):
            tol = atol
            if isinstance(o, sfy.ScaledArray):
                assert o.dtype == np.dtype(dtype)
                tol = max(atol, out_atol * float(o.scale))
            assert_close(o, e, dtype, atol=tol)
        assert_pow2_scales(out)
        if finite:
            assert_finite(out)
    return outs[0]


# --- gather ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_keeps_the_scale_and_moves_data_exactly(dtype):
    x = scaled(X, S_X, dtype)
    idx = jnp.asarray([5, 1, 1, 0])
    f = lambda x, i: x[i, 2:]  # noqa: E731
    out = check(f, x, idx, dtype=dtype)
    assert float(out.scale) == S_X
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data[idx, 2:]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_lookup(dtype):
    table = scaled(X, 2.0**-20, dtype)
    tokens = jnp.asarray([[0, 5, 2], [3, 3, 1]])
    check(lambda t, i: t[i], table, tokens, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_take_and_take_along_axis(dtype):
    table = scaled(X, 2.0**-20, dtype)
    tokens = jnp.asarray([[0, 5, 2], [3, 3, 1]])
    check(lambda t, i: jnp.take(t, i, axis=0), table, tokens, dtype=dtype)
    cols = jnp.asarray(RNG.integers(0, 8, (6, 3)))
    check(lambda t, i: jnp.take_along_axis(t, i, axis=1), table, cols, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [2.0**-12, 2.0**12])
@pytest.mark.parametrize("fill", [3.0, -1000.0, 0.0, -np.inf])
def test_gather_out_of_bounds_fill_value_is_a_value(dtype, scale, fill):
    x = scaled(X, scale, dtype)
    idx = jnp.asarray([1, 9, -20, 0])  # 9 and -20 are out of bounds along axis 1
    f = lambda x, i: jnp.take(x, i, axis=1, mode="fill", fill_value=fill)  # noqa: E731
    out = check(f, x, idx, dtype=dtype, finite=False, out_atol=2.0**-22)
    vals = np.asarray(sfy.asarray(out, jnp.float32))
    np.testing.assert_array_equal(vals[:, 1], np.full(6, fill, np.float32))
    if np.isfinite(fill) and fill != 0:
        assert float(out.scale) == max(scale, 2.0 ** np.floor(np.log2(abs(fill))))
    else:
        assert float(out.scale) == scale


@pytest.mark.parametrize("scale, fill, want_scale", [(4.0, 3.0, 4.0), (4.0, 1.5 * 2**20, 2.0**20), (2.0**-20, 1.5 * 2**20, 2.0**20)])
def test_gather_fill_with_a_static_scale(scale, fill, want_scale):
    # A scale known at trace time: the fill is put in the data when it fits.
    data = jnp.asarray(X, jnp.float16)
    idx = jnp.asarray([[1], [9]])
    eqn = jax.make_jaxpr(lambda x, i: jnp.take(x, i[:, 0], axis=1, mode="fill", fill_value=fill))(data, idx)
    inner = [e for e in eqn.jaxpr.eqns if e.primitive is P.jit_p][0].params["jaxpr"]
    params = [e for e in inner.eqns if e.primitive is lax.gather_p][0].params
    rule = get_scaled_rule(lax.gather_p)
    out = rule(sfy.ScaledArray(data, np.float32(scale)), idx, **params)
    assert float(out.scale) == want_scale
    want = lax.gather_p.bind(data.astype(jnp.float32) * scale, idx, **params)
    assert_close(out, want, np.float16, atol=2.0**-22 * want_scale)
    assert float(out.to_array(jnp.float32)[0, 1]) == np.float32(fill)
    # the fill fits the operand's scale: one gather, no mask
    traced = jax.make_jaxpr(lambda d: rule(sfy.ScaledArray(d, np.float32(scale)), idx, **params).data)(data)
    n_gathers = sum(e.primitive is lax.gather_p for e in traced.jaxpr.eqns)
    assert n_gathers == (1 if want_scale == scale else 2)


def test_gather_default_fill_is_nan():
    x = scaled(X, 2.0**-30, np.float16)
    out = check(lambda x: jnp.take_along_axis(x, jnp.full((6, 1), 50), axis=1, mode="fill"), x, dtype=np.float16, finite=False)
    assert np.all(np.isnan(np.asarray(sfy.asarray(out, jnp.float32))))


# --- scatter ---------------------------------------------------------------------------

SCATTERS = {
    "set": lambda x, i, u: x.at[i].set(u),
    "add": lambda x, i, u: x.at[i].add(u),
    "subtract": lambda x, i, u: x.at[i].subtract(u),
    "min": lambda x, i, u: x.at[i].min(u),
    "max": lambda x, i, u: x.at[i].max(u),
    "mul": lambda x, i, u: x.at[i].mul(u),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SCATTERS))
@pytest.mark.parametrize("s_u", [2.0**-5, 2.0**7])
def test_scatter_family(name, dtype, s_u):
    f = SCATTERS[name]
    x, u = scaled(X, S_X, dtype), scaled(Y, s_u, dtype)
    idx = IDX if name in ("add", "subtract", "min", "max", "mul") else np.array([4, 0, 2], np.int32)
    out = check(f, x, jnp.asarray(idx), u, dtype=dtype, out_atol=2.0**-22)
    if name == "mul":  # the largest of the untouched and updated magnitudes
        assert float(out.scale) == S_X * max(1.0, s_u)
    elif name in ("add", "subtract"):  # aligned to the largest scale, range-guarded
        assert float(out.scale) == max(S_X, s_u)
    else:  # each element an operand or an update element
        assert_gathered_scale(out, dtype, S_X, s_u)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_into_zeros_adopts_the_updates_scale(dtype):
    u = scaled(Y, 2.0**-40, dtype)
    for f in (lambda u: jnp.zeros((6, 8), u.dtype).at[IDX].add(u), lambda u: jnp.zeros((6, 8), u.dtype).at[IDX].set(u)):
        out = check(f, u, dtype=dtype)
        assert float(out.scale) == 2.0**-40


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_mul_by_plain_constant_keeps_the_scale(dtype):
    x = scaled(X, 2.0**20, dtype)
    out = check(lambda x: x.at[1:3].mul(0.5), x, dtype=dtype)
    assert float(out.scale) == 2.0**20


def test_scatter_add_accumulates_in_float32():
    # 2048 duplicates of 1 + 2**-11: float16 accumulation would stall at 2048.
    n = 2048
    u = scaled(np.full((n,), 1 + 2.0**-10, np.float32), 1.0, np.float16)
    f = lambda u: jnp.zeros((2,), u.dtype).at[jnp.zeros((n,), jnp.int32)].add(u)  # noqa: E731
    out = sfy.scalify(f)(u)
    assert_close(out, oracle(f, u), np.float16)


def test_scatter_add_and_mul_of_duplicates_are_range_guarded():
    """Duplicated indices sum (or multiply) beyond the static scale's reach: 4096 updates
    of 100 add to 409600, beyond float16's 65504, and 9 factors of 4 multiply to 2**18;
    the results stay finite and exact."""
    n = 4096
    u = scaled(np.full((n, 3), 100.0), 1.0, np.float16)
    add = lambda u: jnp.zeros((2, 3), u.dtype).at[jnp.zeros((n,), jnp.int32)].add(u)  # noqa: E731
    x = scaled(np.ones((2, 3)), 1.0, np.float16)
    v = scaled(np.full((9, 3), 4.0), 1.0, np.float16)
    mul = lambda x, v: x.at[jnp.zeros((9,), jnp.int32)].mul(v)  # noqa: E731
    for f, args in ((add, (u,)), (mul, (x, v))):
        for out in [fn(*args) for fn in both(f)]:
            assert_finite(out)
            assert_pow2_scales([out])
            assert_close(out, oracle(f, *args), np.float16)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_scatter_add_shared_by_devices_sums_groups_in_16_bits(dtype):
    """With `narrow_contractions` (by default: several devices) a scatter-add of 16-bit
    data is done in float32 per group of updates, and the groups' totals are summed by a
    contraction with a 16-bit output: an embedding gradient over a sharded batch then
    crosses devices in 16 bits. Every addition inside a group stays float32: 2048
    duplicates of ``1 + 2**-10`` (a float16 accumulation stalls at 2048) and 4096
    updates of 2**12 (whose sum passes float16's range) are both right."""
    if jax.device_count() < 2:
        pytest.skip("needs several (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    n = 4096
    cases = [np.full((n, 3), 1 + 2.0**-10), np.full((n, 3), 2.0**12), RNG.standard_normal((n, 3)) * 4 + 1]
    f = lambda u: jnp.zeros((2, 3), u.dtype).at[jnp.zeros((n,), jnp.int32)].add(u)  # noqa: E731
    narrow_dt = "f16" if np.dtype(dtype) == np.float16 else "bf16"
    for values in cases:
        u = scaled(values, 2.0**-20, dtype)
        with sfy.ScalifyConfig(narrow_contractions=True):
            text = jax.jit(sfy.scalify(f)).lower(u).as_text()
            out = jax.jit(sfy.scalify(f))(u)
        assert re.search(rf"dot_general.*->\s*tensor<2x3x{narrow_dt}>", text), text
        assert_finite(out)
        want = np.sum(np.asarray(u.data, np.float64), 0) * 2.0**-20
        got = np.asarray(out.data, np.float64) * float(out.scale)
        np.testing.assert_allclose(got[0], want, rtol=2 * rtol_of(dtype))
        np.testing.assert_array_equal(got[1], 0.0)


def test_scatter_apply_is_refused_clearly():
    x = scaled(X, 1.0, np.float16)
    with pytest.raises(sfy.UnsupportedPrimitiveError, match="apply"):
        sfy.scalify(lambda x: x.at[0].apply(jnp.sin))(x)


# --- dynamic slices --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_slice_and_update_slice(dtype):
    x, u = scaled(X, S_X, dtype), scaled(Y[:2, :3], S_Y, dtype)
    i = jnp.asarray(2)
    out = check(lambda x, i: lax.dynamic_slice(x, (i, 1), (3, 4)), x, i, dtype=dtype)
    assert float(out.scale) == S_X
    out = check(lambda x, i: lax.dynamic_slice_in_dim(x, i, 2, axis=1), x, i, dtype=dtype)
    out = check(lambda x, u, i: lax.dynamic_update_slice(x, u, (i, i)), x, u, i, dtype=dtype)
    assert_gathered_scale(out, dtype, S_X, S_Y)
    out = check(lambda u, i: lax.dynamic_update_slice(jnp.zeros((6, 8), u.dtype), u, (i, 0)), u, i, dtype=dtype)
    assert float(out.scale) == S_Y


# --- sorting ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_top_k_and_argsort(dtype):
    x = scaled(X, 2.0**-9, dtype)
    out = check(lambda x: lax.sort(x, dimension=1), x, dtype=dtype)
    assert float(out.scale) == 2.0**-9
    check(lambda x: lax.sort(x, dimension=0, is_stable=True), x, dtype=dtype)
    vals, idx = check(lambda x: lax.top_k(x, 3), x, dtype=dtype)
    assert not isinstance(idx, sfy.ScaledArray) and idx.dtype == np.int32
    check(lambda x: lax.approx_max_k(x, 2)[0], x, dtype=dtype)
    check(lambda x: lax.sort_key_val(x, lax.broadcasted_iota(jnp.int32, x.shape, 1))[1], x)  # argsort


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_operand_sort_with_two_scaled_keys(dtype):
    # Two keys of very different scales, ties in the first: lexicographic order must
    # compare each key with itself only.
    k1 = scaled(np.round(X * 2) / 2, 2.0**30, dtype)
    k2 = scaled(Y.repeat(2, 0), 2.0**-30, dtype)
    payload = scaled(X[::-1], 1.0, dtype)
    ints = jnp.asarray(RNG.integers(0, 9, X.shape), jnp.int32)
    f = lambda a, b, p, n: lax.sort((a, b, p, n), dimension=1, num_keys=2)  # noqa: E731
    outs = check(f, k1, k2, payload, ints, dtype=dtype)
    assert [float(o.scale) for o in outs[:3]] == [2.0**30, 2.0**-30, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_jnp_sort_argsort(dtype):
    x = scaled(X, 2.0**-9, dtype)
    check(jnp.sort, x, dtype=dtype)
    check(lambda x: jnp.argsort(x, axis=0), x)


# --- cumulative ops --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_moves_sqrt_n_into_the_scale(dtype, reverse):
    x = scaled(X, S_X, dtype)
    out = check(lambda x: lax.cumsum(x, axis=1, reverse=reverse), x, dtype=dtype, atol=1e-5 * S_X)
    assert float(out.scale) == S_X * 2.0  # pow2_round_down(sqrt(8)) = 2
    # same-sign terms: grows like N, held without overflow
    ones = scaled(np.ones((4096,), np.float32), 2.0**10, np.float16)
    out = check(lambda x: lax.cumsum(x, axis=0), ones, dtype=np.float16)
    assert float(out.scale) == 2.0**16 and float(jnp.max(out.data)) == 64.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_cummax_cummin(dtype):
    x = scaled(X, S_Y, dtype)
    for f in (lambda x: lax.cummax(x, axis=1), lambda x: lax.cummin(x, axis=0, reverse=True)):
        out = check(f, x, dtype=dtype)
        assert float(out.scale) == S_Y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, reverse", [(1.0, False), (2.0**-3, True), (2.0**5, False), (2.0**5, True)])
def test_cumprod(dtype, scale, reverse):
    vals = (1 + 0.25 * X[:, :4]).astype(np.float32)
    x = scaled(vals, scale, dtype)
    out = check(lambda x: lax.cumprod(x, axis=1, reverse=reverse), x, dtype=dtype, atol=1e-3 * scale)
    assert float(out.scale) == (scale**4 if scale >= 1 else scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [2.0**-40, 1.0, 2.0**6])
def test_cumlogsumexp(dtype, scale):
    x = scaled(X, scale, dtype)
    out = check(lambda x: lax.cumlogsumexp(x, axis=1), x, dtype=dtype, atol=1e-6 * max(1.0, scale))
    assert float(out.scale) == max(1.0, scale)


# --- windowed reductions ---------------------------------------------------------------

WINDOW = dict(window_dimensions=(2, 3), window_strides=(1, 2), padding=((0, 1), (1, 1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling(dtype):
    x = scaled(X, 2.0**-30, dtype)
    out = check(lambda x: lax.reduce_window(x, -jnp.inf, lax.max, **WINDOW), x, dtype=dtype)
    assert float(out.scale) == 2.0**-30
    check(lambda x: lax.reduce_window(x, jnp.inf, lax.min, **WINDOW), x, dtype=dtype)
    out = check(lambda x: lax.reduce_window(x, 0.0, lax.add, **WINDOW), x, dtype=dtype, atol=1e-5 * 2.0**-30)
    assert float(out.scale) == 2.0**-30 * 2.0  # pow2(sqrt(6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_reduce_window(dtype):
    x = scaled(X, 2.0**-20, dtype)
    one = lambda x: np.array(1, x.dtype)  # noqa: E731  (static inits, in x's dtype)
    zero = lambda x: np.array(0, x.dtype)  # noqa: E731
    # a product reducer: runs on unscaled float32 values
    y = scaled(1 + 0.1 * X, 1.0, dtype)
    check(lambda x: lax.reduce_window(x, one(x), lax.mul, **WINDOW), y, dtype=dtype)
    # max with a non-identity init (ReLU + max-pool): the generic primitive
    out = check(lambda x: lax.reduce_window(x, zero(x), lax.max, (2, 2), (2, 2), "VALID"), x, dtype=dtype)
    assert float(out.scale) == 2.0**-20
    # an init of 1 joins the window: the scale must hold 1 with the format's headroom
    # (2^-7 for float16, 2^-63 for float32: then the operand's 2^-20 is enough)
    out = check(lambda x: lax.reduce_window(x, one(x), lax.max, (2, 2), (2, 2), "VALID"), x, dtype=dtype)
    assert float(out.scale) == max(2.0**-20, 2.0 ** -(int(np.log2(float(jnp.finfo(dtype).max))) // 2))

    # two operands: an argmax-pooling reducer (value, index)
    def argmax_pool(x):
        idx = lax.broadcasted_iota(jnp.int32, x.shape, 1)

        def red(a, b):
            take_a = a[0] >= b[0]
            return lax.select(take_a, a[0], b[0]), lax.select(take_a, a[1], b[1])

        return lax.reduce_window((x, idx), (jnp.asarray(-jnp.inf, x.dtype), jnp.int32(0)), red, (1, 4), (1, 4), "VALID")

    vals, idx = check(argmax_pool, x, dtype=dtype)
    assert float(vals.scale) == 2.0**-20 and idx.dtype == np.int32


def test_select_and_gather_add_max_pool_jvp():
    x, t = scaled(X, 2.0**40, np.float16), scaled(Y.repeat(2, 0), 2.0**-40, np.float16)
    pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "VALID")  # noqa: E731
    out, tan = check(lambda x, t: jax.jvp(pool, (x,), (t,)), x, t, dtype=np.float16)
    assert float(tan.scale) == 2.0**-40


# --- one_hot and dropout ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot(dtype):
    x = scaled(Y[:2, :5], 2.0**-25, dtype)
    labels = jnp.asarray([3, 1])
    check(lambda x, i: jax.nn.one_hot(i, 5, dtype=x.dtype) * x, x, labels, dtype=dtype)
    # float "labels" held scaled: cast to int for one_hot, or compared with `eq` as
    # one_hot itself does (jax.nn.one_hot deprecates float inputs)
    lab = scaled(np.array([3.0, 1.0, 4.0], np.float32) / 4, 4.0, dtype)
    for f in (lambda l: jax.nn.one_hot(l.astype(jnp.int32), 5), lambda l: (l[:, None] == jnp.arange(5.0)).astype(jnp.float32)):
        for fn in both(f):
            out = fn(lab)
            np.testing.assert_array_equal(np.asarray(sfy.asarray(out)), np.eye(5)[[3, 1, 4]])


@pytest.mark.parametrize("dtype", [np.float16])
def test_dropout(dtype):
    key = jax.random.key(0)
    x = scaled(X, 2.0**-50, dtype)

    def dropout(x, key):
        keep = jax.random.bernoulli(key, 0.75, x.shape)
        return jnp.where(keep, x / 0.75, 0)

    out = check(dropout, x, key, dtype=dtype, atol=0.0)
    assert 0 < int(jnp.sum(out.data == 0)) < X.size


# --- range promise ---------------------------------------------------------------------

RANGE_OPS = {
    "gather": lambda x: x[jnp.asarray([3, 0, 3])],
    "dynamic_slice": lambda x: lax.dynamic_slice(x, (1, 2), (3, 3)),
    "dynamic_update_slice": lambda x: lax.dynamic_update_slice(x, x[:2, :2], (3, 5)),
    "scatter_add": lambda x: x.at[jnp.asarray(IDX)].add(x[:3]),
    "scatter_max": lambda x: x.at[jnp.asarray(IDX)].max(x[:3]),
    "scatter_mul": lambda x: x.at[jnp.asarray([4, 0, 2])].mul(x[:3]),  # 2**120 at most
    "take_fill": lambda x: jnp.take(x, jnp.asarray([1, 30]), axis=1, mode="fill", fill_value=3.0),
    "sort": lambda x: lax.sort(x, dimension=1),
    "top_k": lambda x: lax.top_k(x, 2)[0],
    "cumsum": lambda x: lax.cumsum(x, axis=1),
    "cummax": lambda x: lax.cummax(x, axis=0),
    "cumprod_1": lambda x: lax.cumprod(x[:, :1], axis=1),
    "cumlogsumexp": lambda x: lax.cumlogsumexp(x, axis=1),
    "max_pool": lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (2, 2), "VALID"),
    "sum_pool": lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 2), (2, 2), "VALID"),
}


@pytest.mark.parametrize("name", sorted(RANGE_OPS))
@pytest.mark.parametrize("scale", [2.0**-60, 2.0**60])
def test_range_in_float16(name, scale):
    x = scaled(X, scale, np.float16)
    check(RANGE_OPS[name], x, dtype=np.float16, atol=1e-5 * scale, out_atol=2.0**-22, eager=False)


# --- gradients inside scalify ----------------------------------------------------------

def check_grad(loss, *args, dtype=np.float16, argnums=0, atol_of_max=0.0):
    """``scalify(grad(loss))`` equals ``grad(loss)`` on float32 values (``atol_of_max``:
    an absolute tolerance as a fraction of each gradient's largest magnitude)."""
    g = jax.grad(loss, argnums=argnums)
    want = g(*sfy.asarray(args, dtype=jnp.float32))
    for fn in (jax.jit(sfy.scalify(g)),):  # eager op-by-op grads are slow on CPU
        out = fn(*args)
        assert_pow2_scales(out)
        assert_finite(out)
        for o, e in zip(leaves(out), jax.tree.leaves(want)):
            scale = float(o.scale) if isinstance(o, sfy.ScaledArray) else 1.0
            atol = max(1e-4 * scale, atol_of_max * float(np.max(np.abs(e), initial=0.0)))
            assert_close(o, e, dtype, atol=atol)


@pytest.mark.parametrize("dtype", [np.float16])
@pytest.mark.parametrize("seed", range(4))
def test_grad_embedding_gather(dtype, seed):
    """The table's gradient is a scatter-add of the cotangents; with several devices
    (`ScalifyConfig.narrow_contractions`, on in this suite) it sums per group of the
    batch in float32 and rounds each group's total to float16 once
    (`indexing._grouped_scatter`), so an element where the groups' totals cancel keeps
    their rounding: up to 2**-11 of the largest gradient each, hence the absolute
    tolerance of 2**-10 of the largest."""
    rng = np.random.default_rng(seed)
    table = scaled(X, 2.0**-30, dtype)
    w = scaled(rng.standard_normal((2, 3, 8)), 2.0**-10, dtype)
    tokens = jnp.asarray([[0, 5, 0], [3, 0, 1]])
    check_grad(lambda t, w: jnp.sum(t[tokens] * w), table, w, dtype=dtype, argnums=(0, 1),
               atol_of_max=2.0**-10)


@pytest.mark.parametrize("dtype", [np.float16])
def test_grad_dynamic_slice_and_scatter_add(dtype):
    x = scaled(X, 2.0**20, dtype)
    w = scaled(Y[:, :4], 2.0**-3, dtype)
    i = jnp.asarray(2)
    check_grad(lambda x, w: jnp.sum(lax.dynamic_slice(x, (i, 3), (3, 4)) * w), x, w, dtype=dtype, argnums=(0, 1))
    u = scaled(Y, 2.0**-20, dtype)
    check_grad(lambda x, u: jnp.sum(x.at[IDX].add(u) * x), x, u, dtype=dtype, argnums=(0, 1))


@pytest.mark.parametrize("dtype", [np.float16])
def test_grad_max_and_avg_pooling(dtype):
    import flax.linen as nn

    x = scaled(RNG.standard_normal((1, 6, 8, 2)), 2.0**-40, dtype)
    w = scaled(RNG.standard_normal((1, 3, 4, 2)), 2.0**5, dtype)
    check_grad(lambda x, w: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * w), x, w, dtype=dtype, argnums=(0, 1))
    check_grad(lambda x, w: jnp.sum(nn.avg_pool(x, (2, 2), strides=(2, 2)) * w), x, w, dtype=dtype, argnums=(0, 1))
    # overlapping windows: several cotangents land on one element
    w2 = scaled(RNG.standard_normal((1, 5, 7, 2)), 1.0, dtype)
    pool = functools.partial(lax.reduce_window, init_value=-jnp.inf, computation=lax.max,
                             window_dimensions=(1, 2, 2, 1), window_strides=(1, 1, 1, 1), padding="VALID")
    check_grad(lambda x, w: jnp.sum(pool(x) * w), x, w2, dtype=dtype, argnums=(0, 1))


@pytest.mark.parametrize("dtype", [np.float16])
def test_grad_cumsum_and_sort(dtype):
    x = scaled(X, 2.0**-25, dtype)
    w = scaled(Y.repeat(2, 0), 2.0**4, dtype)
    check_grad(lambda x, w: jnp.sum(jnp.cumsum(x, axis=1) * w), x, w, dtype=dtype, argnums=(0, 1))
    check_grad(lambda x, w: jnp.sum(jnp.sort(x, axis=1) * w), x, w, dtype=dtype, argnums=(0, 1))


# --- the rules are registered for the whole family ----------------------------------------


def test_every_indexing_primitive_has_a_rule():
    prims = [
        lax.gather_p, lax.scatter_p, lax.scatter_add_p, lax.scatter_sub_p, lax.scatter_mul_p,
        lax.scatter_min_p, lax.scatter_max_p, lax.dynamic_slice_p, lax.dynamic_update_slice_p,
        lax.sort_p, lax.top_k_p, lax.approx_top_k_p, lax.cumsum_p, lax.cumprod_p, lax.cummax_p,
        lax.cummin_p, lax.cumlogsumexp_p, lax.reduce_window_sum_p, lax.reduce_window_max_p,
        lax.reduce_window_min_p, lax.reduce_window_p, lax.select_and_scatter_add_p,
        lax.select_and_gather_add_p,
    ]
    missing = [p.name for p in prims if get_scaled_rule(p) is None]
    assert not missing
    for p in prims:
        assert get_scaled_rule(p).__doc__, p.name

