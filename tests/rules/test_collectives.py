"""Collectives under `jax.shard_map` / `jax.pmap` on 8 simulated CPU devices: each device
holds its own scale; collectives agree on ``pmax(scale)`` before combining data, psum
moves ``pow2(sqrt(n))`` into the scale, ppermute moves data and scale together, and
`shard_map` itself runs scalified with replicated scales."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import scalify as sfy
from tests.utils import assert_pow2_scales, count_eqns

N = 8
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < N:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return jax.make_mesh((N,), ("x",))


# `as_scaled_array` to float16 data, jitted: one compilation instead of one per eager op.
to_f16_scaled = jax.jit(lambda tree: sfy.as_scaled_array(tree, dtype=jnp.float16))


def sharded(mesh, values, spec=P("x")):
    return jax.device_put(jnp.asarray(values), NamedSharding(mesh, spec))


def local_scaled(block, dtype=jnp.float16):
    """A device's block as a ScaledArray whose scale depends on the device:
    ``2**(3 i - 12)`` on device ``i`` (so data ``block / scale`` is near unit size)."""
    s = jnp.exp2((3 * lax.axis_index("x") - 12).astype(jnp.float32))
    return sfy.ScaledArray((block / s).astype(dtype), s)


def device_values(shape):
    """Global float32 values whose block on device ``i`` has magnitude ``2**(3 i - 12)``."""
    v = RNG.standard_normal(shape).astype(np.float32)
    rows = shape[0] // N
    mags = np.repeat(2.0 ** (3 * np.arange(N) - 12), rows).astype(np.float32)
    return v * mags.reshape((-1,) + (1,) * (len(shape) - 1))


def close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=4e-3, atol=4e-3 * np.abs(want).max())


CYCLE = [(i, (i + 1) % N) for i in range(N)]
COLLECTIVES = {
    "psum": (lambda v: lax.psum(v, "x"), P()),
    "pmean": (lambda v: lax.pmean(v, "x"), P()),
    "pmax": (lambda v: lax.pmax(v, "x"), P()),
    "pmin": (lambda v: lax.pmin(v, "x"), P()),
    "all_gather": (lambda v: lax.all_gather(v, "x"), P("x")),
    "all_gather_tiled": (lambda v: lax.all_gather(v, "x", axis=1, tiled=True), P("x")),
    "all_to_all": (lambda v: lax.all_to_all(v, "x", 1, 0, tiled=True), P("x")),
    "ppermute_cycle": (lambda v: lax.ppermute(v, "x", CYCLE), P("x")),
    "ppermute_partial": (lambda v: lax.ppermute(v, "x", [(0, 1), (5, 2)]), P("x")),
    "psum_scatter": (lambda v: lax.psum_scatter(v, "x", scatter_dimension=1, tiled=True), P("x")),
}


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", sorted(COLLECTIVES))
def test_collective_with_per_device_scales(mesh, name, check_vma):
    """jit(scalify(collective)) inside shard_map on float16 data whose scale differs on
    each device (2**-12 ... 2**9) equals the float32 collective of the same values."""
    coll, spec = COLLECTIVES[name]

    def body(block):
        x = local_scaled(block)
        want = coll(sfy.asarray(x, dtype=jnp.float32))
        out = jax.jit(sfy.scalify(coll))(x)
        assert isinstance(out, sfy.ScaledArray) and out.dtype == jnp.float16
        return want, sfy.asarray(out, dtype=jnp.float32), out.scale[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"),
                               out_specs=(spec, spec, P("x")), check_vma=check_vma))
    want, got, scales = fn(sharded(mesh, device_values((2 * N, N))))
    close(got, want)
    assert np.all(np.isfinite(np.asarray(got)))
    assert_pow2_scales(sfy.ScaledArray(jnp.zeros(()), jnp.max(scales)))
    assert all(float(s) == 2.0 ** np.round(np.log2(float(s))) for s in np.asarray(scales))


def test_psum_scale_is_common_scale_times_pow2_sqrt_n(mesh):
    """psum over 8 devices: output scale = max device scale (2**9) * pow2(sqrt(8)) = 2**10,
    the same on every device; psum_scatter likewise."""

    def body(block):
        x = local_scaled(block)
        return (sfy.scalify(lambda v: lax.psum(v, "x"))(x).scale[None],
                sfy.scalify(lambda v: lax.psum_scatter(v, "x", tiled=True))(x).scale[None])

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    for scales in fn(sharded(mesh, device_values((N * N, 4)))):
        np.testing.assert_array_equal(np.asarray(scales), np.full(N, 2.0**10, np.float32))


def test_psum_keeps_extreme_range(mesh):
    """Values around 1e-30 (device scales 2**-110 ... 2**-89) in float16 data survive a
    psum: no underflow, no NaN, same values as float32."""
    v = RNG.standard_normal((N, 4)).astype(np.float32)

    def body(block):
        s = jnp.exp2((3 * lax.axis_index("x") - 110).astype(jnp.float32))
        x = sfy.ScaledArray(block.astype(jnp.float16), s)
        want = lax.psum(sfy.asarray(x, dtype=jnp.float32), "x")
        out = sfy.scalify(lambda t: lax.psum(t, "x"))(x)
        return want, out.data.astype(jnp.float32), out.scale

    want, data, scale = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P(),
                                              check_vma=False))(sharded(mesh, v))
    values = np.asarray(data, np.float64) * float(scale)
    assert np.all(np.abs(np.asarray(data)) > 1e-3) and float(scale) < 1e-20
    np.testing.assert_allclose(values, np.asarray(want, np.float64), rtol=4e-3,
                               atol=4e-3 * np.abs(np.asarray(want)).max())


def _psum_jaxpr(mesh, make_scale, check_vma, in_spec=P("x")):
    def body(block, s):
        x = sfy.ScaledArray(block.astype(jnp.float16), make_scale(s))
        return sfy.asarray(sfy.scalify(lambda t: lax.psum(t, "x"))(x))

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), in_spec), out_specs=P(),
                       check_vma=check_vma)
    x = jax.ShapeDtypeStruct((N, 4), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    s = jax.ShapeDtypeStruct((N,) if in_spec == P("x") else (), jnp.float32,
                             sharding=NamedSharding(mesh, in_spec))
    return jax.make_jaxpr(fn)(x, s).jaxpr


@pytest.mark.parametrize("check_vma", [True, False])
def test_scale_agreement_communicates_only_when_needed(mesh, check_vma):
    """A static scale (a NumPy constant) is common without any pmax; a per-device traced
    scale takes exactly one scalar pmax; under check_vma a replicated scale takes none."""
    assert count_eqns(_psum_jaxpr(mesh, lambda s: np.float32(0.5), check_vma), "pmax") == 0
    assert count_eqns(_psum_jaxpr(mesh, lambda s: s[0], check_vma), "pmax") == 1
    replicated = _psum_jaxpr(mesh, lambda s: s, check_vma, in_spec=P())
    assert count_eqns(replicated, "pmax") == (0 if check_vma else 1)


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_inside_scalify(mesh, check_vma):
    """jit(scalify(shard_map(f))) on a ScaledArray whose data is sharded: inside, each
    device rescales its block (per-device scales), then psum / all_gather / ppermute;
    sharded outputs come back as one ScaledArray with a replicated power-of-two scale."""

    def f(a, w):
        a = sfy.ops.dynamic_rescale_l2(a)
        h = jnp.tanh(a @ w)
        total = lax.psum(jnp.sum(h * h, axis=0), "x")
        gathered = lax.all_gather(h[:1], "x", tiled=True)
        moved = lax.ppermute(a * 3.0, "x", CYCLE)
        return total, gathered, moved, lax.axis_index("x")[None]

    specs = (P(), P("x"), P("x"), P("x"))
    smap = jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P()), out_specs=specs,
                         check_vma=check_vma)
    a_val = device_values((2 * N, 6))
    w_val = RNG.standard_normal((6, 5)).astype(np.float32) / np.sqrt(6)
    a = sfy.ScaledArray(sharded(mesh, (a_val / 2.0**9).astype(np.float16)), jnp.float32(2.0**9))
    w = to_f16_scaled(jnp.asarray(w_val))
    outs = jax.jit(sfy.scalify(smap))(a, w)
    want = smap(*sfy.asarray((a, w), dtype=jnp.float32))
    for o, ref in zip(outs[:3], want[:3]):
        assert isinstance(o, sfy.ScaledArray) and o.dtype == jnp.float16
        assert np.shape(o.scale) == ()
        close(sfy.asarray(o, dtype=jnp.float32), ref)
    assert_pow2_scales(outs)
    np.testing.assert_array_equal(np.asarray(outs[3]), np.arange(N))
    assert outs[2].data.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 2)


def test_shard_map_inside_scalify_static_scale_stays_static(mesh):
    """A ScaledArray with a NumPy scale passes through shard_map with its scale static
    (known at trace time, no scale leaf crosses the shard_map boundary)."""
    seen = []

    def observer(eqn, invals, outvals):
        if eqn.primitive.name == "shard_map":
            seen.append(outvals[0].scale)

    smap = jax.shard_map(lambda a: -(a * a), mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    a = sfy.ScaledArray(sharded(mesh, np.ones((N, 2), np.float16)), np.float32(4.0))
    # The static estimate (``a * a`` is range-guarded by default: a measured scale).
    with sfy.core.interpreter.observe(observer), sfy.ScalifyConfig(range_guard=False):
        out = sfy.scalify(smap)(a)
    assert len(seen) == 1 and isinstance(seen[0], (np.ndarray, np.generic))
    assert float(seen[0]) == 16.0
    np.testing.assert_array_equal(np.asarray(sfy.asarray(out, dtype=jnp.float32)), -16.0)


def test_pmap_both_ways_and_axis_index_groups(mesh):
    """pmap(scalify(f)) and scalify(pmap(f)) (pmap is jit + shard_map) match float32;
    axis_index_groups are forwarded (psum over groups of 4: n = 4, pow2(sqrt(4)) = 2)."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def f(a):
        return lax.psum(a, "i"), lax.psum(a, "i", axis_index_groups=groups), lax.pmax(a, "i")

    v = device_values((N, 3))
    want = jax.pmap(f, axis_name="i")(v)

    def inner(a):
        x = sfy.ScaledArray((a / 4.0).astype(jnp.float16), jnp.float32(4.0))
        out = sfy.scalify(lambda t: f(sfy.ops.dynamic_rescale_l2(t)))(x)
        return [sfy.asarray(o, dtype=jnp.float32) for o in out] + [out[1].scale]

    got = jax.pmap(inner, axis_name="i")(jnp.asarray(v))
    for g, w in zip(got[:3], want):
        close(g, w)
    # per-device scales differ (rescaled per device); the group psum agrees per group.
    group_scales = np.asarray(got[3])
    assert len(set(group_scales[:4])) == 1 and len(set(group_scales[4:])) == 1
    assert group_scales[0] < group_scales[4]

    x = to_f16_scaled(jnp.asarray(v))
    outs = sfy.scalify(jax.pmap(f, axis_name="i"))(x)
    for o, w in zip(outs, want):
        assert isinstance(o, sfy.ScaledArray)
        close(sfy.asarray(o, dtype=jnp.float32), w)


