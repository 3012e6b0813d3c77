"""scalify.ops casts: real saturating casts and simulated casts, checked bit for bit
against ml_dtypes over every code of each format and around every boundary."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import scalify as sfy
from scalify.ops.cast import _xla_can_cast, saturating_cast, simulated_cast
from tests.utils import assert_close, scaled

# Every narrow float format of ml_dtypes with a sign and a mantissa (float8_e8m0fnu is an
# exponent-only scale format, rejected), plus float16/bfloat16 as targets.
FORMATS = [
    getattr(ml_dtypes, n)
    for n in [
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "float8_e3m4",
        "float8_e4m3",
        "float4_e2m1fn",
        "float6_e2m3fn",
        "float6_e3m2fn",
    ]
    if hasattr(ml_dtypes, n)
] + [np.float16, ml_dtypes.bfloat16]
FLOAT8 = [f for f in FORMATS if np.dtype(f).itemsize == 1 and np.dtype(f).name.startswith("float8")]
NO_NAN = {"float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"}  # formats without a NaN code
IDS = [np.dtype(f).name for f in FORMATS]

RNG = np.random.default_rng(0)


def nbits(dtype):
    return {"float4_e2m1fn": 4, "float6_e2m3fn": 6, "float6_e3m2fn": 6}.get(np.dtype(dtype).name, 8 * np.dtype(dtype).itemsize)


def all_values(dtype):
    """The float32 value of every code of ``dtype`` (NaNs included)."""
    n = nbits(dtype)
    codes = np.arange(2**n, dtype=np.uint16 if n > 8 else np.uint8)
    return codes.view(dtype).astype(np.float32)


def boundary_values(dtype):
    """Every representable value, every halfway point between neighbours (ties), the
    float32 neighbours of both, and specials: max and beyond, min normal, min subnormal
    and its half (a tie to zero), zeros, infinities, NaN, huge and tiny values."""
    v = np.unique(all_values(dtype)[np.isfinite(all_values(dtype))])
    mids = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
    fi = ml_dtypes.finfo(dtype)
    big, tiny, sub = float(fi.max), float(fi.tiny), float(fi.smallest_subnormal)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e30, -1e30, 1e-30, -1e-30,
                big * 1.03125, big * 1.0625, big * 1.1, big * 2, -big * 1.1,
                tiny, tiny * 0.999, tiny * 1.001, sub, sub / 2, -sub / 2, sub / 4, sub * 0.75, sub * 1.5]
    up, down = np.float32(np.inf), np.float32(-np.inf)
    with np.errstate(over="ignore"):
        out = np.concatenate([v, mids, np.nextafter(mids, up), np.nextafter(mids, down),
                              np.nextafter(v, up), np.nextafter(v, down),
                              np.asarray(specials, np.float32)])
    return np.concatenate([out, -out]).astype(np.float32)


def reference(x, dtype):
    """ml_dtypes' cast of ``x`` clipped to the finite range (NaN kept): the saturating
    cast, back in ``x``'s dtype."""
    m = float(ml_dtypes.finfo(dtype).max)
    x32 = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.clip(x32, -m, m).astype(dtype).astype(np.float32).astype(np.asarray(x).dtype)


def assert_same_bits(got, want, skip=None):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    u = np.dtype(f"u{got.dtype.itemsize}")
    g32, w32 = got.astype(np.float32), want.astype(np.float32)
    ok = (got.view(u) == want.view(u)) | (np.isnan(g32) & np.isnan(w32))
    if skip is not None:
        ok |= skip
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. got {g32[bad[:5]]} want {w32[bad[:5]]}"


@functools.lru_cache(maxsize=None)
def _sim(dtype, in_dtype):
    return jax.jit(lambda x: sfy.ops.reduce_precision_on_forward(x, dtype))


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
def test_simulated_cast_boundaries_float32(dtype):
    x = boundary_values(dtype)
    got = _sim(dtype, np.float32)(x)
    skip = np.isnan(x) if np.dtype(dtype).name in NO_NAN else None  # simulation keeps NaN
    if np.dtype(dtype) == ml_dtypes.bfloat16:  # float32 subnormals: flushed by XLA on CPU
        skip = np.abs(x) < np.finfo(np.float32).tiny
    assert_same_bits(got, reference(x, dtype), skip)
    if skip is not None and np.dtype(dtype).name in NO_NAN:
        assert np.all(np.isnan(np.asarray(got)[np.isnan(x)]))


