"""Deferred narrow rounding (`scalify.core.wide.Wide`): elementwise chains with
float16/float8 results hand float32 results on, and round and range-guard once, where a
rule that is not elementwise (or the output) reads them.

Checked here: fewer guard reductions in GELU and layer norm (forward and backward), the
same output dtypes as without deferral, finite and accurate long chains of products of
outlier or drifted data (the static data bounds), casts out of a chain, observers seeing
ScaledArrays, and the `ScalifyConfig(defer_rounding=False)` switch.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Jaxpr, Literal

import scalify as sfy
from scalify.core import interpreter, walker
from scalify.core.formats import format_bounds
from scalify.core.wide import WIDE_HI, WIDE_LO, Wide

RNG = np.random.default_rng(0)


def _heavy(shape=(16, 32), outlier=300.0, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[0, 0] = outlier
    return x


def _f16(x, scale=None):
    if scale is None:
        return sfy.as_scaled_array(jnp.asarray(x), dtype=jnp.float16)
    return sfy.ScaledArray(jnp.asarray(np.asarray(x) / scale, jnp.float16), jnp.float32(scale))


def _live_counts(jaxpr: Jaxpr) -> collections.Counter:
    """Primitive counts of the equations ``jaxpr``'s outputs depend on (the dead primal
    outputs of a gradient left out), sub-jaxprs counted whole."""
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    counts: collections.Counter = collections.Counter()
    for e in reversed(jaxpr.eqns):
        if not any(v in live for v in e.outvars) and not e.effects:
            continue
        live.update(v for v in e.invars if not isinstance(v, Literal))
        counts[e.primitive.name] += 1
        counts.update(_sub_counts(e))
    return counts


def _sub_counts(e) -> collections.Counter:
    """Primitive counts of an equation's sub-jaxprs, whole."""
    counts: collections.Counter = collections.Counter()
    for sub in walker.sub_jaxprs(e.params):
        for s in sub.eqns:
            counts[s.primitive.name] += 1
            counts.update(_sub_counts(s))
    return counts


def _guards(f, *args, defer=True, narrow=False):
    """Max-abs reductions in the traced scalified program (each range guard is one), on
    one device's program unless ``narrow`` (`ScalifyConfig.narrow_contractions`: sums
    shared by devices)."""
    with sfy.ScalifyConfig(defer_rounding=defer, narrow_contractions=narrow):
        closed = jax.make_jaxpr(sfy.scalify(f))(*args)
    return _live_counts(closed.jaxpr)["reduce_max"]


