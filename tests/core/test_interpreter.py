import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalify as sfy
from scalify.core import interpreter
from tests.utils import assert_close, scaled


def test_plain_inputs_stay_plain():
    f = sfy.scalify(lambda a, b: a + b)
    out = f(jnp.ones(3), jnp.ones(3))
    assert not isinstance(out, sfy.ScaledArray)
    np.testing.assert_array_equal(out, np.full(3, 2.0))


def test_keyword_arguments_and_pytrees():
    def f(x, *, bias, extra):
        return {"y": x + bias, "e": extra["k"] - x}

    x = scaled([1.0, 2.0], 2.0**-10)
    out = sfy.scalify(f)(x, bias=scaled([1.0, 1.0], 2.0**-10), extra={"k": jnp.ones(2, jnp.float16)})
    assert isinstance(out["y"], sfy.ScaledArray) and isinstance(out["e"], sfy.ScaledArray)
    assert_close(out["y"], np.array([2.0, 3.0]) * 2.0**-10, np.float16)
    assert_close(out["e"], 1 - np.array([1.0, 2.0]) * 2.0**-10, np.float16)


def test_static_zeros_keep_the_operand_scale_eager_and_jit():
    # zeros_like folds at trace time: adding it must not move a tiny scale towards 1.
    def f(a):
        return a + jnp.zeros_like(a)

    x = scaled([1.0, -2.0], 2.0**-60)
    for fn in (sfy.scalify(f), jax.jit(sfy.scalify(f))):
        out = fn(x)
        assert float(out.scale) == 2.0**-60
        np.testing.assert_array_equal(out.data, x.data)


def test_constant_scalar_pow2_part_goes_to_the_scale():
    x = scaled([1.0, 1.5], 2.0**-30)
    out = jax.jit(sfy.scalify(lambda a: a + 1024.0))(x)
    assert_close(out, np.array([1.0, 1.5]) * 2.0**-30 + 1024.0, np.float16)
    assert float(out.scale) == 1024.0


def test_unsupported_primitive_error_names_primitive_shapes_and_line():
    x = scaled(np.ones((2, 3)), 1.0)
    prim = jax.extend.core.Primitive("my_custom_op")
    prim.def_abstract_eval(lambda a: a)

    def f(a):
        return prim.bind(a)

    with pytest.raises(sfy.UnsupportedPrimitiveError) as info:
        sfy.scalify(f)(x)
    msg = str(info.value)
    assert "my_custom_op" in msg and "float16[2, 3]" in msg and "test_interpreter.py" in msg


def test_non_array_leaves_are_static():
    out = sfy.scalify(lambda a, cfg: cfg["act"](a) * cfg["k"])(scaled([-1.0, 2.0], 0.5), {"act": abs, "k": 3.0})
    assert_close(out, np.array([1.5, 3.0]), np.float16)


def test_bad_leaves_are_rejected_at_the_boundary():
    bad = jax.tree.unflatten(jax.tree.structure(scaled([1.0], 1.0)), [jnp.ones(1, jnp.float16), jnp.ones(2)])
    with pytest.raises(TypeError, match="scalar"):
        sfy.scalify(lambda a: a)(bad)
    bad = jax.tree.unflatten(jax.tree.structure(scaled([1.0], 1.0)), [jnp.ones(1, jnp.float16), jnp.float32(-1)])
    with pytest.raises(ValueError, match=">= 0"):
        sfy.scalify(lambda a: a)(bad)


def test_trace_time_folding_of_static_equations():
    jaxpr = jax.make_jaxpr(lambda a: a + jnp.full((4,), 2.0) * 3.0)(jnp.ones(4))
    env_out = interpreter.eval_closed_jaxpr(
        jax.make_jaxpr(lambda: jnp.full((4,), 2.0) * 3.0)()
    )
    assert isinstance(env_out[0], np.ndarray)  # folded, not a device computation
    np.testing.assert_array_equal(env_out[0], np.full(4, 6.0))
    out = interpreter.eval_closed_jaxpr(jaxpr, scaled(np.ones(4), 1.0, np.float32))[0]
    assert_close(out, np.full(4, 7.0))