def test_vmap_named_axis_psum_is_positional_sum():
    """vmap with an axis name turns psum into a positional reduction: n = batch size."""
    v = RNG.standard_normal((N, 3)).astype(np.float32)
    x = to_f16_scaled(jnp.asarray(v))
    out = sfy.scalify(jax.vmap(lambda a: lax.psum(a, "i"), axis_name="i"))(x)
    close(sfy.asarray(out, dtype=jnp.float32), np.broadcast_to(v.sum(0), v.shape))
    assert float(out.scale) == float(x.scale) * 2.0  # pow2(sqrt(8)) = 2


def test_pbroadcast_and_ragged_all_to_all_trace(mesh):
    """pbroadcast and ragged_all_to_all have no CPU lowering: check the scalified trace.
    pbroadcast sends the scale with the data; ragged_all_to_all agrees on pmax(scale)."""

    def bcast(block):
        return sfy.asarray(sfy.scalify(lambda t: lax.pbroadcast(t, "x", 3))(local_scaled(block)))

    def ragged(block):
        z = jnp.zeros((N,), jnp.int32)

        def g(t):
            return lax.ragged_all_to_all(t, jnp.zeros_like(t), z, z + 1, z, z + 1, axis_name="x")

        out = sfy.scalify(g)(local_scaled(block))
        assert isinstance(out, sfy.ScaledArray) and out.shape == block.shape
        return sfy.asarray(out)

    x = sharded(mesh, device_values((2 * N, 4)))
    j = jax.make_jaxpr(jax.shard_map(bcast, mesh=mesh, in_specs=P("x"), out_specs=P("x"),
                                     check_vma=False))(x).jaxpr
    assert count_eqns(j, "pbroadcast") == 2
    j = jax.make_jaxpr(jax.shard_map(ragged, mesh=mesh, in_specs=P("x"), out_specs=P("x"),
                                     check_vma=False))(x).jaxpr
    assert count_eqns(j, "ragged_all_to_all") == 1 and count_eqns(j, "pmax") == 1