def layer_norm(x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g + b


X = _f16(RNG.standard_normal((16, 32)))
G = _f16(1.0 + 0.1 * RNG.standard_normal(32))
B = _f16(0.1 * RNG.standard_normal(32))
W = jnp.arange(32.0)

CHAINS = {
    # name: (function, arguments, guards without deferral, guards with deferral)
    "gelu": (jax.nn.gelu, (X,), 2, 1),
    "gelu grad": (jax.grad(lambda x: jnp.sum(jax.nn.gelu(x).astype(jnp.float32) * W)), (X,), 7, 3),
    "layer norm": (layer_norm, (X, G, B), 6, 3),
    "layer norm grad": (
        jax.grad(lambda x, g, b: jnp.sum(layer_norm(x, g, b).astype(jnp.float32) * W), argnums=(0, 1, 2)),
        (X, G, B), 14, 9,
    ),
    "x * y + z": (lambda x, y, z: x * y + z, (X, X, X), 1, 1),
    # jnp.sum of float16 sums in float32: the guard left is that of the float16 cast of
    # the (small) float32 sum; the product is never measured.
    "sum of a product": (lambda x, y: jnp.sum(x * y, axis=-1), (X, X), 2, 1),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_one_guard_per_chain(name):
    """The guard reductions of a traced GELU / layer norm, without and with deferral:
    a chain of products measures once, where a rule that is not elementwise reads it,
    and a measured sum of a product never does."""
    f, args, before, after = CHAINS[name]
    assert _guards(f, *args, defer=False) == before
    assert _guards(f, *args) == after


def test_sum_of_a_product_shared_by_devices_measures_its_group_sums():
    """Where devices share a sum (`narrow_contractions`), the layer norm gain's gradient,
    a measured sum of a product over the batch, is summed in float32 per group of the
    batch and only the group sums are rounded, range-guarded: one guard more, on a
    tensor of (groups, features), never on the product."""
    f, args, _, after = CHAINS["layer norm grad"]
    with sfy.ScalifyConfig(narrow_contractions=True):
        closed = jax.make_jaxpr(sfy.scalify(f))(*args)
    shapes = [e.invars[0].aval.shape for e in closed.jaxpr.eqns if e.primitive.name == "reduce_max"]
    groups = int(np.gcd(X.shape[0], jax.device_count()))
    assert _guards(f, *args, narrow=True) == after + (groups > 1)
    assert ((groups, X.shape[1]) in shapes) == (groups > 1), shapes


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_same_values_and_dtypes_with_and_without_deferral(name):
    """Deferral changes when results are rounded, not what they are: same output
    structure, data and scale dtypes (those of the plain function), and values within
    float16 tolerance of each other and of float32."""
    f, args, _, _ = CHAINS[name]
    got = jax.jit(sfy.scalify(f))(*args)
    with sfy.ScalifyConfig(defer_rounding=False):
        ref = jax.jit(sfy.scalify(f))(*args)
    plain = jax.eval_shape(f, *[sfy.asarray(a) for a in args])
    want = f(*sfy.asarray(args, dtype=jnp.float32))
    is_scaled = lambda v: isinstance(v, sfy.ScaledArray)  # noqa: E731
    assert jax.tree.structure(got, is_leaf=is_scaled) == jax.tree.structure(ref, is_leaf=is_scaled)
    assert jax.tree.structure(got, is_leaf=is_scaled) == jax.tree.structure(plain)
    leaves = zip(jax.tree.leaves(got, is_leaf=is_scaled), jax.tree.leaves(ref, is_leaf=is_scaled),
                 jax.tree.leaves(plain), jax.tree.leaves(want))
    for g, r, p, w in leaves:
        assert type(g) is type(r)
        if isinstance(g, sfy.ScaledArray):  # (a gradient that folds to a constant is plain)
            assert g.scale.dtype == r.scale.dtype == np.float32 and g.scale.shape == ()
            assert g.data.dtype == r.data.dtype == p.dtype
        assert g.dtype == r.dtype == p.dtype
        g, r, w = (np.asarray(sfy.asarray(v, dtype=jnp.float32), np.float64) for v in (g, r, w))
        tol = 1e-2 * np.abs(w).max()
        np.testing.assert_allclose(g, w, atol=tol)
        np.testing.assert_allclose(g, r, atol=tol)


def _check(fn, *args, rtol=2e-3):
    got = np.asarray(sfy.asarray(jax.jit(sfy.scalify(fn))(*args), dtype=jnp.float32), np.float64)
    want = np.asarray(fn(*sfy.asarray(args, dtype=jnp.float32)), np.float64)
    finite = np.isfinite(want)
    assert finite.all()
    assert np.all(np.isfinite(got)), f"{int((~np.isfinite(got)).sum())} non-finite"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < rtol, err


def _product_chain(n):
    def f(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out
    return f


@pytest.mark.parametrize("n", [2, 5, 10])
def test_chain_of_products_of_outlier_data_stays_finite(n):
    """Products of float16 data near the format's top (an outlier of 60000 beside data
    of size 2**10, at scale 2**-10: values near 1, one of 58): ten products' float32
    data would reach 2**159, beyond float32, while their values stay below 2**59. Each
    product's data bound adds 17 bits, so the chain is materialised (guarded) before
    its float32 data can overflow: finite and accurate."""
    def data(i):
        d = np.random.default_rng(i).standard_normal((16, 32)) * 2.0**10
        d[0, 0] = 60000.0
        return _f16(d * 2.0**-10, scale=2.0**-10)

    xs = [data(i) for i in range(n)]
    assert float(np.abs(xs[0].data.astype(np.float32)).max()) == 60000.0
    _check(_product_chain(n), *xs)


def test_chain_of_products_of_drifted_data_keeps_its_precision():
    """Data drifted far below its scale (max-abs below 2**-17, at scale 2**20: values
    near 1.5): eight products' float32 data would be near 2**-155, where float32 flushes
    to zero; the lower data bound materialises (guards, lifting the data) first, so the
    result is accurate."""
    xs = [_f16(RNG.standard_normal((16, 32)) * 0.25 + 1.5, scale=2.0**20) for _ in range(8)]
    assert float(np.abs(xs[0].data.astype(np.float32)).max()) < 2.0**-17
    _check(_product_chain(8), *xs)


def test_a_square_of_a_big_sum_stays_finite():
    """A sum whose data bound grows (x + x + ...) squared: finite and accurate."""
    x = _f16(_heavy())

    def f(x):
        s = x
        for _ in range(6):
            s = s + x
        return (s * s) * s

    _check(f, x)


def test_wide_values_respect_the_bound_limits():
    """Every `Wide` value a rule hands on has bounds inside the float32 chain's limits
    (checked on the values the interpreter passes between rules)."""
    seen = []
    original = interpreter.eval_equation

    def spy(eqn, invals):
        outs = original(eqn, invals)
        seen.extend(o for o in outs if isinstance(o, Wide))
        return outs

    interpreter.eval_equation = spy
    try:
        f = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x * x * x).astype(jnp.float32) * W))
        jax.make_jaxpr(sfy.scalify(f))(X)
    finally:
        interpreter.eval_equation = original
    assert seen
    for w in seen:
        if w.dtype == np.float16 and w.hi != format_bounds(np.float32)[0]:
            assert WIDE_LO <= w.lo and w.hi <= WIDE_HI, (w.hi, w.lo)


