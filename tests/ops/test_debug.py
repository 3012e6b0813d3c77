"""scalify.ops debug callbacks: the callback sees ScaledArrays (data and scale) inside
scalify, on the forward pass and on gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import scalify as sfy
from tests.utils import scaled

X = np.linspace(-3, 3, 6).astype(np.float32)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(jax.tree.map(np.asarray, args))


def _flush():
    jax.effects_barrier()


def test_debug_callback_inside_scalify_sees_scaled_array():
    sa = scaled(X, 2.0**-7, np.float16)
    for jit in [False, True]:
        rec = Recorder()

        def f(x, y):
            out = sfy.ops.debug_callback(rec, x, y)
            return out[0]

        g = sfy.scalify(f)
        out = (jax.jit(g) if jit else g)(sa, jnp.ones(2))
        _flush()
        assert len(rec.calls) == 1
        got, plain = rec.calls[0]
        assert isinstance(got, sfy.ScaledArray)
        np.testing.assert_array_equal(got.data, np.asarray(sa.data))
        assert float(got.scale) == 2.0**-7
        assert not isinstance(plain, sfy.ScaledArray)
        np.testing.assert_array_equal(plain, np.ones(2))
        np.testing.assert_array_equal(out.data, sa.data)  # args returned unchanged


def test_debug_callback_outside_scalify():
    sa = scaled(X, 4.0, np.float16)
    for f in [sfy.ops.debug_callback, jax.jit(sfy.ops.debug_callback, static_argnums=0)]:
        rec = Recorder()
        out = f(rec, sa, X)
        _flush()
        (got, plain), = rec.calls
        assert isinstance(got, sfy.ScaledArray) and float(got.scale) == 4.0
        np.testing.assert_array_equal(plain, X)
        assert isinstance(out, tuple) and len(out) == 2


def test_user_jax_debug_callback_inside_scalify():
    """A user's own jax.debug.callback inside scalify receives the ScaledArray too."""
    rec = Recorder()
    sa = scaled(X, 0.5, np.float16)
    sfy.scalify(lambda x: jax.debug.callback(rec, x) or x)(sa)
    _flush()
    (got,), = rec.calls
    assert isinstance(got, sfy.ScaledArray) and float(got.scale) == 0.5


def test_debug_print_inside_scalify(capfd):
    sa = scaled(X, 0.25, np.float16)

    def f(x):
        sfy.ops.debug_print("value: {}", x)
        jax.debug.print("jax: {x}", x=x)
        return x

    sfy.scalify(f)(sa)
    _flush()
    out = capfd.readouterr().out
    assert "value: ScaledArray(data=" in out and "scale=" in out
    # jax.debug.print prints the value data * scale (X / 4 = -0.75 ... 0.75).
    jax_line = next(line for line in out.splitlines() if line.startswith("jax:"))
    assert "0.75" in jax_line and "3." not in jax_line


def _vjp(f, x, ct):
    _, vjp = jax.vjp(f, x)
    return vjp(ct)[0]


def test_debug_callback_grad_inside_scalify():
    rec = Recorder()
    f = lambda x: sfy.ops.debug_callback_grad(rec, x)[0]  # noqa: E731
    sa = scaled(X, 8.0, np.float16)
    ct = scaled(X[::-1], 2.0**-20, np.float16)
    out = sfy.scalify(f)(sa)  # forward only: no call
    _flush()
    assert rec.calls == []
    np.testing.assert_array_equal(out.data, sa.data)
    for g in [sfy.scalify(functools.partial(_vjp, f)), jax.jit(sfy.scalify(functools.partial(_vjp, f)))]:
        rec.calls.clear()
        out = g(sa, ct)
        _flush()
        (got,), = rec.calls
        assert isinstance(got, sfy.ScaledArray) and float(got.scale) == 2.0**-20
        np.testing.assert_array_equal(got.data, np.asarray(ct.data))
        np.testing.assert_array_equal(out.data, ct.data)  # gradient unchanged


def test_debug_print_grad_outside(capfd):
    g = jax.grad(lambda x: jnp.sum(sfy.ops.debug_print_grad("grad: {}", x)[0] * 3.0))
    np.testing.assert_array_equal(g(jnp.asarray(X)), np.full(X.shape, 3.0))
    _flush()
    assert "grad: [3. 3. 3. 3. 3. 3.]" in capfd.readouterr().out


def test_debug_callback_grad_several_args():
    rec = Recorder()

    def loss(x, y):
        x, y = sfy.ops.debug_callback_grad(rec, x, y)
        return jnp.sum(x * 2.0 + y * 5.0)

    jax.grad(loss, argnums=(0, 1))(jnp.asarray(X), jnp.asarray(X))
    _flush()
    (gx, gy), = rec.calls
    np.testing.assert_array_equal(gx, np.full(X.shape, 2.0))
    np.testing.assert_array_equal(gy, np.full(X.shape, 5.0))
