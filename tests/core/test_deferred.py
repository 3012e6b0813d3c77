"""The `Deferred` protocol (`scalify.core.deferred`): a kind the interpreter and the
layout rules have never heard of reaches the rule that takes it, stays deferred through
a layout rule that takes every kind, and is materialised everywhere else."""
import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scalify as sfy
from scalify.core import interpreter, registry, trace_state
from scalify.core.deferred import Deferred, materialise
from scalify.core.registry import register_scaled_op
from scalify.rules.linalg import Rescaled, scaled_dot_general
from tests.utils import scaled


class Doubled(Deferred):
    """Toy kind: the value ``2 * acc`` at ``scale``, its doubling still to do. Doubling
    commutes with moving data, so it carries layout operations."""

    made = 0  # how many times a Doubled was materialised

    def __init__(self, acc, scale):
        self.acc, self.scale = acc, scale

    def _materialise(self):
        Doubled.made += 1
        return sfy.ScaledArray(self.acc * jnp.asarray(2, self.acc.dtype), self.scale)

    def map_layout(self, fn):
        return Doubled(fn(self.acc), self.scale)

    def replace_scale(self, scale):
        return Doubled(self.acc, scale)


class Opaque(Doubled):
    """Toy kind with the base class's defaults: it carries no layout operation."""

    map_layout = Deferred.map_layout


# ``double(x, opaque=False)``: 2 * x, returned deferred by its scaled rule.
double_p = jax.extend.core.Primitive("scalify_test_double")
double_p.def_abstract_eval(lambda a, **params: a)
double_p.def_impl(lambda a, **params: 2 * a)
# ``read(x)``: x, whose rule takes `Doubled` operands as they are.
read_p = jax.extend.core.Primitive("scalify_test_read")
read_p.def_abstract_eval(lambda a: a)
read_p.def_impl(lambda a: a)
SEEN = []


def _double(x, *, opaque):
    return (Opaque if opaque else Doubled)(x.data, x.scale)


def _read(x):
    SEEN.append(type(x))
    if isinstance(x, Doubled) and not isinstance(x, Opaque):
        return sfy.ScaledArray(x.acc, x.scale * 2)  # the doubling moves into the scale
    return x


@pytest.fixture(autouse=True, scope="module")
def _toy_rules():
    """The toy rules, registered for this module only (the registry is global: the
    operator table of docs/operators.md lists every registered primitive)."""
    register_scaled_op(double_p)(_double)
    register_scaled_op(read_p, takes_deferred=(Doubled,))(_read)
    yield
    for p in (double_p, read_p):
        registry._RULES.pop(p, None)
        registry._TAKES_DEFERRED.pop(p, None)


def double(x, opaque=False):
    return double_p.bind(x, opaque=opaque)


X = np.arange(6, dtype=np.float32).reshape(2, 3) / 8


@pytest.fixture(autouse=True)
def _fresh():
    SEEN.clear()
    Doubled.made = 0


def test_a_kind_unknown_to_the_interpreter_reaches_the_rule_that_takes_it():
    # transpose takes every kind: it moves the pending value through `map_layout`.
    out = sfy.scalify(lambda a: read_p.bind(lax.transpose(double(a), (1, 0))))(scaled(X, 0.5))
    assert SEEN == [Doubled] and Doubled.made == 0
    np.testing.assert_array_equal(sfy.asarray(out, dtype=jnp.float32), 2 * X.T * 0.5)


def test_a_kind_that_cannot_carry_the_layout_operation_is_materialised():
    out = sfy.scalify(lambda a: read_p.bind(lax.transpose(double(a, True), (1, 0))))(scaled(X, 0.5))
    assert SEEN == [sfy.ScaledArray] and Doubled.made == 1
    np.testing.assert_array_equal(sfy.asarray(out, dtype=jnp.float32), 2 * X.T * 0.5)