def test_cast_to_float32_keeps_the_float32_data():
    """A chain cast to float32 is not rounded to float16 on the way (XLA's excess
    precision): ``(x * c).astype(float32)`` is the float32 product of the float16 data
    and constant, where a float16 rounding would differ."""
    x = _f16(RNG.standard_normal(64))
    c = np.float16(1 / 3)
    out = jax.jit(sfy.scalify(lambda x: (x * c + x).astype(jnp.float32)))(x)
    assert out.data.dtype == np.float32
    v = np.asarray(x.data, np.float32) * np.float32(x.scale)
    want = v * np.float32(c) + v
    got = np.asarray(sfy.asarray(out, dtype=jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with sfy.ScalifyConfig(defer_rounding=False):
        rounded = np.asarray(sfy.asarray(jax.jit(sfy.scalify(lambda x: (x * c + x).astype(jnp.float32)))(x)))
    assert np.abs(rounded - want).max() > np.abs(got - want).max()


def test_float8_casts_round_as_written():
    """A chain cast to float8 and back is quantised to float8: deferral skips no float8
    rounding (those are deliberate). Every value of the result has at most float8
    E4M3's 3 mantissa bits."""
    x = _f16(RNG.standard_normal(256))
    out = jax.jit(sfy.scalify(lambda x: (x * 1.5 + x).astype(jnp.float8_e4m3fn).astype(jnp.float16)))(x)
    assert out.data.dtype == np.float16
    v = np.asarray(sfy.asarray(out, dtype=jnp.float32), np.float64)
    v = v[v != 0]
    mantissa = v / 2.0 ** np.floor(np.log2(np.abs(v)))
    np.testing.assert_array_equal(mantissa * 8, np.round(mantissa * 8))
    want = np.asarray(sfy.asarray(x, dtype=jnp.float32)) * 2.5
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)), want, rtol=2.0**-4, atol=1e-2)


