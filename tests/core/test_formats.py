"""The one saturating cast (scalify/core/formats.py): NaN, infinities and overflow in
every mode, and the call sites that choose each mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core.formats import clip_to_format, saturating_cast
from scalify.ops.cast import saturating_cast as ops_saturating_cast

# A static float32 overflow cast to float16 in NumPy warns, as NumPy does.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

E4M3 = np.dtype(jnp.float8_e4m3fn)
E5M2 = np.dtype(jnp.float8_e5m2)
F16 = np.dtype(np.float16)
BF16 = np.dtype(jnp.bfloat16)

# NaN, +-inf, a finite overflow of every format below float32, an in-range value.
X = np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1.5], np.float32)


def values(y):
    return np.asarray(jnp.asarray(y).astype(np.float32))


def largest(dtype):
    return float(jnp.finfo(dtype).max)


@pytest.mark.parametrize("dtype", [E4M3, E5M2, F16, BF16])
@pytest.mark.parametrize("mode", [{}, {"overflow": "saturate"}, {"overflow": "saturate", "infinities": "saturate"}])
def test_nan_stays_nan_in_every_mode(dtype, mode):
    out = values(saturating_cast(X, dtype, **mode))
    assert np.isnan(out[0])
    assert out[5] == 1.5


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_default_saturates_float8_overflow_and_keeps_infinities(dtype):
    """The rules' cast: float8 finite overflow -> +-M; infinities cast as they are
    (E4M3FN has no infinity: they become NaN, visibly not a number)."""
    m = largest(dtype)
    out = values(saturating_cast(X, dtype))
    assert out[3] == m and out[4] == -m
    if dtype == E4M3:
        assert np.isnan(out[1]) and np.isnan(out[2])
    else:
        assert out[1] == np.inf and out[2] == -np.inf


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_default_lets_wider_formats_overflow_to_inf(dtype):
    """A float16/bfloat16 overflow stays visible, as a plain cast gives."""
    out = values(saturating_cast(X, dtype))
    want = values(jnp.asarray(X).astype(dtype))
    np.testing.assert_array_equal(out, want)
    if dtype == F16:
        assert out[3] == np.inf and out[4] == -np.inf


@pytest.mark.parametrize("dtype", [E4M3, E5M2, F16, BF16])
def test_overflow_saturate_keeps_infinities(dtype):
    m = largest(dtype)
    out = values(saturating_cast(X, dtype, overflow="saturate"))
    assert out[3] == m and out[4] == -m
    if dtype == E4M3:
        assert np.isnan(out[1]) and np.isnan(out[2])
    else:
        assert out[1] == np.inf and out[2] == -np.inf


@pytest.mark.parametrize("dtype", [E4M3, E5M2, F16, BF16])
def test_infinities_saturate_never_make_nan(dtype):
    m = largest(dtype)
    out = values(saturating_cast(X, dtype, overflow="saturate", infinities="saturate"))
    np.testing.assert_array_equal(out[1:5], [m, -m, m, -m])


def test_inconsistent_arguments_are_rejected():
    with pytest.raises(ValueError, match="overflow"):
        saturating_cast(X, E4M3, infinities="saturate")
    with pytest.raises(ValueError, match="overflow"):
        saturating_cast(X, E4M3, overflow="wrap")
    with pytest.raises(ValueError, match="infinities"):
        clip_to_format(X, E4M3, infinities="nan")


def test_static_values_stay_static_when_nothing_is_clipped():
    out = saturating_cast(np.array([1.0, 1e30], np.float32), F16)
    assert isinstance(out, np.ndarray) and out.dtype == F16 and out[1] == np.inf


def test_clip_computes_in_the_input_dtype_when_it_holds_the_bound():
    x = jnp.asarray(X)
    assert clip_to_format(x, E4M3).dtype == np.float32
    assert clip_to_format(x.astype(F16), E4M3).dtype == F16
    # bfloat16 cannot hold float16's 65504: clipped in float32.
    assert clip_to_format(x.astype(BF16), F16).dtype == np.float32
    # Nothing of float16 exceeds float32's range: returned as it is.
    y = x.astype(F16)
    assert clip_to_format(y, np.float32) is y


def test_same_dtype_is_a_no_op_unless_infinities_saturate():
    x = jnp.asarray(X)
    assert saturating_cast(x, np.float32, overflow="saturate") is x
    out = values(saturating_cast(x, np.float32, overflow="saturate", infinities="saturate"))
    assert out[1] == largest(np.float32)


def test_call_sites_choose_their_modes():
    """ops.cast_on_forward saturates infinities; the rules and the optimizer's storage
    keep them (an E4M3FN infinity becomes NaN); the rules let float16 overflow."""
    assert values(ops_saturating_cast(X, E4M3))[1] == largest(E4M3)
    assert values(sfy.ops.cast_on_forward(jnp.asarray(X), E4M3))[1] == largest(E4M3)
    state = sfy.optim.storage_cast(jnp.asarray(X), E4M3)
    assert np.isnan(values(state)[1]) and values(state)[3] == largest(E4M3)
    big = sfy.scaled_array(np.full((4,), 60000.0, np.float32), np.float32(1), dtype=np.float16)
    with sfy.ScalifyConfig(range_guard=False):
        total = jax.jit(sfy.scalify(lambda a: a + a))(big)  # 120000: beyond float16
    assert np.all(np.isinf(np.asarray(sfy.asarray(total, dtype=np.float32))))
