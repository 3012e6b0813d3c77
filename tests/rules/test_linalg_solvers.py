"""Solvers and decompositions of scaled matrices (scale moved to the factor linear in A,
orthogonal factors at scale 1, solves at ``sb / sa``), `custom_linear_solve`, and the
generic `reduce` / `select_and_scatter` (unscaled float32 computation, fresh scale)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scalify as sfy
from tests.utils import both, assert_finite, assert_pow2_scales, rtol_of, scaled

RNG = np.random.default_rng(11)
SCALES = [2.0**-40, 1.0, 2.0**40]  # 1e-12 and 1e12: outside float16's range
N = 5


def spd(n=N):
    m = RNG.standard_normal((n, n))
    return ((m @ m.T + n * np.eye(n)) / n).astype(np.float32)


def values(x):
    return np.asarray(sfy.asarray(x, dtype=jnp.float32), np.float64)


def rel_err(got, want):
    return np.abs(got - want).max() / np.abs(want).max()



# --- decompositions: compare reconstructions, not signs of vectors ----------------------


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_cholesky(s, dtype):
    a = scaled(spd(), s, dtype)
    av = values(a)
    for fn in [jax.jit(sfy.scalify(jnp.linalg.cholesky)),
               sfy.scalify(lambda x: lax.linalg.cholesky(x, symmetrize_input=False))]:
        L = fn(a)
        assert L.dtype == np.dtype(dtype)
        lv = values(L)
        assert rel_err(lv @ lv.T, av) < 4 * rtol_of(dtype)
        np.testing.assert_array_equal(np.triu(lv, 1), 0)
        assert_pow2_scales(L)
    # scale pow2(sqrt(s)) (jnp.linalg.cholesky first symmetrizes: (a + a.T) / 2 is at s / 2)
    assert float(L.scale) == 2.0 ** np.floor(np.log2(np.sqrt(s)))


@pytest.mark.parametrize("s", SCALES)
def test_qr_svd_eigh_schur_reconstruct(s):
    a = scaled(RNG.standard_normal((N, N)), s)
    sym = scaled(spd(), s)
    av, symv = values(a), values(sym)
    tol = 4 * rtol_of(np.float16)

    q, r = sfy.scalify(jnp.linalg.qr)(a)
    assert float(q.scale) == 1.0 and float(r.scale) == s
    assert rel_err(values(q) @ values(r), av) < tol
    np.testing.assert_allclose(values(q).T @ values(q), np.eye(N), atol=tol)

    u, sv, vt = jax.jit(sfy.scalify(jnp.linalg.svd))(a)
    assert float(sv.scale) == s and float(u.scale) == float(vt.scale) == 1.0
    assert rel_err((values(u) * values(sv)) @ values(vt), av) < tol
    np.testing.assert_allclose(values(sv), np.linalg.svd(av, compute_uv=False), rtol=tol)

    w, v = sfy.scalify(lambda x: jnp.linalg.eigh(x, symmetrize_input=False))(sym)
    assert float(w.scale) == s and float(v.scale) == 1.0
    assert rel_err((values(v) * values(w)) @ values(v).T, symv) < tol
    np.testing.assert_allclose(values(w), np.linalg.eigvalsh(symv), rtol=tol)

    t, z = sfy.scalify(jax.scipy.linalg.schur)(a)
    assert float(t.scale) == s and float(z.scale) == 1.0
    assert rel_err(values(z) @ values(t) @ values(z).T, av) < tol
    np.testing.assert_array_equal(np.tril(values(t), -2), 0)
    assert_pow2_scales((q, r, u, sv, vt, w, v, t, z))


def test_qr_pivoting_and_batched_svd_singular_values_only():
    a = scaled(RNG.standard_normal((3, N, 4)), 2.0**-30)
    q, r, p = sfy.scalify(lambda x: lax.linalg.qr(x, pivoting=True, full_matrices=False))(a)
    assert p.dtype == np.int32 and not isinstance(p, sfy.ScaledArray)
    av = values(a)
    recon = values(q) @ values(r)
    for i in range(3):
        assert rel_err(recon[i], av[i][:, np.asarray(p[i])]) < 4e-3 * 4
    sv = sfy.scalify(lambda x: jnp.linalg.svd(x, compute_uv=False))(a)
    np.testing.assert_allclose(values(sv), np.linalg.svd(av, compute_uv=False), rtol=1.6e-2)


def test_householder_product_of_reflectors():
    """Reflectors from a (plain) raw QR, held as ScaledArrays: Q is orthogonal, scale 1."""
    av = RNG.standard_normal((N, 4)).astype(np.float32)
    h, tau = jnp.linalg.qr(av, mode="raw")
    hs, ts = sfy.as_scaled_array((h.T, tau), dtype=jnp.float32)
    q = sfy.scalify(lax.linalg.householder_product)(hs, ts)
    assert float(q.scale) == 1.0
    np.testing.assert_allclose(values(q), np.asarray(jnp.linalg.qr(av)[0]), atol=1e-5)


# --- solves -------------------------------------------------------------------------------


@pytest.mark.parametrize("left_side", [True, False])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("transpose_a", [True, False])
def test_triangular_solve(left_side, lower, transpose_a):
    sa, sb = 2.0**30, 2.0**-30
    m = spd()
    a = scaled(np.tril(m) if lower else np.triu(m), sa)
    b = scaled(RNG.standard_normal((N, 3) if left_side else (3, N)), sb)

    def f(a, b):
        return lax.linalg.triangular_solve(a, b, left_side=left_side, lower=lower,
                                           transpose_a=transpose_a)

    want = np.asarray(f(*sfy.asarray((a, b), dtype=jnp.float32)), np.float64)
    for fn in both(f):
        x = fn(a, b)
        assert float(x.scale) == sb / sa  # 2**-60: a ratio of powers of two
        np.testing.assert_allclose(values(x), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_triangular_solve_unit_diagonal_and_scipy_wrappers():
    a = scaled(np.tril(spd()), 0.25)
    b = scaled(RNG.standard_normal((N, 2)), 2.0**-20)
    fns = [
        lambda a, b: jax.scipy.linalg.solve_triangular(a, b, lower=True, unit_diagonal=True),
        lambda a, b: jax.scipy.linalg.solve_triangular(a, b, lower=True, trans=1),
        lambda a, b: jax.scipy.linalg.cho_solve((a, True), b),
    ]
    for f in fns:
        want = np.asarray(f(*sfy.asarray((a, b), dtype=jnp.float32)), np.float64)
        x = sfy.scalify(f)(a, b)
        np.testing.assert_allclose(values(x), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
        assert_pow2_scales(x)


def test_triangular_solve_scale_ratio_out_of_float32_range_is_clamped():
    """sb / sa = 2**-200 is not a float32 number: the scale is clamped to the smallest
    normal and the rest goes into the data (which underflows like the float32 value)."""
    a = scaled(np.eye(3) * 2, 2.0**100, np.float32)
    b = scaled(np.ones((3, 1)), 2.0**-100, np.float32)
    x = sfy.scalify(lambda a, b: lax.linalg.triangular_solve(a, b, left_side=True, lower=True))(a, b)
    assert float(x.scale) == np.finfo(np.float32).tiny
    assert_finite(x)
    np.testing.assert_array_equal(values(x), 0.0)


@pytest.mark.parametrize("s", SCALES)
def test_solve_via_cholesky_and_custom_linear_solve(s):
    """jax.scipy.linalg.solve(assume_a='pos') is cholesky + custom_linear_solve (with
    triangular solves inside): x = A^-1 b at A's and b's scales far outside float16."""
    a = scaled(spd(), s)
    b = scaled(RNG.standard_normal((N, 2)), 1 / s)
    av, bv = values(a), values(b)
    for fn in both(lambda a, b: jax.scipy.linalg.solve(a, b, assume_a="pos")):
        x = fn(a, b)
        xv = values(x)
        assert rel_err(av @ xv, bv) < 1e-2
        assert_pow2_scales(x)
        assert np.all(np.abs(np.asarray(x.data, np.float32)) > 1e-3)


def test_conjugate_gradient_and_grad_inside_scalify():
    """CG (custom_linear_solve around a while_loop) and jax.grad inside scalify (the
    jaxpr then holds the transposed solve) match float32.

    CG's stopping tolerance ``tol**2 * |b|**2`` squares ``tol`` in float32 and casts it
    to float16, where 1e-12 is 0: read at its own scale, it stops the loop where float32
    stops it. (Read as 0, CG ran to ``maxiter`` and, on some draws, divided 0 by 0 once
    its residual vanished.) Its own generator: the draw must not depend on test order."""
    rng = np.random.default_rng(19)  # a draw on which the flushed tolerance gave NaN
    m = rng.standard_normal((N, N))
    a = scaled(((m @ m.T + N * np.eye(N)) / N).astype(np.float32), 2.0**-10)
    b = scaled(rng.standard_normal(N), 2.0**10)

    def cg(a, b):
        return jax.scipy.sparse.linalg.cg(a, b, tol=1e-6, maxiter=20)[0]

    want = np.asarray(cg(*sfy.asarray((a, b), dtype=jnp.float32)), np.float64)
    x = jax.jit(sfy.scalify(cg))(a, b)
    np.testing.assert_allclose(values(x), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())

    def loss(a, b):
        return jnp.sum(jax.scipy.linalg.solve(a, b, assume_a="pos") ** 2)

    ga, gb = jax.jit(sfy.scalify(jax.grad(loss, argnums=(0, 1))))(a, b)
    want_a, want_b = jax.grad(loss, argnums=(0, 1))(*sfy.asarray((a, b), dtype=jnp.float32))
    for g, w in ((ga, want_a), (gb, want_b)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(values(g), w, rtol=3e-2, atol=3e-2 * np.abs(w).max())


def test_grad_of_scalified_solve_from_outside():
    """jax.grad of scalify(f) differentiates the scalified solver's operations."""
    a = scaled(spd(), 0.5, np.float32)
    bv = RNG.standard_normal(N).astype(np.float32)

    def f(a, b):
        return jax.scipy.linalg.solve(a, b, assume_a="pos")

    got = jax.grad(lambda b: jnp.sum(sfy.asarray(sfy.scalify(f)(a, b)) * bv))(bv)
    av = sfy.asarray(a)
    want = jax.grad(lambda b: jnp.sum(f(av, b) * bv))(bv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", [2.0**-50, 2.0**50])
def test_tridiagonal_solve(s):
    dl = np.concatenate([[0.0], RNG.uniform(-1, 1, N - 1)]).astype(np.float32)
    du = np.concatenate([RNG.uniform(-1, 1, N - 1), [0.0]]).astype(np.float32)
    d = (4 + RNG.uniform(0, 1, N)).astype(np.float32)
    ops = (scaled(dl, s), scaled(d / 4, 4 * s), scaled(du, s), scaled(RNG.standard_normal((N, 2)), s))
    want = np.asarray(lax.linalg.tridiagonal_solve(*sfy.asarray(ops, dtype=jnp.float32)), np.float64)
    x = jax.jit(sfy.scalify(lax.linalg.tridiagonal_solve))(*ops)
    assert float(x.scale) == 0.25  # sb / max(scales of the diagonals)
    np.testing.assert_allclose(values(x), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_lu_is_reported_unsupported():
    with pytest.raises(sfy.UnsupportedPrimitiveError, match="lu"):
        sfy.scalify(jax.scipy.linalg.lu_factor)(scaled(spd(), 2.0))


# --- generic reduce and select_and_scatter (computed on values, fresh scale) --------------


@pytest.mark.parametrize("s", [2.0**-80, 1.0, 2.0**80])
def test_reduce_custom_computation_and_value_index_pairs(s):
    v = RNG.standard_normal((4, 16)).astype(np.float32)
    x = scaled(v, s)

    def half_abs_max(x):  # a non-monoid computation with a float16 literal inside
        return lax.reduce(x, jnp.float16(0), lambda a, b: jnp.maximum(a, jnp.abs(b) * jnp.float16(0.5)), (1,))

    def argmax_pair(x, i):
        def comb(a, b):
            take = a[0] >= b[0]
            return jnp.where(take, a[0], b[0]), jnp.where(take, a[1], b[1])

        return lax.reduce((x, i), (jnp.array(-jnp.inf, x.dtype), jnp.int32(0)), comb, (1,))

    xv = values(x)
    out = jax.jit(sfy.scalify(half_abs_max))(x)
    np.testing.assert_allclose(values(out), np.abs(xv).max(1) / 2, rtol=4e-3)
    assert_pow2_scales(out)
    # fresh scale: the data are near unit size whatever s is
    assert 0.5 <= np.sqrt(np.mean(np.asarray(out.data, np.float64) ** 2)) < 2
    idx = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
    m, k = sfy.scalify(argmax_pair)(x, idx)
    np.testing.assert_array_equal(np.asarray(k), np.argmax(xv, 1))
    np.testing.assert_allclose(values(m), xv.max(1), rtol=4e-3)
    # plain operands stay plain
    p = sfy.scalify(half_abs_max)(jnp.asarray(v, jnp.float16))
    assert not isinstance(p, sfy.ScaledArray)


def _select_and_scatter(operand, source, init, select, scatter, window, strides):
    scalar = jax.ShapeDtypeStruct((), operand.dtype)
    sel = jax.make_jaxpr(select)(scalar, scalar)
    sca = jax.make_jaxpr(scatter)(scalar, scalar)
    return lax.select_and_scatter_p.bind(
        operand, source, init, select_jaxpr=sel.jaxpr, select_consts=tuple(sel.consts),
        scatter_jaxpr=sca.jaxpr, scatter_consts=tuple(sca.consts),
        window_dimensions=window, window_strides=strides, padding=((0, 0), (0, 0)))


@pytest.mark.parametrize("s", [2.0**-60, 2.0**60])
def test_select_and_scatter_generic(s):
    """select = lower-or-equal (min pooling's gradient), scatter = max."""
    operand = scaled(RNG.standard_normal((4, 6)), s)
    source = scaled(RNG.standard_normal((2, 3)), s * 2.0**-10)
    def f(o, src):
        return _select_and_scatter(o, src, jnp.zeros((), o.dtype), lax.le, lax.max, (2, 2), (2, 2))

    want = f(*sfy.asarray((operand, source), dtype=jnp.float32))
    out = sfy.scalify(f)(operand, source)
    assert isinstance(out, sfy.ScaledArray) and out.dtype == np.float16
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(values(out), want, rtol=4e-3, atol=1e-6 * np.abs(want).max())
    assert np.any(want != 0) and np.all(np.isfinite(np.asarray(out.data, np.float32)))
    assert_pow2_scales(out)


@pytest.mark.parametrize("s", [2.0**-60, 1.0, 2.0**60])
def test_generic_computations_with_an_all_zero_result_give_the_zero_tensor(s):
    """A fresh scale measured from an all-zero result is 0 (the zero tensor), and its
    data stay 0, not 0 / 0: the scatter's maximum with 0 of negative sources, and a
    custom reduction of zeros."""
    operand = scaled(RNG.standard_normal((4, 6)), s)
    source = scaled(-np.abs(RNG.standard_normal((2, 3))) - 0.1, s)

    def pool(o, src):
        return _select_and_scatter(o, src, jnp.zeros((), o.dtype), lax.le, lax.max, (2, 2), (2, 2))

    def sum_of_squares(x):  # a computation no scale rule knows: runs on values in float32
        return lax.reduce(x * 0, jnp.zeros((), x.dtype), lambda a, b: a * a + b * b, (1,))

    for f, args in ((pool, (operand, source)), (sum_of_squares, (operand,))):
        want = np.asarray(f(*sfy.asarray(args, dtype=jnp.float32)))
        assert np.all(want == 0)
        out = sfy.scalify(f)(*args)
        assert isinstance(out, sfy.ScaledArray), f
        np.testing.assert_array_equal(np.asarray(out.data, np.float32), 0)
        assert float(out.scale) == 0
