"""Range safety (docs/design.md, contract item 3): wherever float32 gives a finite value
inside the scale range, a rule's data is finite, whatever the data distribution of its operands.

Oracle: plain float32 JAX on the values the float16 ScaledArrays represent.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core.formats import is_narrow
from scalify.core.range_guard import fit_to_format, guard_band


def _heavy(shape=(64, 32), outlier=300.0, seed=0):
    """Unit-variance data with one outlier: as ScaledArray, the data's max-abs sits
    hundreds of times above its RMS (real activations have such outlier features)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[0, 0] = outlier
    return x


def _run(fn, *args):
    out = jax.jit(sfy.scalify(fn))(*args)
    return np.asarray(sfy.asarray(out, dtype=jnp.float32))


def _check(fn, x, rtol):
    got = _run(fn, x).astype(np.float64)
    want = np.asarray(fn(sfy.asarray(x, dtype=jnp.float32))).astype(np.float64)
    finite = np.isfinite(want)
    assert np.all(np.isfinite(got[finite])), f"{int((~np.isfinite(got[finite])).sum())} non-finite"
    err = np.linalg.norm(got[finite] - want[finite]) / max(np.linalg.norm(want[finite]), 1e-30)
    assert err < rtol, err


CASES = {
    "x*x": (lambda x: x * x, 2e-3),
    "x*x*x*x": (lambda x: ((x * x) * x) * x, 2e-3),
    "x*x*3+1": (lambda x: x * x * 3.0 + 1.0, 2e-3),
    "x**3": (lambda x: x**3, 2e-3),
    "pow 2.5": (lambda x: jnp.abs(x) ** 2.5, 2e-3),
    "gelu": (jax.nn.gelu, 2e-3),
    "gelu grad": (jax.grad(lambda x: jnp.sum(jax.nn.gelu(x))), 5e-3),
    "exp": (lambda x: jnp.exp(x / 16), 2e-3),
    "div": (lambda x: x / (jnp.abs(x) + 0.5), 2e-3),
    "rsqrt": (lambda x: jax.lax.rsqrt(jnp.abs(x) + 1.0), 2e-3),
    "x @ x.T": (lambda x: x @ x.T, 2e-3),
    "layer norm grad": (jax.grad(lambda x: jnp.sum(jax.nn.standardize(x, axis=-1) * jnp.arange(32.0))), 1e-2),
    "softmax grad": (jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) * jnp.arange(32.0))), 1e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("magnitude", [2.0**-30, 1.0, 2.0**30])
@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "at-once"])
def test_float16_data_stays_finite(name, magnitude, defer):
    """With deferred rounding (the default: one guard at the end of each elementwise
    chain) and with every rule rounded and guarded at once."""
    fn, rtol = CASES[name]
    if name in ("exp", "div", "rsqrt", "gelu", "gelu grad", "layer norm grad", "softmax grad") and magnitude != 1.0:
        # Not scale-equivariant: magnitudes far from 1 drive these into their flat or
        # pole regions, where float32 itself is exact-zero or out of range.
        magnitude = 1.0
    x = sfy.as_scaled_array(jnp.asarray(_heavy() * magnitude), dtype=jnp.float16)
    with sfy.ScalifyConfig(defer_rounding=defer):
        _check(fn, x, rtol)


def test_without_the_guard_float16_overflows():
    """The check above can fail: with the guard off, ``x**3`` of the same data overflows."""
    x = sfy.as_scaled_array(jnp.asarray(_heavy()), dtype=jnp.float16)
    with sfy.ScalifyConfig(range_guard=False):
        got = _run(lambda x: x**3, x)
    assert not np.all(np.isfinite(got))


def test_in_band_data_keep_the_static_scale():
    """Unit-variance data are left as the static rule makes them: scale ``sx * sy``."""
    a = sfy.as_scaled_array(jnp.asarray(np.random.default_rng(1).standard_normal((16, 16)), jnp.float32), dtype=jnp.float16)
    out = jax.jit(sfy.scalify(lambda a: a * a[::-1]))(a)
    assert float(out.scale) == float(a.scale) ** 2


def test_out_of_band_data_are_rescaled_to_the_target():
    lo, hi, t = guard_band(jnp.float16)
    data = jnp.asarray([1e6, -3.0, 0.5], jnp.float32)  # would overflow float16
    out = fit_to_format(data, np.float32(2.0**-10), jnp.float16)
    amax = float(jnp.max(jnp.abs(out.data.astype(jnp.float32))))
    assert 2.0**t <= amax < 2.0 ** (t + 1)
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)), np.asarray(data) * 2.0**-10, rtol=1e-3)
    zero = fit_to_format(jnp.zeros(3), np.float32(4.0), jnp.float16)
    assert float(zero.scale) == 0.0


def test_only_narrow_formats_are_guarded():
    assert is_narrow(jnp.float16) and is_narrow(jnp.float8_e4m3fn) and is_narrow(jnp.float8_e5m2)
    assert not is_narrow(jnp.bfloat16) and not is_narrow(jnp.float32)