# --- a data-parallel training step ----------------------------------------------------------


def init_mlp(sizes=(6, 16, 3)):
    return [
        (RNG.standard_normal((a, b)).astype(np.float32) / np.sqrt(a), np.zeros(b, np.float32))
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


def loss_fn(params, x, y):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def sgd(params, grads, lr=0.1):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


@pytest.mark.parametrize("check_vma", [True, False])
def test_data_parallel_training_step(mesh, check_vma):
    """A data-parallel SGD step of an MLP (batch sharded over 8 devices, gradients
    averaged with pmean, or by JAX's implicit psum of replicated parameters under
    check_vma) under jit(scalify(...)) with float16 ScaledArrays equals the float32
    single-device step."""
    params = init_mlp()
    x = RNG.standard_normal((4 * N, 6)).astype(np.float32)
    y = RNG.standard_normal((4 * N, 3)).astype(np.float32)

    def local_grads(p, xb, yb):
        if check_vma:  # grads of replicated params are summed over devices by JAX
            return jax.tree.map(lambda g: g / N, jax.grad(loss_fn)(p, xb, yb))
        return lax.pmean(jax.grad(loss_fn)(p, xb, yb), "x")

    def step(p, xb, yb):
        grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P("x"), P("x")),
                              out_specs=P(), check_vma=check_vma)(p, xb, yb)
        return sgd(p, grads)

    want = jax.jit(lambda p: sgd(p, jax.grad(loss_fn)(p, x, y)))(params)  # one device, float32
    sp, sx, sy = to_f16_scaled((params, sharded(mesh, x), sharded(mesh, y)))
    got = jax.jit(sfy.scalify(step))(sp, sx, sy)
    leaves = jax.tree.leaves(got, is_leaf=sfy.core.is_scaled_leaf)
    assert all(isinstance(leaf, sfy.ScaledArray) and leaf.dtype == jnp.float16 for leaf in leaves)
    assert_pow2_scales(got)
    for g, w, p0 in zip(jax.tree.leaves(sfy.asarray(got, dtype=jnp.float32)), jax.tree.leaves(want),
                        jax.tree.leaves(params)):
        # compare the update (the change of each parameter), not only the parameters
        update, want_update = np.asarray(g) - p0, np.asarray(w) - p0
        # New parameters are stored in float16: each carries a rounding error of up to
        # one float16 ulp of the parameter itself (2**-10 relative), on top of the
        # update's own tolerance.
        np.testing.assert_allclose(update, want_update, rtol=3e-2,
                                   atol=3e-2 * np.abs(want_update).max() + 2.0**-10 * np.abs(p0).max())


