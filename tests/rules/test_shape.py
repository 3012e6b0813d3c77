"""Data-movement rules: the scale is kept and the data moved bit-exactly; operands that
are joined are aligned to the largest scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import scalify as sfy
from tests.utils import both, assert_close, assert_finite, assert_gathered_scale, assert_pow2_scales, oracle, scaled

DTYPES = [np.float32, np.float16, jnp.bfloat16]
RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 6, 2)).astype(np.float32)




def leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda z: isinstance(z, sfy.ScaledArray))


MOVES = {
    "reshape": lambda x: x.reshape(6, 8),
    "reshape_ravel": lambda x: jnp.ravel(x),
    "broadcast_to": lambda x: jnp.broadcast_to(x[:, :, None, :], (4, 6, 3, 2)),
    "expand_dims": lambda x: jnp.expand_dims(x, (0, 2)),
    "transpose": lambda x: jnp.transpose(x, (2, 0, 1)),
    "squeeze": lambda x: jnp.squeeze(x[:1], 0),
    "slice_strided": lambda x: x[1:4:2, ::3],
    "lax_slice": lambda x: lax.slice(x, (0, 1, 0), (4, 6, 2), (3, 2, 1)),
    "rev": lambda x: lax.rev(x, (0, 2)),
    "copy": lambda x: jnp.copy(x),
    "tile": lambda x: jnp.tile(x, (2, 1, 3)),
    "split": lambda x: jnp.split(x, [1, 4], axis=1),
    "unstack": lambda x: lax.unstack(x, axis=2),
    "many": lambda x: jnp.swapaxes(x.reshape(2, 2, 12)[::-1], 0, 2)[None],
}


@pytest.mark.parametrize("name", sorted(MOVES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_data_movement_is_bit_exact_and_keeps_the_scale(name, dtype):
    f = MOVES[name]
    x = scaled(X, 2.0**-20, dtype)
    for fn in both(f):
        out = fn(x)
        want_data = f(x.data)
        for o, d in zip(leaves(out), jax.tree.leaves(want_data)):
            assert isinstance(o, sfy.ScaledArray)
            assert o.dtype == x.dtype and o.shape == d.shape
            np.testing.assert_array_equal(np.asarray(o.data, np.float32), np.asarray(d, np.float32))
            assert float(o.scale) == 2.0**-20


@pytest.mark.parametrize("scale", [2.0**-60, 2.0**60])
def test_data_movement_range(scale):
    f = lambda x: jnp.transpose(x.reshape(6, 8))[::-1, 1:]  # noqa: E731
    x = scaled(X, scale, np.float16)
    out = jax.jit(sfy.scalify(f))(x)
    got = np.asarray(out.data, np.float64) * float(out.scale)
    want = f(np.asarray(x.data, np.float64)) * scale
    np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(got)) and np.all(got[want != 0] != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_concatenate_aligns_to_the_largest_scale(dtype):
    def f(a, b, c):
        return jnp.concatenate([a, b, c], axis=1)

    a = scaled(X[:, :2], 2.0**-3, dtype)
    b = scaled(X[:, 2:5], 2.0**5, dtype)
    c = scaled(X[:, 5:], 2.0**-1, dtype)
    for fn in both(f):
        out = fn(a, b, c)
        assert out.dtype == np.dtype(dtype)
        assert_gathered_scale(out, dtype, 2.0**-3, 2.0**5, 2.0**-1)
        assert_close(out, oracle(f, a, b, c), dtype, atol=2.0**5 * 2.0**-14)
        # the operand at the largest scale keeps its values exactly (power-of-two moves)
        got = np.asarray(out.data[:, 2:5], np.float64) * float(out.scale)
        np.testing.assert_array_equal(got, np.asarray(b.data, np.float64) * 2.0**5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_concatenate_keeps_a_far_smaller_operand_in_float16(jit):
    """Operands 2**27 apart: aligned to the larger scale in float16 the smaller one's
    elements (data in [0.5, 4)) would flush to 0 and their ``log`` be -inf. They are
    aligned in float32 and the result rounded with its largest element at the top of
    float16's band (2**11), which leaves the smaller elements at 2**-17 or above: held
    to 7 bits or more, so ``log(|x|)`` is float32's to 2**-6."""
    f = lambda a, b: jnp.log(jnp.abs(jnp.concatenate([a, b], axis=1)))  # noqa: E731
    a, b = scaled(0.5 + np.abs(X[:, :3]), 2.0**-25), scaled(X[:, 3:], 2.0**2)
    assert np.max(np.abs(X[:, 3:])) < 4
    fn = jax.jit(sfy.scalify(f)) if jit else sfy.scalify(f)
    got = np.asarray(sfy.asarray(fn(a, b), jnp.float32), np.float64)
    want = np.asarray(oracle(f, a, b), np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=2.0**-6)