@pytest.mark.parametrize("in_dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("dtype", [f for f in FORMATS if np.dtype(f).itemsize == 1], ids=lambda d: np.dtype(d).name)
def test_simulated_cast_every_16bit_input(dtype, in_dtype):
    """All 65536 float16 / bfloat16 inputs: the simulated cast keeps the input dtype."""
    x = np.arange(2**16, dtype=np.uint16).view(in_dtype)
    got = _sim(dtype, in_dtype)(x)
    skip = np.isnan(x.astype(np.float32)) if np.dtype(dtype).name in NO_NAN else None
    if in_dtype == ml_dtypes.bfloat16:
        tiny = np.abs(x.astype(np.float32)) < np.finfo(np.float32).tiny
        skip = tiny if skip is None else skip | tiny
    assert_same_bits(got, reference(x, dtype), skip)


CASTABLE = [f for f in FORMATS if _xla_can_cast(np.dtype(f))]


@pytest.mark.parametrize("dtype", CASTABLE, ids=lambda d: np.dtype(d).name)
def test_real_cast_boundaries(dtype):
    x = boundary_values(dtype)
    got = jax.jit(lambda x: sfy.ops.cast_on_forward(x, dtype))(x)
    assert got.dtype == np.dtype(dtype)
    want = reference(x, dtype).astype(dtype)
    skip = np.isnan(x) if np.dtype(dtype).name in NO_NAN else None  # no NaN code: XLA's choice
    if np.dtype(dtype) == ml_dtypes.bfloat16:  # float32 subnormals: flushed by XLA on CPU
        skip = np.abs(x) < np.finfo(np.float32).tiny
    assert_same_bits(got, want, skip)
    # Every finite code round-trips exactly (infinities saturate, checked above).
    v = all_values(dtype)
    skip = ~np.isfinite(v)
    if np.dtype(dtype) == ml_dtypes.bfloat16:
        skip |= np.abs(v) < np.finfo(np.float32).tiny
    with np.errstate(invalid="ignore"):
        assert_same_bits(sfy.ops.cast_on_forward(v, dtype), v.astype(dtype), skip)


@pytest.mark.parametrize("dtype", FLOAT8, ids=lambda d: np.dtype(d).name)
def test_real_and_simulated_agree(dtype):
    x = (RNG.standard_normal(512) * np.exp2(RNG.integers(-20, 20, 512))).astype(np.float32)
    real = np.asarray(sfy.ops.cast_on_forward(x, dtype)).astype(np.float32)
    sim = np.asarray(sfy.ops.reduce_precision_on_forward(x, dtype))
    assert_same_bits(sim, real)


def test_overflow_saturates_never_nan():
    x = jnp.asarray([1e6, -1e6, np.inf, -np.inf, 465.0, 500.0, np.nan], jnp.float32)
    e4m3 = np.asarray(sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn)).astype(np.float32)
    np.testing.assert_array_equal(e4m3[:6], [448, -448, 448, -448, 448, 448])
    assert np.isnan(e4m3[6])
    # A plain astype would have given NaN: this is what saturation prevents.
    assert np.isnan(np.asarray(x.astype(jnp.float8_e4m3fn)).astype(np.float32)[0])
    e5m2 = np.asarray(sfy.ops.cast_on_forward(x, jnp.float8_e5m2)).astype(np.float32)
    np.testing.assert_array_equal(e5m2[:4], [57344, -57344, 57344, -57344])
    sim = np.asarray(sfy.ops.reduce_precision_on_forward(x, jnp.float8_e4m3fn))
    np.testing.assert_array_equal(sim[:6], [448, -448, 448, -448, 448, 448])
    assert np.isnan(sim[6])