def test_other_rules_and_outputs_get_the_scaled_array_once():
    def f(a):
        d = double(a)
        return d, d + a, d * a  # add, mul do not take `Doubled`; the output neither

    outs = sfy.scalify(f)(scaled(X, 0.5))
    assert all(isinstance(o, sfy.ScaledArray) for o in outs)
    assert Doubled.made == 1  # materialised once, shared by its three readers
    for o, e in zip(outs, (2 * X, 3 * X, 2 * X * X * 0.5)):
        np.testing.assert_allclose(sfy.asarray(o, dtype=jnp.float32), e * 0.5, rtol=1e-3)


def test_base_class_declines_every_operation():
    d = Deferred()
    assert d.map_layout(lambda a: a) is None and d.steps() is None and d.scale is None
    with pytest.raises(NotImplementedError):
        d.replace_scale(np.float32(1))
    assert materialise(3.0) == 3.0
    k = Doubled(jnp.ones(2), np.float32(1))
    assert materialise(k) is k.materialise() is k.materialised and Doubled.made == 1


def test_observers_see_materialised_values():
    seen = []

    def observer(eqn, invals, outvals):
        seen.extend(type(v) for v in (*invals, *outvals))

    assert not interpreter.observing()
    with interpreter.observe(observer):
        assert interpreter.observing()
        sfy.scalify(lambda a: read_p.bind(lax.transpose(double(a), (1, 0))))(scaled(X, 0.5))
    assert not interpreter.observing()
    assert seen and not any(issubclass(t, Deferred) for t in seen)


def test_scaled_dot_general_always_returns_a_scaled_array():
    assert not any(p.startswith("_") for p in inspect.signature(scaled_dot_general).parameters)
    a, b = scaled(np.ones((4, 8)), 0.5, np.float32), scaled(np.ones((8, 2)), 2.0, np.float32)
    dn = (((1,), (0,)), ((), ()))
    outs = []

    def f(a, b):
        outs.append(scaled_dot_general(a, b, dn))  # called directly, inside scalify
        return outs[-1]

    out = jax.jit(sfy.scalify(f))(a, b)
    assert type(outs[0]) is sfy.ScaledArray and not isinstance(outs[0], Rescaled)
    np.testing.assert_allclose(sfy.asarray(out, dtype=jnp.float32), np.full((4, 2), 8.0))


def test_two_threads_tracing_at_once_keep_their_state_apart():
    """Thread A traces with an observer and stops mid-trace (its power-of-two scope
    open); thread B then traces without one: B must neither run A's observer nor see
    A's registrations, and both traces must equal their single-threaded ones."""
    args = (scaled(X, 0.5), scaled(X, 3.0))

    def trace():  # a new function each time: JAX caches the traces of one
        return str(jax.make_jaxpr(sfy.scalify(lambda a, b: (a + b) * a + b))(*args))

    with interpreter.observe(lambda *e: None):
        ref_a = trace()
    ref_b = trace()

    a_inside, b_done = threading.Event(), threading.Event()
    calls, results, failures = [], {}, []

    def observer(eqn, invals, outvals):
        calls.append(threading.get_ident())
        if not a_inside.is_set():
            results["a_registered"] = len(trace_state.registered_pow2())
            a_inside.set()
            b_done.wait(timeout=60)

    def thread_a():
        try:
            with interpreter.observe(observer):
                results["a"] = trace()
        except Exception as e:  # pragma: no cover - reported below
            failures.append(e)
            a_inside.set()

    def thread_b():
        try:
            assert a_inside.wait(timeout=60)
            results["b_observing"] = interpreter.observing()
            results["b_registered"] = trace_state.registered_pow2()
            results["b"] = trace()
        except Exception as e:  # pragma: no cover - reported below
            failures.append(e)
        finally:
            b_done.set()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start(), tb.start()
    ta.join(timeout=120), tb.join(timeout=120)
    assert not failures, failures
    assert results["a_registered"] > 0  # A's scope held registrations while B ran
    assert results["b_observing"] is False and results["b_registered"] == {}
    assert set(calls) == {ta.ident}
    assert results["a"] == ref_a and results["b"] == ref_b