def test_concatenate_same_scale_is_exact_and_range():
    """One ScaledArray's pieces share its scale: the data are concatenated as they are.
    Two operands whose traced scales are equal but not known to be (distinct arrays):
    the values are still exact (power-of-two moves only), at 2**60."""
    s = 2.0**60
    f = lambda a, b: jnp.concatenate([a, b], 0)  # noqa: E731
    a, b = scaled(X, s), scaled(-X, s)
    out = jax.jit(sfy.scalify(lambda a: f(a[:2], a[2:])))(a)
    assert float(out.scale) == s
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(a.data))
    out = jax.jit(sfy.scalify(f))(a, b)
    assert_gathered_scale(out, np.float16, s, s)
    want = np.concatenate([a.data, b.data], 0).astype(np.float64) * s
    np.testing.assert_array_equal(np.asarray(out.data, np.float64) * float(out.scale), want)
    assert_finite(out)


def test_concatenate_static_scale_free_operands_adopt_the_scale():
    x = scaled(X, 2.0**-40)

    def f(x):
        zeros = jnp.zeros((4, 1, 2), x.dtype)  # static after folding: scale-free
        ninf = jnp.full((4, 1, 2), -jnp.inf, x.dtype)  # static: scale-free too
        return jnp.concatenate([x, zeros, ninf], axis=1)

    for fn in both(f):
        out = fn(x)
        assert float(out.scale) == 2.0**-40  # not dragged towards 1 by the constants
        vals = np.asarray(out.data, np.float64) * float(out.scale)
        np.testing.assert_array_equal(vals[:, :6], np.asarray(x.data, np.float64) * 2.0**-40)
        assert np.all(vals[:, 6] == 0) and np.all(vals[:, 7] == -np.inf)


def test_concatenate_with_plain_operand():
    # A plain traced operand counts with scale 1; here 1 is the largest scale.
    f = lambda x, p: jnp.concatenate([x, p], axis=1)  # noqa: E731
    x = scaled(X, 2.0**-3)
    p = jnp.asarray(X[:, :1] * 3, np.float16)
    for fn in both(f):
        out = fn(x, p)
        assert isinstance(out, sfy.ScaledArray)
        assert_gathered_scale(out, np.float16, 2.0**-3, 1.0)
        assert_close(out, oracle(f, x, p), np.float16, atol=2.0**-14)
    # and a larger operand scale wins over the plain operand's 1
    y = scaled(X, 2.0**6)
    out = jax.jit(sfy.scalify(f))(y, p)
    assert_gathered_scale(out, np.float16, 2.0**6, 1.0)
    assert_close(out, oracle(f, y, p), np.float16, atol=2.0**6 * 2.0**-14)


def test_concatenate_static_constant_sets_its_pow2_scale():
    x = scaled(X, 2.0**-10)
    f = lambda x: jnp.concatenate([x, jnp.full((4, 1, 2), 3.0, x.dtype)], 1)  # noqa: E731
    out = jax.jit(sfy.scalify(f))(x)
    # A static constant only needs room in the scale: pow2(3.0) with float16's headroom
    # of 2^-7 (half its exponent range), which is larger than 2^-10.
    assert float(out.scale) == 2.0 * 2.0**-7
    assert_close(out, oracle(f, x), np.float16, atol=2.0 * 2.0**-14)
    assert_pow2_scales(out)


def test_stack_aligns_like_concatenate():
    f = lambda a, b: jnp.stack([a, b], axis=1)  # noqa: E731
    a, b = scaled(X, 2.0**-50), scaled(X[::-1], 2.0**-48)
    for fn in both(f):
        out = fn(a, b)
        assert out.shape == (4, 2, 6, 2)
        assert_gathered_scale(out, np.float16, 2.0**-50, 2.0**-48)
        assert_close(out, oracle(f, a, b), np.float16, atol=2.0**-48 * 2.0**-14)


PAD_CONFIG = ((1, 2, 1), (0, -1, 0), (2, 0, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_static_zero_keeps_scale(dtype):
    x = scaled(X, 2.0**30, dtype)
    f = lambda x: lax.pad(x, jnp.zeros((), x.dtype), PAD_CONFIG)  # noqa: E731
    for fn in both(f):
        out = fn(x)
        assert float(out.scale) == 2.0**30
        np.testing.assert_array_equal(
            np.asarray(out.data, np.float32), np.asarray(lax.pad(x.data, jnp.zeros((), dtype), PAD_CONFIG), np.float32)
        )


def test_pad_static_nonzero_and_traced_plain_value_in_operand_scale():
    x = scaled(X, 2.0**-4)
    f = lambda x: lax.pad(x, jnp.asarray(0.75, x.dtype), PAD_CONFIG)  # noqa: E731
    g = lambda x, v: lax.pad(x, v, PAD_CONFIG)  # noqa: E731
    v = jnp.asarray(0.375, np.float16)
    for fn in both(f):
        out = fn(x)
        assert float(out.scale) == 2.0**-4
        assert_close(out, oracle(f, x), np.float16, atol=2.0**-18)
    for fn in both(g):
        out = fn(x, v)
        assert float(out.scale) == 2.0**-4
        assert_close(out, oracle(g, x, v), np.float16, atol=2.0**-18)


def test_pad_static_minus_inf_at_extreme_scale():
    x = scaled(X, 2.0**-60)
    f = lambda x: lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), ((1, 1, 0), (0, 0, 0), (0, 0, 0)))  # noqa: E731
    out = jax.jit(sfy.scalify(f))(x)
    assert float(out.scale) == 2.0**-60
    vals = np.asarray(out.data, np.float64) * float(out.scale)
    assert np.all(vals[0] == -np.inf) and np.all(vals[-1] == -np.inf)
    np.testing.assert_array_equal(vals[1:-1], np.asarray(x.data, np.float64) * 2.0**-60)