# --- inside scalify -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("data_dtype", [np.float32, np.float16])
def test_cast_inside_scalify_acts_on_data(dtype, data_dtype):
    data = (RNG.standard_normal(64) * 100).astype(np.float32)  # some beyond 448
    sa = scaled(data, 2.0**-30, data_dtype)
    want = saturating_cast(sa.data, dtype)

    fns = [sfy.scalify(lambda x: sfy.ops.cast_on_forward(x, dtype)),
           jax.jit(sfy.scalify(lambda x: sfy.ops.cast_on_forward(x, dtype))),
           lambda x: sfy.ops.cast_on_forward(x, dtype)]
    with sfy.ScalifyConfig(range_guard=False):  # the data cast alone: saturating
        for f in fns:
            out = f(sa)
            assert isinstance(out, sfy.ScaledArray) and out.dtype == np.dtype(dtype)
            assert float(out.scale) == 2.0**-30
            assert_same_bits(out.data, want)
    # Range-guarded (the default): data beyond the format moves into the scale, so the
    # values are kept to the format's precision instead of saturating.
    value = np.asarray(sfy.asarray(sa, dtype=jnp.float32), np.float64)
    for f in [jax.jit(sfy.scalify(lambda x: sfy.ops.cast_on_forward(x, dtype))), fns[2]]:  # new trace
        out = f(sa)
        assert out.dtype == np.dtype(dtype) and float(out.scale) >= 2.0**-30
        got = np.asarray(sfy.asarray(out, dtype=jnp.float32), np.float64)
        rtol = 2.0 ** -(int(jnp.finfo(dtype).nmant) + 1) * 1.01  # half an ulp
        np.testing.assert_allclose(got, value, rtol=rtol, atol=float(np.abs(value).max()) * 2.0**-12)

    sim = sfy.scalify(lambda x: sfy.ops.reduce_precision_on_forward(x, dtype))(sa)
    assert sim.dtype == np.dtype(data_dtype) and float(sim.scale) == 2.0**-30
    assert_same_bits(sim.data, np.asarray(want).astype(np.float32).astype(data_dtype))
    # Outside scalify on the ScaledArray: the same.
    assert_same_bits(sfy.ops.reduce_precision_on_forward(sa, dtype).data, sim.data)


def test_cast_inside_scalify_plain_operand():
    x = jnp.asarray([1.0, 3.3, 1000.0], jnp.float32)
    for f in [sfy.scalify(lambda x: sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn)),
              jax.jit(lambda x: sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn))]:
        out = f(x)
        assert not isinstance(out, sfy.ScaledArray)
        np.testing.assert_array_equal(np.asarray(out).astype(np.float32), [1.0, 3.25, 448.0])


def test_value_of_scaled_cast():
    """A float8 ScaledArray represents the cast value: data * scale ~ value, within
    float8's relative rounding, or half its smallest subnormal (2**-10) times the scale
    for elements that float8's range leaves subnormal (a normal draw has some)."""
    x = (RNG.standard_normal(256)).astype(np.float32)
    sa = scaled(x, 2.0**50, np.float16)
    out = sfy.scalify(lambda x: sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn))(sa)
    assert float(out.scale) == 2.0**50
    assert_close(out, x.astype(np.float16).astype(np.float32) * 2.0**50, jnp.float8_e4m3fn, atol=2.0**-10 * 2.0**50)


# --- gradients -----------------------------------------------------------------------------


def _vjp(f, x, ct):
    _, vjp = jax.vjp(f, x)
    return vjp(ct)[0]


def test_cast_on_forward_gradient():
    """The gradient of a cast is the cotangent cast back to the input dtype."""
    x = jnp.asarray(RNG.standard_normal(8), jnp.float16)
    ct = jnp.asarray(RNG.standard_normal(8), jnp.float8_e4m3fn)
    f = lambda x: sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn)  # noqa: E731
    out = _vjp(f, x, ct)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ct).astype(np.float32))
    # Inside scalify: a scaled cotangent keeps its scale, its data is cast back.
    sa, sct = scaled(x, 4.0, np.float16), sfy.ScaledArray(ct, jnp.float32(2.0**-20))
    for g in [sfy.scalify(functools.partial(_vjp, f)), jax.jit(sfy.scalify(functools.partial(_vjp, f)))]:
        out = g(sa, sct)
        assert out.dtype == np.float16 and float(out.scale) == 2.0**-20
        np.testing.assert_array_equal(np.asarray(out.data, np.float32), np.asarray(ct).astype(np.float32))


