"""Control flow and calls under scalify: scan, while/fori loops, cond/switch, remat,
closed_call and nested jit, against plain float32 JAX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import linear_util as lu
from jax.extend.core import primitives as P

import scalify as sfy
from tests.utils import assert_close, assert_pow2_scales, oracle, rtol_of, scaled

DTYPES = [np.float32, np.float16]
RNG = np.random.default_rng(0)
X = RNG.uniform(-1.0, 1.0, (3, 4)).astype(np.float32)
XS = RNG.uniform(-1.0, 1.0, (5, 3, 4)).astype(np.float32)


def _both(fn, *args, dtype=np.float32, eager=False, atol_frac=None):
    """``jit(scalify(fn))`` (and ``scalify(fn)`` eagerly with ``eager=True``) against
    the float32 oracle
    (``atol_frac``: absolute tolerance as a fraction of each output's largest value;
    by default two ulps of ``dtype``, as rounding errors of several ops compound)."""
    want = oracle(fn, *args)
    atol_frac = 2 * rtol_of(dtype) if atol_frac is None else atol_frac

    def check(o, w):
        atol = atol_frac * float(np.max(np.abs(np.asarray(w, np.float64)), initial=0.0))
        assert_close(o, w, dtype, atol=atol)

    for f in (jax.jit(sfy.scalify(fn)),) + ((sfy.scalify(fn),) if eager else ()):
        out = f(*args)
        assert_pow2_scales(out)
        jax.tree.map(check, out, want, is_leaf=lambda t: isinstance(t, sfy.ScaledArray))
    return out


# --- scan ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse,unroll", [(False, 1), (True, 2)])
def test_scan_carry_xs_ys(dtype, reverse, unroll):
    def f(c, xs, w):
        def body(c, x):
            c = c * 0.5 + x * w
            return c, jnp.sin(c) - x
        return lax.scan(body, c, xs, reverse=reverse, unroll=unroll)

    c = scaled(X / 4, 2.0**-12, dtype)
    xs = scaled(XS, 2.0**-12, dtype)
    w = scaled(X, 4.0, dtype)
    carry, ys = _both(f, c, xs, w, dtype=dtype, eager=unroll == 1)
    assert isinstance(carry, sfy.ScaledArray) and isinstance(ys, sfy.ScaledArray)
    assert carry.dtype == dtype and ys.shape == XS.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_length_without_xs_and_plain_ys(dtype):
    def f(c):
        def body(carry, _):
            i, c = carry
            return (i + 1, c * 2.0), i
        return lax.scan(body, (0, c), None, length=6)

    c = scaled(X, 2.0**-40, dtype)
    (i, out), ys = _both(f, c, dtype=dtype, eager=True)
    assert int(i) == 6 and list(ys) == list(range(6))
    np.testing.assert_array_equal(out.data, c.data)  # only the scale moved
    assert float(out.scale) == 2.0**-34


def test_scan_promotes_a_plain_carry_that_becomes_scaled():
    # acc starts as plain zeros and becomes scaled in the body: promoted at entry.
    def f(xs):
        def body(acc, x):
            return acc + x, acc
        return lax.scan(body, jnp.zeros(xs.shape[1:], xs.dtype), xs)

    xs = scaled(XS, 2.0**-50, np.float16)
    acc, ys = _both(f, xs, dtype=np.float16)
    assert isinstance(acc, sfy.ScaledArray) and isinstance(ys, sfy.ScaledArray)
    assert float(acc.scale) < 2.0**-40  # tiny values kept in the scale, not underflowed


def test_scan_body_returning_a_plain_value_for_a_scaled_carry():
    def f(c):
        def body(c, _):
            return jnp.ones_like(c), c  # constant carry out, scaled carry in
        return lax.scan(body, c, None, length=3)

    c = scaled(X, 2.0**20, np.float16)
    carry, ys = _both(f, c, dtype=np.float16)
    assert isinstance(carry, sfy.ScaledArray)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(carry)), np.ones_like(X))


def test_scan_ys_with_per_step_scales_are_aligned():
    def f(c):
        return lax.scan(lambda c, _: (c * 2.0, c), c, None, length=4)

    c = scaled(X, 2.0**-30, np.float16)
    carry, ys = _both(f, c, dtype=np.float16)
    assert float(ys.scale) == 2.0**-27  # the largest per-step scale


def _spread_steps(c):
    """Stacked ys whose per-step scales span 2**-90: aligned to the largest, the small
    steps' float16 data would flush to zero. (Three factors of 2**-10: a float16 program
    rounds the literal 2**-30 itself to 0.)"""
    return lax.scan(lambda c, _: (c * 2.0**-10 * 2.0**-10 * 2.0**-10, c), c, None, length=4)[1]


def test_scan_reads_per_step_scaled_ys_step_by_step():
    # The second scan (as the backward scan reads the forward scan's residuals) takes
    # each step at its own scale: exact, where aligning first would give zeros.
    def f(c):
        ys = _spread_steps(c)
        k = jnp.asarray([1.0, 2.0**30, 2.0**60, 2.0**90], jnp.float32)
        return lax.scan(lambda acc, yk: (acc + yk[0] * yk[1], yk[0] * yk[1]), jnp.zeros(c.shape, jnp.float32), (ys, k))

    c = scaled(X, 1.0, np.float16)
    acc, back = _both(f, c, dtype=np.float16)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(back)), np.broadcast_to(np.asarray(c.data, np.float32), (4, 3, 4)))
    # ... and the first scan's ys are never aligned: the one max over per-step scales
    # is the second scan's, whose ys are a scalify output.
    jaxpr = jax.make_jaxpr(sfy.scalify(f))(c)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("reduce_max") == 1


def test_scan_per_step_scaled_ys_are_aligned_for_other_consumers():
    def f(c):
        ys = _spread_steps(c)
        init = ys[0]  # an indexing rule: aligned first
        carry, _ = lax.scan(lambda a, y: (a + y, None), init, ys)  # as init and as xs
        return carry, ys, jnp.sum(ys, axis=(1, 2))

    c = scaled(X, 1.0, np.float16)
    carry, ys, sums = _both(f, c, dtype=np.float16)
    assert float(ys.scale) == 1.0  # the largest per-step scale
    out = jax.jit(sfy.scalify(lambda c: lax.scan(lambda c, _: (c * 2.0, c), c, None, length=3)[1]))(c)
    assert isinstance(out, sfy.ScaledArray) and float(out.scale) == 4.0  # a scalify output


def test_scan_per_step_scaled_ys_all_zero_are_the_zero_tensor():
    """Every step zero (scale 0): the stacked ys are zeros at scale 0, not 0 / 0 = NaN
    data. Here the gradient of an RNN whose tanh saturates (its derivative is exactly 0
    at every step), against float32."""
    w = RNG.standard_normal((4, 4)).astype(np.float32)

    def f(xs, w):
        ys = lax.scan(lambda c, x: (jnp.tanh(c @ w + x),) * 2, jnp.ones((4,), xs.dtype), xs)[1]
        return jnp.sum(ys * jnp.arange(4.0, dtype=xs.dtype))

    xs, ws = scaled(XS[:, 0], 2.0**-16, np.float16), scaled(w, 2.0**36, np.float16)
    got = jax.jit(sfy.scalify(jax.grad(f)))(xs, ws)
    assert np.isfinite(np.asarray(got.data, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(sfy.asarray(got, jnp.float32)), oracle(jax.grad(f), xs, ws))


def test_scan_per_step_scaled_ys_transposed_keep_one_scale():
    # Materialised inside the transpose rule, the aligned ys keep their scale: adding
    # them to the untransposed ys aligns nothing.
    def f(c):
        ys = lax.scan(lambda c, _: (c * 2.0, c), c, None, length=4)[1]
        return jnp.transpose(ys, (0, 2, 1)) + ys

    c = scaled(X[:3, :3], 2.0**-3, np.float16)
    _both(f, c, dtype=np.float16)
    names = [e.primitive.name for e in jax.make_jaxpr(sfy.scalify(f))(c).jaxpr.eqns]
    assert "max" not in names and names.count("rem") == 0, names


def test_scan_static_scale_at_entry_becomes_a_traced_carry():
    c = sfy.ScaledArray(jnp.asarray(X, jnp.float16), np.float32(2.0**-8))  # NumPy scale

    def f(c):
        return lax.scan(lambda c, _: (c * 0.5, None), c, None, length=3)[0]

    out = _both(f, c, dtype=np.float16)
    assert float(out.scale) == 2.0**-11


def test_scan_consts_keep_static_scales():
    def f(c, w):
        return lax.scan(lambda c, _: (c + w, None), c, None, length=3)[0]

    _both(f, scaled(X, 1.0, np.float16), scaled(X, 2.0**-4, np.float16), dtype=np.float16)


# --- loops: scales drifting over many iterations -------------------------------------


def _fori_fixed(body):
    return lambda x, n: lax.fori_loop(0, 200, body, x)


def _fori_dynamic(body):
    return lambda x, n: lax.fori_loop(0, n, body, x)


def _while(body):
    def f(x, n):
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (0, x))[1]
    return f


@pytest.mark.parametrize("loop", [_fori_fixed, _fori_dynamic, _while])
@pytest.mark.parametrize("factor,start", [(2.0, 2.0**-100), (0.5, 2.0**100)])
def test_loop_scale_drift_is_exact_in_float16(loop, factor, start):
    # 200 doublings/halvings: far outside float16's range, exact in the scale.
    f = loop(lambda i, c: c * factor)
    x, n = scaled(X, start, np.float16), jnp.int32(200)
    out = jax.jit(sfy.scalify(f))(x, n)
    want = oracle(f, x, n)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(out, jnp.float32)), np.asarray(want))
    np.testing.assert_array_equal(out.data, x.data)  # the data never moved
    plain = f(sfy.asarray(x), n)  # plain float16 underflows or overflows at entry
    assert not np.allclose(np.asarray(plain, np.float32), np.asarray(want))


def test_loop_1000_iterations_up_and_down():
    # x doubles for 100 steps, halves for 100 steps, ... (a cond inside the loop):
    # peaks at 2**100 times its start, back to the start after 1000 steps.
    def body(i, c):
        return lax.cond((i // 100) % 2 == 0, lambda a: a * 2.0, lambda a: a * 0.5, c)

    def f(x):
        peak = lax.fori_loop(0, 100, body, x)
        return peak, lax.fori_loop(0, 1000, body, x)

    x = scaled(X, 2.0**-10, np.float16)
    peak, end = jax.jit(sfy.scalify(f))(x)
    want_peak, want_end = oracle(f, x)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(peak, jnp.float32)), want_peak)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(end, jnp.float32)), want_end)
    assert float(peak.scale) == 2.0**90 and float(end.scale) == 2.0**-10
    plain_peak, _ = f(jnp.asarray(X, np.float16) * np.float16(2.0**-10))
    assert not np.all(np.isfinite(np.asarray(plain_peak)))  # plain float16 overflows


@pytest.mark.parametrize("dtype", DTYPES)
def test_while_loop_with_scaled_predicate(dtype):
    def f(x):
        return lax.while_loop(lambda c: jnp.max(c) < 3e4, lambda c: c * 2.0 + 1.0, x)

    x = scaled(np.abs(X) + 0.5, 1.0, dtype)
    _both(f, x, dtype=dtype)


def test_while_loop_batched_predicate_from_vmap():
    # scalify(vmap(f)): the jaxpr's while has one predicate per example; finished
    # examples keep their value while the others go on (one shared scale).
    def g(x):
        return lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: c * 2.0, x)

    x = scaled(np.abs(X) + 0.1, 2.0**-3, np.float16)
    out = _both(jax.vmap(g), x, dtype=np.float16)
    assert float(out.scale) > 2.0**-3
    # vmap(scalify(f)): the loop is batched by JAX, each example ends with its own scale.
    axes = jax.tree.unflatten(jax.tree.structure(x), [0, None])
    out = jax.jit(jax.vmap(sfy.scalify(g), in_axes=(axes,)))(x)
    want = jax.vmap(g)(sfy.asarray(x, jnp.float32))
    assert out.scale.shape == (3,)
    got = np.asarray(out.data, np.float32) * np.asarray(out.scale)[:, None]
    np.testing.assert_allclose(got, want, rtol=4e-3)


def test_while_loop_plain_carry_promoted():
    def f(x):
        def body(c):
            i, acc = c
            return i + 1, acc + x
        return lax.while_loop(lambda c: c[0] < 4, body, (0, jnp.zeros_like(X)))[1]

    x = scaled(X, 2.0**-40, np.float16)
    out = _both(f, x, dtype=np.float16)
    assert isinstance(out, sfy.ScaledArray)


# --- cond / switch -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond(dtype, sign):
    def f(x, y):
        return lax.cond(jnp.sum(x) > 0, lambda a, b: a * b, lambda a, b: a - b, x, y)

    _both(f, scaled(sign * np.abs(X), 2.0**-20, dtype), scaled(X, 2.0**10, dtype), dtype=dtype)


@pytest.mark.parametrize("index", [0, 1, 2, 7])
def test_switch_branches_with_different_kinds(index):
    # branch 0 returns a plain constant, branches 1 and 2 a scaled value: union is scaled.
    def f(i, x):
        return lax.switch(i, [lambda a: jnp.ones_like(a), lambda a: a * 4.0, lambda a: -a], x)

    out = _both(f, index, scaled(X, 2.0**-30, np.float16), dtype=np.float16)
    assert isinstance(out, sfy.ScaledArray)


def test_switch_static_index_selects_the_branch_at_trace_time():
    def f(x):
        return lax.switch(jnp.int32(1), [jnp.sin, lambda a: a * 2.0], x)

    x = scaled(X, 2.0**-30, np.float16)
    _both(f, x, dtype=np.float16)
    jaxpr = jax.make_jaxpr(sfy.scalify(f))(x)
    assert "cond" not in str(jaxpr)


def test_cond_on_plain_operands_with_scaled_closure():
    def f(x, p):
        return lax.cond(p > 0, lambda: x * 2.0, lambda: x * 0.5)

    x = scaled(X, 2.0**-30, np.float16)
    for p in (1.0, -1.0):
        _both(f, x, jnp.float32(p), dtype=np.float16)


# --- remat, closed_call, jit ---------------------------------------------------------


POLICIES = {
    "none": None,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names("hidden"),
}


@pytest.mark.parametrize(
    "policy,dtype", [(p, np.float16) for p in POLICIES] + [("dots", np.float32)]
)
def test_checkpoint_values_and_grad_inside(policy, dtype):
    def block(x, w):
        h = checkpoint_name(jnp.tanh(x @ w), "hidden")
        return jnp.sin(h) * x

    def loss(x, w):
        return jnp.sum(jax.checkpoint(block, policy=POLICIES[policy])(x, w))

    x, w = scaled(X, 2.0**-3, dtype), scaled(X.T @ X / 4, 2.0**4, dtype)
    _both(loss, x, w, dtype=dtype)
    _both(jax.grad(loss, argnums=(0, 1)), x, w, dtype=dtype, atol_frac=1e-2)
    eqns = jax.make_jaxpr(sfy.scalify(jax.grad(loss)))(x, w).jaxpr.eqns
    remats = [e for e in eqns if e.primitive is P.remat_p]
    assert remats and all(e.params["policy"] is POLICIES[policy] for e in remats)


def test_checkpoint_keeps_policy_and_prevent_cse():
    pol = jax.checkpoint_policies.nothing_saveable

    def f(x):
        return jax.checkpoint(lambda a: jnp.sin(a) * a, policy=pol, prevent_cse=False)(x)

    x = scaled(X, 2.0**-3, np.float16)
    _both(f, x, dtype=np.float16)
    (eqn,) = [e for e in jax.make_jaxpr(sfy.scalify(f))(x).jaxpr.eqns if e.primitive is P.remat_p]
    assert eqn.params["policy"] is pol and eqn.params["prevent_cse"] is False


def test_closed_call():
    # JAX emits closed_call from partial evaluation; bind it directly here.
    inner = jax.make_jaxpr(lambda a, b: (a * b + a,))(X, X)
    fun = lu.wrap_init(jax.extend.core.jaxpr_as_fun(inner), debug_info=inner.jaxpr.debug_info)

    def f(x, y):
        return P.closed_call_p.bind(x, y, subfuns=(fun,), call_jaxpr=inner)[0]

    _both(f, scaled(X, 2.0**-20, np.float16), scaled(X, 2.0**5, np.float16), dtype=np.float16)


def test_nested_jit_keeps_name_and_donation():
    @jax.jit
    def inner(a, b):
        return a * b * 2.0

    g = jax.jit(lambda a, b: a + b, donate_argnums=(0,))

    def f(x, y):
        return g(inner(x, y), y)

    x, y = scaled(X, 2.0**-20, np.float16), scaled(X, 2.0**5, np.float16)
    _both(f, x, y, dtype=np.float16)
    eqns = [e for e in jax.make_jaxpr(sfy.scalify(f))(x, y).jaxpr.eqns if e.primitive is P.jit_p]
    eqns = [e for e in eqns if e.params["name"] in ("inner", "<lambda>")]  # not scalify's scalar helpers
    assert [e.params["name"] for e in eqns] == ["inner", "<lambda>"]
    # the donated ScaledArray gives its data (not its scale) to the inner jit
    assert eqns[1].params["donated_invars"][0] is True
    assert not any(eqns[1].params["donated_invars"][1:])


def _reduce_maxes(closed):
    """Max-abs reductions (range guards) in a jaxpr, nested jits included."""
    n = 0
    for e in closed.jaxpr.eqns:
        n += e.primitive.name == "reduce_max"
        if e.primitive is P.jit_p:
            n += _reduce_maxes(e.params["jaxpr"])
    return n


@pytest.mark.parametrize("eager", [False, True])
def test_elementwise_chain_crosses_a_nested_jit_unrounded(eager):
    """A float16 chain's float32 result crosses a nested ``jit`` both ways unrounded: the
    product ``x * x`` (elements 2**31 apart: the smallest flush to 0 once rounded) leaves
    the jit in float32, so ``rsqrt`` outside reads its small elements as the same chain
    without the jit would, finite and within float16's rounding of float32; and the
    chain is guarded once, where ``rsqrt``'s result is rounded. The jit keeps its name."""
    square = jax.jit(lambda a: a * a)

    def f(x):
        return lax.rsqrt(square(x))

    data = np.array([1.0, 2.0**-15, -1.5, 2.0**-14], np.float32)
    x = scaled(data, 2.0**3, np.float16)
    got = sfy.asarray(sfy.scalify(f)(x) if eager else jax.jit(sfy.scalify(f))(x), dtype=jnp.float32)
    want = f(sfy.asarray(x, dtype=jnp.float32))
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol_of(np.float16))
    closed = jax.make_jaxpr(sfy.scalify(f))(x)
    assert "<lambda>" in [e.params["name"] for e in closed.jaxpr.eqns if e.primitive is P.jit_p]
    assert _reduce_maxes(closed) == _reduce_maxes(jax.make_jaxpr(sfy.scalify(lambda x: lax.rsqrt(x * x)))(x))