def test_constant_seed_keeps_its_scale_through_integer_indexing():
    # The cross-entropy backward scatters the mean's constant cotangent -1/N into a
    # one-hot with integer labels: the one-hot keeps scale pow2(1/N) and unit data, so
    # the gradient's data stay near unit size instead of N times below.
    n, v = 256, 10
    logits = np.random.default_rng(0).standard_normal((n, v)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, v, n)

    def loss(z, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    g = jax.jit(sfy.scalify(jax.grad(loss)))(sfy.as_scaled_array(logits, dtype=jnp.float16), labels)
    rms = float(np.sqrt(np.mean(np.asarray(g.data, np.float32) ** 2)))
    assert rms > 0.25, rms
    assert_close(g, jax.grad(loss)(logits, labels), np.float16)


def test_constant_into_integer_scatter_is_scaled_and_plain_float_math_stays_plain():
    idx = jnp.array([1, 3])
    out = jax.jit(sfy.scalify(lambda i: jnp.zeros(5).at[i].set(jnp.full((2,), 3e-3))))(idx)
    assert isinstance(out, sfy.ScaledArray) and float(out.scale) == 2.0**-9
    np.testing.assert_allclose(np.asarray(sfy.asarray(out)), [0, 3e-3, 0, 3e-3, 0], rtol=1e-6)
    plain = sfy.scalify(lambda x: x + jnp.full((3,), 0.5))(jnp.ones(3))
    assert not isinstance(plain, sfy.ScaledArray)
    np.testing.assert_array_equal(plain, np.full(3, 1.5))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float16])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_max_of_tied_elements_shares_its_gradient_by_the_true_count(dtype, jit):
    """``jax.grad`` of ``max`` over a zero-initialised tensor: every element ties, and
    JAX's derivative divides the cotangent by the tie count, a sum of the boolean
    indicators converted to the data dtype. Summed in float8 E4M3, 26 ones are 16 (its
    integers stop at 16), so each share came out 1.6 times too large. Indicators made
    from booleans are held at scale 1 and summed by the scaled rule (in float32)."""
    n = 26 if dtype == jnp.float8_e4m3fn else 3000  # float16's integers stop at 2048
    x = sfy.as_scaled_array(jnp.zeros(n), dtype=dtype)
    w = sfy.as_scaled_array(jnp.float32(0.75), dtype=dtype)
    f = jax.grad(lambda x, w: jnp.max(x) * w)
    fn = jax.jit(sfy.scalify(f)) if jit else sfy.scalify(f)
    got = np.asarray(sfy.asarray(fn(x, w), jnp.float32), np.float64)
    np.testing.assert_allclose(got, np.full(n, 0.75 / n), rtol=2.0**-4)
    # the indicator leaves the program as a ScaledArray of exact 0/1 data at scale 1
    ind = sfy.scalify(lambda x: (x > 0).astype(x.dtype))(sfy.as_scaled_array(jnp.arange(-2.0, 3.0), dtype=dtype))
    assert isinstance(ind, sfy.ScaledArray) and float(ind.scale) == 1.0
    np.testing.assert_array_equal(np.asarray(ind.data, np.float32), [0, 0, 0, 1, 1])


def _compiled_size(fn, *args):
    """Instructions in the optimised HLO XLA compiles for ``jax.jit(fn)``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, flags=re.M))


def _unrolled_mlp_step(depth):
    keys = jax.random.split(jax.random.PRNGKey(0), depth)
    params = [{"w": jax.random.normal(k, (16, 16)) / 4, "b": jnp.zeros(16)} for k in keys]
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16))

    def loss(params, x):
        for p in params:
            x = jax.nn.relu(x @ p["w"] + p["b"])
        return jnp.mean(x**2)

    def step(params, x):
        l, g = jax.value_and_grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), l

    return step, params, x


def test_compiled_program_grows_linearly_with_depth():
    """Each rule's output scale is computed once (`computed_once`), not copied by XLA
    into every kernel that uses it: the compiled program of an unrolled network grows
    with depth at a constant multiple of the plain program's growth. (Copied scale
    computations grow with depth themselves: per layer, 16x the plain program's
    instructions at depth 4 -> 8, against about 5x when computed once.)"""
    sizes = {}
    for depth in (4, 8):
        step, params, x = _unrolled_mlp_step(depth)
        sargs = (sfy.as_scaled_array(params), sfy.as_scaled_array(x))
        with sfy.ScalifyConfig(scales_computed_once=False):
            copied = _compiled_size(sfy.scalify(step), *sargs)
        sizes[depth] = (_compiled_size(step, params, x), _compiled_size(sfy.scalify(step), *sargs), copied)
    plain_growth = sizes[8][0] - sizes[4][0]
    scaled_growth = sizes[8][1] - sizes[4][1]
    assert scaled_growth <= 8 * plain_growth, (sizes, scaled_growth / plain_growth)
    assert sizes[8][2] - sizes[4][2] > 2 * scaled_growth, sizes  # the option does what it says


def test_scale_computed_once_is_exact_and_keeps_its_reciprocal():
    from scalify.core import trace_state

    with trace_state.pow2_scope():
        for v in (3.0, 2.0**-126, 2.0**127, 0.7):
            s = trace_state.aligned_scale(jnp.float32(v))
            once = trace_state.computed_once(s)
            assert float(once) == float(s)
            assert float(trace_state.exact_reciprocal(once)) == float(trace_state.exact_reciprocal(s))
        assert trace_state.computed_once(np.float32(2.0)) == 2.0  # static scales stay static