@pytest.mark.parametrize("op", ["cast", "simulated"])
def test_on_backward(op):
    dtype = jnp.float8_e4m3fn
    fn = sfy.ops.cast_on_backward if op == "cast" else sfy.ops.reduce_precision_on_backward
    f = lambda x: fn(x, dtype)  # noqa: E731
    x = jnp.asarray(RNG.standard_normal(16), jnp.float16)
    ct_data = jnp.asarray(np.r_[RNG.standard_normal(14) * 10, 1000, -3000], jnp.float16)
    want_data = np.asarray(reference(np.asarray(ct_data), dtype))  # in float16, saturated
    # Forward: identity (outside, and inside scalify without grad).
    np.testing.assert_array_equal(f(x), x)
    sa = scaled(x, 2.0**10, np.float16)
    out = sfy.scalify(f)(sa)
    np.testing.assert_array_equal(out.data, sa.data)
    assert float(out.scale) == 2.0**10
    # Backward, plain: the cotangent is cast.
    np.testing.assert_array_equal(_vjp(f, x, ct_data), want_data)
    # Backward inside scalify: the data of the scaled cotangent is cast, its scale kept.
    sct = sfy.ScaledArray(ct_data, jnp.float32(2.0**-40))
    gs = [sfy.scalify(functools.partial(_vjp, f)), jax.jit(sfy.scalify(functools.partial(_vjp, f)))]
    with sfy.ScalifyConfig(range_guard=op != "cast"):  # the data cast alone: saturating
        for g in gs:
            out = g(sa, sct)
            assert isinstance(out, sfy.ScaledArray) and float(out.scale) == 2.0**-40
            np.testing.assert_array_equal(out.data, want_data)
    if op == "cast":  # range-guarded: the -3000 beyond E4M3 is kept, not saturated
        out = jax.jit(sfy.scalify(functools.partial(_vjp, f)))(sa, sct)
        got = np.asarray(sfy.asarray(out, dtype=jnp.float32), np.float64) * 2.0**40
        np.testing.assert_allclose(got[-2:], [1000, -3000], rtol=0.07)
    # Outside scalify on a ScaledArray: the data's cotangent is cast.
    out = _vjp(f, sa, sfy.ScaledArray(ct_data, jnp.float32(1.0)))
    np.testing.assert_array_equal(out.data, want_data)


def test_grad_through_casts_inside_scalify():
    def loss(x):
        y = sfy.ops.cast_on_forward(x, jnp.float8_e4m3fn).astype(jnp.float32)
        y = sfy.ops.cast_on_backward(y * y, jnp.float8_e5m2)
        return jnp.sum(sfy.lax.stop_scaling(y, jnp.float32))

    x = RNG.standard_normal(16).astype(np.float32)
    sa = scaled(x, 1.0, np.float32)
    got = sfy.scalify(jax.grad(loss))(sa)
    y = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert_close(got, 2 * y, jnp.float8_e5m2)


def test_jit_and_vmap_plain():
    x = jnp.asarray(RNG.standard_normal((3, 5)) * 300, jnp.float32)
    out = jax.vmap(lambda r: sfy.ops.cast_on_forward(r, jnp.float8_e4m3fn))(x)
    assert_same_bits(out, saturating_cast(x, jnp.float8_e4m3fn))
    out = jax.jit(jax.vmap(lambda r: sfy.ops.reduce_precision_on_forward(r, jnp.float8_e4m3fn)))(x)
    assert_same_bits(out, simulated_cast(x, jnp.float8_e4m3fn))


# --- errors ---------------------------------------------------------------------------------

ALL_OPS = [sfy.ops.cast_on_forward, sfy.ops.cast_on_backward,
           sfy.ops.reduce_precision_on_forward, sfy.ops.reduce_precision_on_backward]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [jnp.int8, np.int32, bool, "not-a-dtype"])
def test_non_float_dtype(op, bad):
    with pytest.raises(TypeError, match="floating dtype"):
        op(jnp.ones(3), bad)


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
def test_exponent_only_format_rejected(op):
    with pytest.raises(TypeError, match="exponent-only"):
        op(jnp.ones(3), ml_dtypes.float8_e8m0fnu)


@pytest.mark.parametrize("op", ALL_OPS[1:], ids=lambda f: f.__name__)
def test_non_float_input(op):
    with pytest.raises(TypeError, match="floating array"):
        op(jnp.arange(3), jnp.float8_e4m3fn)


@pytest.mark.skipif(all(_xla_can_cast(np.dtype(f)) for f in FORMATS), reason="XLA casts every format")
def test_uncastable_format_clear_error():
    bad = next(f for f in FORMATS if not _xla_can_cast(np.dtype(f)))
    with pytest.raises(TypeError, match="reduce_precision_on_forward"):
        sfy.ops.cast_on_forward(jnp.ones(3), bad)
    # The simulated cast works for it.
    v = all_values(bad)
    assert_same_bits(sfy.ops.reduce_precision_on_forward(v, bad), v, np.isnan(v))