def test_selection_of_distant_scales_crosses_jnp_where_unrounded():
    """``jnp.where`` is a nested jit: a selection between ``tanh(x)`` (size 1) and ``y``
    (2**39) leaves it in float32, so ``|.|**-1.5`` of the elements taken from ``tanh``
    is finite (once rounded to float16 beside 2**39 they would be 0, and 0**-1.5 inf)."""
    def f(x, m, y, z):
        return jnp.power(jnp.abs(jnp.where(m, jnp.tanh(x), y)), -1.5) + z

    x = scaled(np.array([3.0, -2.0, 1.0, 5.0], np.float32), 2.0**10, np.float16)
    m = jnp.array([True, True, False, True])
    y = scaled(np.array([1.0, -1.5, 1.25, 1.0], np.float32), 2.0**39, np.float16)
    z = scaled(np.array([0.5, -0.25, 1.0, 0.75], np.float32), 2.0**-2, np.float16)
    got = sfy.asarray(jax.jit(sfy.scalify(f))(x, m, y, z), dtype=jnp.float32)
    want = f(sfy.asarray(x, dtype=jnp.float32), m, sfy.asarray(y, dtype=jnp.float32), sfy.asarray(z, dtype=jnp.float32))
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol_of(np.float16))


def test_unsupported_primitive_in_a_loop_body_names_it_and_the_line():
    prim = jax.extend.core.Primitive("cf_test_op")
    prim.def_abstract_eval(lambda a: a)

    def f(x):
        return lax.fori_loop(0, 3, lambda i, c: prim.bind(c), x)

    with pytest.raises(sfy.UnsupportedPrimitiveError) as info:
        sfy.scalify(f)(scaled(X, 1.0, np.float16))
    assert "cf_test_op" in str(info.value) and "test_control_flow.py" in str(info.value)


