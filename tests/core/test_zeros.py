"""Scale 0 is the all-zero tensor: it carries no magnitude (docs/design.md,
contract item 4).

Oracle: plain float32 JAX on the values the ScaledArrays represent.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalify as sfy


def _zeros(shape=(4, 3), dtype=jnp.float16):
    return sfy.as_scaled_array(jnp.zeros(shape), dtype=dtype)


def _small(shape=(4, 3), dtype=jnp.float16):
    x = jnp.arange(1, 1 + int(np.prod(shape)), dtype=jnp.float32).reshape(shape) * 1e-6
    return sfy.as_scaled_array(x, dtype=dtype)


def test_zero_leaves_get_scale_zero():
    z = _zeros()
    assert float(z.scale) == 0.0
    assert np.all(np.asarray(z.data) == 0)
    np.testing.assert_array_equal(sfy.asarray(z), np.zeros((4, 3), np.float16))


def test_constructors_accept_scale_zero_and_refuse_negative():
    x = sfy.ScaledArray(jnp.ones(3, jnp.float16), np.float32(0))
    np.testing.assert_array_equal(np.asarray(sfy.asarray(x, dtype=jnp.float32)), np.zeros(3))
    assert float(sfy.scaled_array([1.0, 2.0], 0.0).scale) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        sfy.ScaledArray(jnp.ones(3), np.float32(-1))
    with pytest.raises(ValueError, match=">= 0"):
        sfy.scaled_array([1.0], float("nan"))
    with pytest.raises(ValueError, match="drop the values"):
        sfy.as_scaled_array(jnp.ones(3), scale=0.0)


def test_scaled_array_signature_of_jax_scalify():
    """``scaled_array(data, scale, dtype=None, npapi=None)``, keywords included."""
    a = sfy.scaled_array(data=[1.0, 2.0], scale=0.5, dtype=jnp.float16, npapi=np)
    assert isinstance(a.data, np.ndarray) and a.data.dtype == np.float16
    assert isinstance(a.scale, np.ndarray) and float(a.scale) == 0.5
    b = sfy.scaled_array([1.0, 2.0], 2.0, npapi=jnp)
    assert isinstance(b.data, jax.Array)
    np.testing.assert_allclose(np.asarray(sfy.asarray(b)), [2.0, 4.0])
    with pytest.raises(TypeError, match="npapi"):
        sfy.scaled_array([1.0], 1.0, npapi=object())


@pytest.mark.parametrize(
    "name, fn",
    [
        ("add", lambda z, x: z + x),
        ("sub", lambda z, x: x - z),
        ("add3", lambda z, x: 0.9 * z + 0.1 * x * x),  # Adam's second moment from init
        ("mul", lambda z, x: z * x),
        ("div", lambda z, x: z / (x + 1.0)),
        ("max", lambda z, x: jnp.maximum(z, x)),
        ("where_inf", lambda z, x: jnp.where(x > 5e-6, z, -jnp.inf)),
        ("compare", lambda z, x: (z < x).astype(jnp.float32)),
        ("tanh", lambda z, x: jnp.tanh(z) + x),
        ("cos", lambda z, x: jnp.cos(z) * x),
        ("sqrt", lambda z, x: jnp.sqrt(z) + x),
        ("sqrt_eps", lambda z, x: x / (jnp.sqrt(z) + 1e-3)),  # eps representable in float16
        ("square", lambda z, x: z**2 + x),
        ("sum", lambda z, x: jnp.sum(z, 0) + jnp.sum(x, 0)),
        ("dot", lambda z, x: z.T @ x),
        ("softmax", lambda z, x: jax.nn.softmax(z) * x),
        ("concat", lambda z, x: jnp.concatenate([z, x])),
    ],
)
@pytest.mark.parametrize("order", ["zx", "xz", "zz"])
def test_rules_on_zero_operands(name, fn, order):
    z, x = _zeros(), _small()
    a, b = {"zx": (z, x), "xz": (x, z), "zz": (z, z)}[order]
    got = sfy.asarray(jax.jit(sfy.scalify(fn))(a, b), dtype=jnp.float32)
    want = fn(*sfy.asarray((a, b), dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=1e-12)


def test_zero_does_not_set_the_scale_of_a_sum():
    z, x = _zeros(), _small()
    out = jax.jit(sfy.scalify(lambda a, b: a + b))(z, x)
    assert float(out.scale) == float(x.scale)
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data))


def test_computed_zero_sum_gets_scale_zero():
    x = _small((32, 3))
    out = jax.jit(sfy.scalify(lambda a: jnp.sum(a * 0.0, axis=0)))(x)
    assert float(out.scale) == 0.0


def test_adam_second_moment_keeps_small_squares():
    """``b2 * 0 + (1 - b2) * g**2`` with g ~ 1e-6: a unit-scaled zero state would flush
    the squares (1e-15) to zero in float16; at scale 0 they are kept."""
    g = _small()
    v0 = optax.adam(1e-3).init({"g": g})[0].nu["g"]  # eager init: ScaledArray(zeros, 0)
    assert float(v0.scale) == 0.0
    f = lambda v, g: 0.999 * v + 0.001 * g * g  # noqa: E731
    got = sfy.asarray(jax.jit(sfy.scalify(f))(v0, g), dtype=jnp.float32)
    want = f(0.0, sfy.asarray(g, dtype=jnp.float32))
    assert np.all(np.asarray(got) > 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3)


def test_traced_scalar_moves_into_the_scale():
    """A learning rate from a schedule (a traced scalar) multiplies the scale, not the
    data; a zero one (warmup from 0) gives the zero tensor."""
    x = _small()
    f = jax.jit(sfy.scalify(lambda x, lr: x * lr))
    out = f(x, jnp.float32(1e-3))
    d = np.abs(np.asarray(out.data, np.float32))
    assert 0.5 <= d.max() / np.abs(np.asarray(x.data, np.float32)).max() <= 2
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)),
                               np.asarray(sfy.asarray(x, dtype=jnp.float32)) * 1e-3, rtol=1e-3)
    zero = f(x, jnp.float32(0.0))
    assert float(zero.scale) == 0.0
    assert np.all(np.asarray(sfy.asarray(zero, dtype=jnp.float32)) == 0)


def test_one_element_scale_is_a_scalar():
    """optax's factored init maps a scalar scale to shape (1,): still a zero tensor."""
    treedef = jax.tree.structure(_small((5,)))
    z = jax.tree.unflatten(treedef, [jnp.zeros(5, jnp.float16), jnp.zeros((1,), jnp.float32)])
    out = jax.jit(sfy.scalify(lambda a, b: a + b))(z, _small((5,)))
    assert np.shape(out.scale) == ()
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(_small((5,)).data))
    bad = jax.tree.unflatten(treedef, [jnp.zeros(5, jnp.float16), jnp.zeros((2,), jnp.float32)])
    with pytest.raises(TypeError, match="scalar"):
        sfy.scalify(lambda a: a)(bad)