def test_observers_see_scaled_arrays():
    """Telemetry and other observers see materialised ScaledArrays, never Wide values."""
    kinds = set()

    def observer(eqn, invals, outvals):
        kinds.update(type(v).__name__ for v in (*invals, *outvals))

    with interpreter.observe(observer):
        jax.make_jaxpr(sfy.scalify(layer_norm))(X, G, B)
    assert "Wide" not in kinds and "ScaledArray" in kinds


def test_the_switch():
    assert sfy.ScalifyConfig().defer_rounding is True
    with pytest.raises(TypeError):
        sfy.ScalifyConfig(defer_rounding=1)


def test_casts_placing_nothing_defer():
    """The casts in jnp.mean's backward carry a sharding over the empty mesh (JAX's
    default): they place nothing, so they defer; a sharding over mesh axes does not."""
    from scalify.rules.elementwise import _places

    f = jax.grad(lambda x: jnp.sum(jnp.mean(x * x, axis=-1, keepdims=True).astype(jnp.float32)))
    params = [e.params.get("sharding") for e in jax.make_jaxpr(f)(sfy.asarray(X)).jaxpr.eqns
              if e.primitive.name == "convert_element_type"]
    assert any(p is not None for p in params)
    assert not any(_places(p) for p in params)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
    assert _places(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def test_every_reader_sees_a_value_another_reader_materialised():
    """GELU's derivative computes ``v + v * t`` with ``t = tanh(...) = -1`` for large
    negative inputs: the product's rule materialises ``v`` (its data bounds would leave
    float32's range), and the sum must then read that same rounded ``v``, so that the
    two cancel exactly as in float32. Read unrounded beside it, the sum kept ``v``'s
    rounding error, multiplied by ``3 * 0.0447 * x**2`` into gradients of 1e3 where
    float32's are 0."""
    x = np.concatenate([-np.geomspace(8.0, 1100.0, 16), np.geomspace(8.0, 1100.0, 16)]).astype(np.float32)
    w = (1 + np.arange(32) / 32).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x).astype(jnp.float32) * w))
    xs = _f16(x, 512.0)
    got = np.asarray(sfy.asarray(jax.jit(sfy.scalify(grad))(xs), jnp.float32))
    want = np.asarray(grad(sfy.asarray(xs, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=2.0**-9, atol=2.0**-9 * np.abs(want).max())


@pytest.mark.parametrize("through", ["add", "mul"])
def test_chain_after_a_selection_of_distant_scales_keeps_its_placement(through):
    """A selection among operands of distinct scales is rounded with its largest element
    at the top of the guard band, leaving the format's range below it to the smaller
    operand's elements. A chain that reads it (``+ 0``, ``* 2``) and is rounded later,
    where a gather reads it, is rounded the same way: in float8 E4M3, the elements
    2**-11 below the largest of ``where(m, x, y)`` survive (as subnormals, exactly),
    and ``rsqrt`` of them is finite and accurate."""
    from tests.utils import scaled

    e4m3 = jnp.float8_e4m3fn
    x = scaled(np.array([[1.5, -1.25, 1.0, 1.75]], np.float32), 2.0**6, e4m3)
    y = scaled(np.array([[1.0, 1.5, -1.0, 1.0]], np.float32), 2.0**-5, e4m3)
    m = jnp.array([[True, False, False, True]])
    other = {"add": lambda v: v + jnp.zeros_like(v), "mul": lambda v: v * 2.0}[through]

    def f(x, y):
        return jax.lax.rsqrt(jnp.abs(other(jnp.where(m, x, y))[jnp.array([0])]))

    got = np.asarray(sfy.asarray(jax.jit(sfy.scalify(f))(x, y), dtype=jnp.float32))
    want = np.asarray(f(sfy.asarray(x, dtype=jnp.float32), sfy.asarray(y, dtype=jnp.float32)))
    assert np.all(np.isfinite(got)), got
    np.testing.assert_allclose(got, want, rtol=2.0**-4)