# --- GSPMD: jit with sharded ScaledArray data, no shard_map ---------------------------------


def test_gspmd_jit_on_sharded_scaled_arrays(mesh):
    """jax.jit(scalify(f)) on ScaledArrays whose data are sharded with NamedSharding and
    whose scales are replicated scalars: XLA partitions the scalified program (GSPMD);
    values match float32 and the batch sharding of the data is kept."""
    xv = RNG.standard_normal((2 * N, 6)).astype(np.float32) * 1e-3
    wv = RNG.standard_normal((6, 5)).astype(np.float32) / np.sqrt(6)

    def f(x, w):
        h = jnp.tanh(x @ w)
        return h * 2.0, jnp.sum(h, axis=0)

    x, w = to_f16_scaled((sharded(mesh, xv), sharded(mesh, wv, P())))
    assert x.data.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 2)
    assert np.shape(x.scale) == ()
    h, s = jax.jit(sfy.scalify(f))(x, w)
    want_h, want_s = f(*sfy.asarray((x, w), dtype=jnp.float32))
    close(sfy.asarray(h, dtype=jnp.float32), want_h)
    close(sfy.asarray(s, dtype=jnp.float32), want_s)
    assert h.data.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 2)
    assert h.scale.sharding.is_fully_replicated
    assert_pow2_scales((h, s))