def test_pad_with_scaled_value_aligns_to_larger_scale():
    g = lambda x, v: lax.pad(x, v, PAD_CONFIG)  # noqa: E731
    x = scaled(X, 2.0**-4)
    v = scaled(1.5, 2.0**3)
    for fn in both(g):
        out = fn(x, v)
        assert_gathered_scale(out, np.float16, 2.0**-4, 2.0**3)
        assert_close(out, oracle(g, x, v), np.float16, atol=2.0**3 * 2.0**-14)
    # a plain operand padded with a scaled value: the larger scale is the plain one's 1
    p = jnp.asarray(X, np.float16)
    small = scaled(1.5, 2.0**-8)
    out = sfy.scalify(g)(p, small)
    assert isinstance(out, sfy.ScaledArray)
    assert_gathered_scale(out, np.float16, 1.0, 2.0**-8)
    assert_close(out, oracle(g, p, small), np.float16, atol=2.0**-14)


def test_jnp_pad_modes():
    x = scaled(X, 2.0**-30)
    for f in (lambda x: jnp.pad(x, 1), lambda x: jnp.pad(x, ((1, 2), (0, 1), (0, 0)), mode="edge")):
        out = jax.jit(sfy.scalify(f))(x)
        assert float(out.scale) == 2.0**-30
        assert_close(out, oracle(f, x), np.float16)


def _mesh():
    if len(jax.devices()) < 2:
        pytest.skip("needs several (simulated) devices")
    n = len(jax.devices())
    return jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,))


def test_sharding_constraint_applies_to_data():
    mesh = _mesh()
    sh = NamedSharding(mesh, PartitionSpec("x"))
    n = len(jax.devices())
    x = scaled(RNG.standard_normal((2 * n, 3)), 2.0**40)
    f = lambda x: lax.with_sharding_constraint(x, sh)  # noqa: E731
    out = jax.jit(sfy.scalify(f))(x)
    assert out.data.sharding.is_equivalent_to(sh, 2)
    assert float(out.scale) == 2.0**40
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data))


def test_device_put_moves_data_and_scale():
    if len(jax.devices()) < 2:
        pytest.skip("needs several (simulated) devices")
    dev = jax.devices()[1]
    x = scaled(X, 2.0**-9)
    y = jnp.asarray(X, np.float16)
    out, plain = sfy.scalify(lambda a, b: jax.device_put((a, b), dev))(x, y)
    assert out.data.devices() == {dev} and out.scale.devices() == {dev}
    assert plain.devices() == {dev} and not isinstance(plain, sfy.ScaledArray)
    assert float(out.scale) == 2.0**-9
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data))


def test_device_put_named_sharding_replicates_scale():
    mesh = _mesh()
    n = len(jax.devices())
    sh = NamedSharding(mesh, PartitionSpec("x"))
    x = scaled(RNG.standard_normal((n, 2)), 2.0**7)
    out = sfy.scalify(lambda a: jax.device_put(a, sh))(x)
    assert out.data.sharding.is_equivalent_to(sh, 2)
    assert out.scale.sharding.is_fully_replicated and len(out.scale.devices()) == n
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x.data))


def test_reshape_rounds_an_unrounded_chain_where_devices_share_the_program():
    """An elementwise chain's float32 result (`Wide`) is reshaped unrounded on one device,
    and rounded to its float16 data first where devices share the program: a reshape is
    where XLA's partitioner moves data between devices, and it must move 16 bits."""
    x = sfy.ScaledArray(jnp.ones((4, 6), jnp.float16), jnp.float32(2.0))
    y = sfy.ScaledArray(jnp.full((4, 6), 0.5, jnp.float16), jnp.float32(4.0))

    def fn(x, y):
        return (x * y + x).reshape(24)

    def reshaped_dtype(narrow):
        with sfy.ScalifyConfig(narrow_contractions=narrow):
            jaxpr = jax.make_jaxpr(sfy.scalify(fn))(x, y).jaxpr
        (eqn,) = [e for e in jaxpr.eqns if e.primitive is jax.lax.reshape_p]
        return eqn.invars[0].aval.dtype

    assert reshaped_dtype(False) == jnp.float32
    assert reshaped_dtype(True) == jnp.float16
    with sfy.ScalifyConfig(narrow_contractions=True):
        out = sfy.scalify(fn)(x, y)
    np.testing.assert_array_equal(np.asarray(sfy.asarray(out, dtype=jnp.float32)), np.full(24, 6.0))