# --- gradients inside scalify --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_through_scan(dtype):
    def loss(c, xs, w):
        def body(c, x):
            c = jnp.tanh(c * w + x)
            return c, c * x
        c, ys = lax.scan(body, c, xs)
        return jnp.sum(c) + jnp.sum(ys)

    args = scaled(X / 2, 2.0**-2, dtype), scaled(XS, 2.0**-1, dtype), scaled(X, 1.0, dtype)
    _both(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args, dtype=dtype, atol_frac=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_through_fixed_trip_fori_loop(dtype):
    def loss(x, w):
        return jnp.sum(lax.fori_loop(0, 4, lambda i, c: jnp.sin(c * w) * 2.0, x))

    _both(jax.grad(loss, argnums=(0, 1)), scaled(X, 2.0**-2, dtype), scaled(X, 1.0, dtype),
          dtype=dtype, atol_frac=1e-2)


@pytest.mark.parametrize("dtype,sign", [(np.float32, 1.0), (np.float16, -1.0)])
def test_grad_through_cond(dtype, sign):
    def loss(x, w):
        y = lax.cond(sign * jnp.sum(w) > 0, lambda a: jnp.sin(a * w), lambda a: a * a, x)
        return jnp.sum(y)

    _both(jax.grad(loss, argnums=(0, 1)), scaled(X, 2.0**-3, dtype), scaled(np.abs(X), 1.0, dtype),
          dtype=dtype, atol_frac=1e-2)


# --- always-scaled primitives inside control flow on plain operands ------------------


def test_set_scaling_in_a_loop_body_and_nested_jit_on_plain_operands():
    # Every operand of the scan and of the jit is plain: the rules still run, because
    # set_scaling inside makes the carry a ScaledArray (promoted at loop entry).
    def f(x):
        def body(c, _):
            return sfy.lax.set_scaling(c, jnp.float32(16.0)) * 2.0, None
        return lax.scan(body, x, None, length=3)[0]

    x = jnp.asarray(X, jnp.float16)
    for fn in (sfy.scalify(f), jax.jit(sfy.scalify(jax.jit(f)))):
        out = fn(x)
        assert isinstance(out, sfy.ScaledArray) and float(out.scale) == 32.0  # 16 * 2
        assert_close(out, X * 8.0, np.float16)
