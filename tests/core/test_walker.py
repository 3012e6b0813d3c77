"""`scalify.core.walker`: the jaxpr walk shared by the interpreter, fp8 and indexing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import DropVar, Jaxpr, Literal, jaxpr_as_fun

from scalify.core import walker
from tests.utils import scaled


def _bind_all(jaxpr, consts, args, **kw):
    return walker.eval_jaxpr(jaxpr, consts, args, walker.bind, **kw)


def test_binding_every_equation_reproduces_the_function():
    def loss(x, i):
        y = jnp.where(x > 0, x * 2.0 + 1, 0.0)
        y = lax.scan(lambda c, _: (jnp.sin(c), lax.top_k(c, 2)[1]), y, length=2)[0]
        return lax.cond(i > 0, jnp.sin, jnp.cos, y).sum()

    f = jax.grad(loss)
    x = np.array([1.0, -2.0, 3.0], np.float32)
    closed = jax.make_jaxpr(f)(x, 1)
    (got,) = _bind_all(closed.jaxpr, closed.consts, [x, 1])
    np.testing.assert_array_equal(got, f(x, 1))
    with pytest.raises(TypeError, match="expects 2 arguments, got 1"):
        _bind_all(closed.jaxpr, closed.consts, [x])
    # The scan's forward body drops top_k's values: a DropVar, which nothing reads.
    scan = next(e for e in closed.jaxpr.eqns if e.primitive is lax.scan_p)
    body, consts = walker.unpack(scan.params["jaxpr"])
    assert any(isinstance(v, DropVar) for e in body.eqns for v in e.outvars)
    sin, idx, _ = _bind_all(body, consts, [x])
    np.testing.assert_array_equal(idx, lax.top_k(x, 2)[1])
    np.testing.assert_array_equal(sin, jnp.sin(x))


def test_literals_static_or_as_written():
    jaxpr = jax.make_jaxpr(lambda i: i + 1)(1).jaxpr
    (lit,) = [v for v in jaxpr.eqns[0].invars if isinstance(v, Literal)]
    static = walker.literal_value(lit, static=True)
    assert isinstance(static, np.ndarray) and static.dtype == np.int32
    # As written, the literal keeps its weak type: a re-traced jaxpr has the same types.
    again = jax.make_jaxpr(lambda i: _bind_all(jaxpr, (), [i]))(1)
    assert again.out_avals == jax.make_jaxpr(lambda i: i + 1)(1).out_avals


def test_source_context_keeps_names_of_rebound_equations():
    def f(x):
        with jax.named_scope("block"):
            return jnp.sin(x)

    jaxpr = jax.make_jaxpr(f)(1.0).jaxpr
    for keep in (True, False):
        again = jax.make_jaxpr(lambda x: _bind_all(jaxpr, (), [x], source_context=keep))(1.0)
        assert ("block" in str(again.jaxpr.eqns[0].source_info.name_stack)) == keep


def test_sub_jaxprs_of_control_flow_and_calls():
    def f(x):
        y = lax.cond(x > 0, jnp.sin, jnp.cos, x)
        return jax.jit(jnp.tanh)(lax.scan(lambda c, _: (c * 2, None), y, length=2)[0])

    eqns = {e.primitive.name: e for e in jax.make_jaxpr(f)(1.0).jaxpr.eqns}
    assert [k for k, _ in walker.jaxpr_params(eqns["cond"].params)] == ["branches"]
    assert len(list(walker.sub_jaxprs(eqns["cond"].params))) == 2
    assert len(list(walker.sub_jaxprs(eqns["scan"].params))) == 1
    assert list(walker.sub_jaxprs(eqns["gt"].params)) == []
    body, consts = walker.unpack(eqns["jit"].params["jaxpr"])
    assert isinstance(body, Jaxpr) and list(consts) == []
    assert walker.unpack(body) == (body, ())


def test_arrays_are_traced_numbers_and_objects_static():
    x = scaled([1.0, 2.0], 0.5)
    assert all(walker.is_traced_leaf(a) for a in (x, jnp.ones(2), np.ones(2), np.float32(1)))
    assert not any(walker.is_traced_leaf(a) for a in (1, 2.0, True, abs, "relu"))

    def f(x, flag, k):
        if flag:  # a Python bool stays one
            return {"y": x * k, "act": abs}
        return {"y": x, "act": None}

    leaves, treedef = jax.tree.flatten(((x.data, True, 3.0), {}))
    traced = walker.trace(f, leaves, treedef)
    assert len(traced.jaxpr.jaxpr.invars) == 1 and len(traced.args) == 1
    out = traced.rebuild(jaxpr_as_fun(traced.jaxpr)(*traced.args))
    assert out["act"] is abs
    np.testing.assert_array_equal(out["y"], np.asarray(x.data) * 3)
