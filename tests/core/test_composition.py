"""scalify composed with JAX transforms: jit (outside, inside, nested with donation),
grad (inside and outside, custom_jvp/custom_vjp rules respected), vmap, keywords."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import primitives as P

import scalify as sfy
from tests.utils import assert_close, oracle, scaled

RNG = np.random.default_rng(1)
X = RNG.uniform(-1.0, 1.0, (3, 4)).astype(np.float32)
W = RNG.uniform(-1.0, 1.0, (4, 4)).astype(np.float32)


def _grad_outside(f, dtype=np.float32):
    """Gradient of ``sum(scalify(f)(x))`` taken *outside* scalify, w.r.t. a plain x."""
    return jax.grad(
        lambda x: jnp.sum(sfy.asarray(sfy.scalify(f)(sfy.as_scaled_array(x)), dtype=jnp.float32))
    )


@jax.custom_vjp
def triple_grad_sin(x):
    return jnp.sin(x)


def _tgs_fwd(x):
    return jnp.sin(x), jnp.cos(x)


def _tgs_bwd(cos_x, ct):
    return (3.0 * ct * cos_x,)  # deliberately 3x the true derivative


triple_grad_sin.defvjp(_tgs_fwd, _tgs_bwd)


def _mlp(x):
    return jnp.sum(jnp.tanh(x @ W) * x)


def _scan_fn(x):
    xs = jnp.stack([X, -X, X * 0.5]).astype(x.dtype)
    c, ys = lax.scan(lambda c, w: (jnp.sin(c * w), c * 2.0), x, xs)
    return jnp.sum(c) + jnp.sum(ys)


def _cond_fn(x):
    return jnp.sum(lax.cond(jnp.sum(x) > 0, lambda a: a * a, lambda a: jnp.sin(a), x))


def _jit_remat_fn(x):
    inner = jax.jit(jax.checkpoint(lambda a: jnp.tanh(a @ W)))
    return jnp.sum(inner(x) * x)


FUNCS = {"mlp": _mlp, "scan": _scan_fn, "cond": _cond_fn, "jit_remat": _jit_remat_fn}


# --- jit -----------------------------------------------------------------------------


def test_jit_outside_and_inside_agree():
    inner = jax.jit(lambda a: jnp.tanh(a @ W))

    def f(x):
        return inner(x) * 2.0

    x = scaled(X, 2.0**-20, np.float16)
    want = oracle(f, x)
    for fn in (sfy.scalify(f), jax.jit(sfy.scalify(f)), sfy.scalify(jax.jit(f))):
        out = fn(x)
        assert isinstance(out, sfy.ScaledArray)
        assert_close(out, want, np.float16, atol=1e-2 * float(np.max(np.abs(want))))


def test_nested_jit_donation_eager_and_in_jaxpr():
    donating = jax.jit(lambda a: a * 2.0, donate_argnums=(0,))

    def f(x):
        return donating(x * 1.0)

    x = scaled(X, 2.0**-10, np.float16)
    jaxpr = jax.make_jaxpr(sfy.scalify(f))(x)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is P.jit_p]
    assert eqn.params["donated_invars"][0] is True  # the data ...
    assert eqn.params["donated_invars"][1:] == (False,) * (len(eqn.invars) - 1)  # not scales

    # Eagerly, the inner jit runs at top level and really consumes the donated data.
    y = scaled(X, 2.0**-10, np.float16)
    out = sfy.scalify(donating)(y)
    assert y.data.is_deleted() and not y.scale.is_deleted()
    assert_close(out, X * 2.0**-9, np.float16)


# --- grad ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_grad_inside_scalify(name, dtype):
    f = FUNCS[name]
    x = scaled(X, 2.0**-2, dtype)
    out = jax.jit(sfy.scalify(jax.grad(f)))(x)
    want = oracle(jax.grad(f), x)
    assert isinstance(out, sfy.ScaledArray) and out.dtype == dtype
    assert_close(out, want, dtype, atol=1e-2 * float(np.max(np.abs(want))))


@pytest.mark.parametrize("name", list(FUNCS))
def test_grad_outside_scalify_equals_plain_grad(name):
    f = FUNCS[name]
    got = jax.jit(_grad_outside(f))(X)
    assert_close(got, jax.grad(f)(X), np.float32, atol=1e-6)


def test_grad_outside_float16_data():
    x16 = jnp.asarray(X, jnp.float16)
    got = jax.jit(_grad_outside(_mlp))(x16)
    assert got.dtype == jnp.float16
    assert_close(got, jax.grad(_mlp)(X), np.float16, atol=1e-2)


def test_value_and_grad_inside_and_outside():
    x = scaled(X * 4, 2.0**-2, np.float32)  # the value X
    v, g = jax.jit(sfy.scalify(jax.value_and_grad(_mlp)))(x)
    assert_close(v, _mlp(X), np.float32)
    assert_close(g, jax.grad(_mlp)(X), np.float32)
    v2, g2 = jax.jit(jax.value_and_grad(
        lambda a: sfy.asarray(sfy.scalify(_mlp)(sfy.as_scaled_array(a)))
    ))(X)
    assert_close(v2, _mlp(X), np.float32)
    assert_close(g2, jax.grad(_mlp)(X), np.float32)


def test_grad_outside_wrt_a_scaled_array_gives_data_and_scale_cotangents():
    s = 2.0**-3
    x = scaled(X / s, s, np.float32)
    g = jax.jit(jax.grad(lambda a: jnp.sum(sfy.asarray(sfy.scalify(_mlp)(a)))))(x)
    want = jax.grad(_mlp)(X)
    assert isinstance(g, sfy.ScaledArray)  # the cotangent pytree (d/d data, d/d scale)
    assert_close(g.data, want * s, np.float32, atol=1e-6)
    assert_close(g.scale, np.sum(want * X / s), np.float32, atol=1e-5)


def test_keyword_arguments():
    def f(x, *, w, bias=None):
        return jnp.tanh(x @ w) + bias

    x, w = scaled(X, 2.0**-8, np.float16), scaled(W, 2.0**4, np.float16)
    b = jnp.ones(4, jnp.float16)
    out = jax.jit(sfy.scalify(f))(x, w=w, bias=b)
    want = oracle(lambda x, w, b: f(x, w=w, bias=b), x, w, b)
    assert_close(out, want, np.float16, atol=1e-3)
    g = jax.jit(sfy.scalify(jax.grad(lambda x, *, w: jnp.sum(f(x, w=w, bias=0.0)))))(x, w=w)
    assert_close(g, oracle(jax.grad(lambda x, w: jnp.sum(f(x, w=w, bias=0.0))), x, w),
                 np.float16, atol=1e-3 * 16)


# --- custom derivatives --------------------------------------------------------------

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "logsumexp": lambda a: jax.nn.logsumexp(a, axis=-1),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_custom_jvp_activations_values_and_grads(name):
    act = ACTIVATIONS[name]
    f = lambda a: jnp.sum(act(a * 4.0))  # noqa: E731
    x = scaled(X, 2.0**-2, np.float16)
    assert_close(jax.jit(sfy.scalify(f))(x), oracle(f, x), np.float16, atol=1e-2)
    want = oracle(jax.grad(f), x)
    assert_close(jax.jit(sfy.scalify(jax.grad(f)))(x), want, np.float16, atol=1e-2)
    assert_close(jax.jit(_grad_outside(f))(X / 4), jax.grad(f)(X / 4), np.float32, atol=1e-6)


def test_custom_jvp_rule_is_respected_outside():
    # At 0 relu's custom JVP gives 0; differentiating its primal max(x, 0) gives 1/2.
    z = jnp.zeros(3)
    np.testing.assert_array_equal(_grad_outside(jax.nn.relu)(z), np.zeros(3))
    np.testing.assert_array_equal(_grad_outside(jax.nn.relu)(z - 1.0), np.zeros(3))
    np.testing.assert_array_equal(_grad_outside(jax.nn.relu)(z + 1.0), np.ones(3))


def test_custom_vjp_bwd_respected_inside_and_outside():
    f = lambda a: jnp.sum(triple_grad_sin(a * 2.0))  # noqa: E731
    want = 6.0 * np.cos(2.0 * X)  # 3x the true derivative, as the user's bwd says
    np.testing.assert_allclose(jax.grad(f)(X), want, rtol=1e-6)
    x = scaled(X * 4, 2.0**-2, np.float16)  # the value X
    assert_close(jax.jit(sfy.scalify(jax.grad(f)))(x), want, np.float16, atol=1e-2)
    assert_close(sfy.scalify(f)(x), np.sum(np.sin(2 * X)), np.float16, atol=1e-2)
    assert_close(jax.jit(_grad_outside(f))(X), want, np.float32, atol=1e-6)
    x16 = jnp.asarray(X, jnp.float16)
    assert_close(jax.jit(_grad_outside(f))(x16), want, np.float16, atol=1e-2)


def test_custom_vjp_cotangent_of_the_scale():
    s = 2.0**-4
    x = scaled(X / s, s, np.float32)
    g = jax.jit(jax.grad(lambda a: jnp.sum(sfy.asarray(sfy.scalify(triple_grad_sin)(a)))))(x)
    want = 3.0 * np.cos(X)  # user's value cotangent
    assert_close(g.data, want * s, np.float32, atol=1e-6)
    assert_close(g.scale, np.sum(want * X / s), np.float32, atol=1e-4)


def test_custom_vjp_with_closure_and_integer_argument():
    @jax.custom_vjp
    def f(x, n):
        return x * n

    f.defvjp(lambda x, n: (x * n, n), lambda n, ct: (ct * n * 3.0, None))

    def loss(x, w):
        return jnp.sum(f(x * w, 2))

    want = 6.0 * W[0]
    got = jax.jit(jax.grad(
        lambda a: jnp.sum(sfy.asarray(sfy.scalify(loss)(sfy.as_scaled_array(a), W[0])))))(X)
    assert_close(got, np.broadcast_to(want, X.shape), np.float32, atol=1e-6)


# --- vmap ----------------------------------------------------------------------------


def test_vmap_of_scalify_with_shared_scale():
    xb = scaled(np.stack([X, 2 * X]), 2.0**-12, np.float16)
    axes = jax.tree.unflatten(jax.tree.structure(xb), [0, None])
    out = jax.jit(jax.vmap(sfy.scalify(_scan_fn), in_axes=(axes,)))(xb)
    want = jax.vmap(_scan_fn)(sfy.asarray(xb, jnp.float32))
    assert_close(out, want, np.float16, atol=1e-2 * float(np.max(np.abs(want))))


def test_vmap_of_scalify_with_per_example_scales():
    data = jnp.asarray(np.stack([X, X]), jnp.float16)
    scales = jnp.array([2.0**-30, 2.0**20], jnp.float32)
    fn = sfy.scalify(lambda a: jnp.tanh(a @ W) * a)
    out = jax.jit(jax.vmap(lambda d, s: fn(sfy.ScaledArray(d, s))))(data, scales)
    for k in range(2):
        want = np.tanh((X * scales[k]) @ W) * X * scales[k]
        got = np.asarray(out.data[k], np.float32) * np.float64(out.scale[k])
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.max(np.abs(want)))


def test_scalify_of_vmap():
    f = jax.vmap(_mlp)
    xb = scaled(np.stack([X, -X]), 2.0**-12, np.float16)
    out = jax.jit(sfy.scalify(f))(xb)
    assert_close(out, oracle(f, xb), np.float16, atol=1e-2 * 2.0**-12)


def test_nested_jit_shardings_data_sharded_scale_replicated():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2,), ("x",))
    sh = NamedSharding(mesh, PartitionSpec("x"))
    g = jax.jit(lambda a, b: (a * 2.0, b + 1.0), in_shardings=(sh, None), out_shardings=(sh, None))
    x = scaled(np.ones((4, 2)), 0.5, np.float16)
    (eqn,) = jax.make_jaxpr(sfy.scalify(g))(x, jnp.ones(3)).jaxpr.eqns
    replicated = NamedSharding(mesh, PartitionSpec())
    for key in ("in_shardings", "out_shardings"):
        assert eqn.params[key][:2] == (sh, replicated)  # data, scale
    out, y = jax.jit(sfy.scalify(g))(x, jnp.ones(3))
    assert out.data.sharding == sh and out.scale.sharding == replicated
    assert_close(out, np.ones((4, 2)), np.float16)
    np.testing.assert_array_equal(y, np.full(3, 2.0))
