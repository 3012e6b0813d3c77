"""Collectives of sharded scalify programs, as XLA's SPMD partitioner leaves them.

The bytes are read from the module right after the partitioner (an HLO dump of one
compilation, `benchmarks/comm_bytes.py`): later CPU passes widen float8 collectives to
float16, so the compiled executable's text would not show them.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import scalify as sfy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import comm_bytes  # noqa: E402
import gpt  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them on CPU)")

CFG = gpt.GPTConfig(vocab=64, seq_len=16, d_model=32, n_heads=2, n_layers=1)
WEIGHTS = ("wqkv", "wo", "w1", "w2")  # the block matrices: float8 operands under autocast


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _spec(path, x):
    """FSDP: the block matrices (layers, in, out) split over ``data`` along ``in``; the
    rest replicated. A ScaledArray's scale is always replicated."""
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if any(name.endswith(w + "/data") for w in WEIGHTS):
        return P(None, "data", None)
    return P()


def _post_partitioner(fn, args, tmp_path):
    lowered = jax.jit(fn).lower(*args)
    comm_bytes.compile_with_dump(lowered, str(tmp_path))
    files = comm_bytes.find_dump(str(tmp_path), "jit_" + fn.__name__)
    assert files["post_spmd"], os.listdir(tmp_path)
    with open(files["post_spmd"]) as f:
        return f.read()


def _shard(tree, mesh, spec):
    return jax.tree.map(lambda s, x: jax.device_put(x, NamedSharding(mesh, s)),
                        jax.tree_util.tree_map_with_path(spec, tree), tree)


def _check_fp8_collectives(colls, weight_shapes, n_gathers, n_reductions):
    """Every all-gather of a weight matrix carries float8 (E4M3); every gradient
    reduction of a matrix product (over ``data``: a weight gradient, the batch is
    contracted) is 16-bit, none float32."""
    big = [c for c in colls if not c.scalar]
    gathers = [c for c in big if c.kind == "all-gather" and c.shape[c.shape.index("["):] in weight_shapes]
    assert len(gathers) >= n_gathers, [(c.kind, c.shape, c.op_name) for c in big]
    assert all(c.dtypes == ["f8e4m3fn"] for c in gathers), [(c.shape, c.dtypes) for c in gathers]
    reductions = [c for c in big if c.kind in ("all-reduce", "reduce-scatter") and c.axes == "data"
                  and c.op_name.endswith("dot_general")]
    assert len(reductions) >= n_reductions, [(c.kind, c.shape, c.op_name) for c in big]
    assert all(len(c.dtypes) == 1 and comm_bytes.itemsize(c.dtypes[0]) == 2 for c in reductions), \
        [(c.shape, c.dtypes) for c in reductions]
    # and no gradient crosses devices in float32: sums over the batch (biases, norm
    # gains) and the embedding's scatter-add are 16-bit too.
    wide = [c for c in big if c.kind in ("all-reduce", "reduce-scatter") and c.axes == "data"
            and any(comm_bytes.itemsize(d) > 2 for d in c.dtypes)]
    assert not wide, [(c.shape, c.dtypes, c.op_name) for c in wide]


def test_fp8_gpt_step_gathers_float8_weights_and_reduces_16_bit_gradients(tmp_path):
    """A scalify-fp8 training step of a GPT (FSDP over 8 devices, float16 Adam state):
    every block matrix is gathered in float8 (E4M3), and every gradient reduction of a
    matrix product is 16-bit (before: float32, twice bfloat16's bytes).

    Compiled with the range guard off, which keeps this test fast (a guarded step of the
    same GPT takes 4x longer to compile on CPU) and changes none of these dtypes: the
    guard works on each result after its reduction (`test_fp8_mlp_step_with_the_guard`
    below checks the guarded program)."""
    mesh = _mesh()
    params = sfy.as_scaled_array(gpt.init_params(jax.random.PRNGKey(0), CFG), dtype=jnp.float16)
    opt = sfy.optim.scaled_state(optax.adam(1e-3), dtype=jnp.float16)
    batch = NamedSharding(mesh, P("data"))  # batch-sharded residual stream: FSDP, not d-sharded activations
    loss = sfy.fp8.autocast(lambda p, x, y: gpt.loss_fn(p, x, y, CFG, batch_sharding=batch))

    def step(params, state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens[:, :-1], tokens[:, 1:])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = _shard(params, mesh, _spec)
    state = opt.init(params)
    tokens = jax.device_put(np.zeros((16, CFG.seq_len + 1), np.int32), NamedSharding(mesh, P("data")))
    with sfy.ScalifyConfig(range_guard=False):
        text = _post_partitioner(sfy.scalify(step), (params, state, tokens), tmp_path)
    d = CFG.d_model  # the (in/8, out) shards of each block matrix, gathered whole
    shapes = {f"[{d},{3 * d}]", f"[{d},{d}]", f"[{d},{4 * d}]", f"[{4 * d},{d}]"}
    _check_fp8_collectives(comm_bytes.collectives(text, (8, 1)), shapes, n_gathers=4, n_reductions=4)


def test_fp8_mlp_step_with_the_guard(tmp_path):
    """The same checks on a guarded (default) scalify-fp8 step of a 3-layer MLP with FSDP
    weights and float16 Adam state."""
    mesh = _mesh()
    sizes = (64, 128, 128, 16)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros((b,))}
              for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:]))]
    params = sfy.as_scaled_array(params, dtype=jnp.float16)

    batch = NamedSharding(mesh, P("data"))

    def loss(params, x, y):
        h = x
        for i, layer in enumerate(params):
            h = jax.lax.with_sharding_constraint(h, batch)  # FSDP: activations split by batch
            h = h @ layer["w"] + layer["b"]
            h = jax.nn.gelu(h) if i + 1 < len(params) else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    opt = sfy.optim.scaled_state(optax.adam(1e-3), dtype=jnp.float16)
    loss8 = sfy.fp8.autocast(loss, keep_output=False)

    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss8)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    spec = lambda path, x: P("data", None) if np.ndim(x) == 2 else P()  # noqa: E731
    params = _shard(params, mesh, spec)
    state = opt.init(params)
    rows = NamedSharding(mesh, P("data"))
    x = sfy.as_scaled_array(jax.device_put(jnp.ones((32, sizes[0])), rows), dtype=jnp.float16)
    y = jax.device_put(jnp.zeros((32,), jnp.int32), rows)
    text = _post_partitioner(sfy.scalify(step), (params, state, x, y), tmp_path)
    shapes = {f"[{a},{b}]" for a, b in zip(sizes[:-1], sizes[1:])}
    _check_fp8_collectives(comm_bytes.collectives(text, (8, 1)), shapes, n_gathers=3, n_reductions=3)


def test_sharded_float16_contraction_reduces_in_float16_without_overflow(tmp_path):
    """A weight gradient ``x.T @ g`` with the batch split over 8 devices: the partial sums
    are summed across devices in float16, and data whose partial sums would overflow
    float16 under the static ``pow2(sqrt(K))`` estimate (every product is 2**20, K = 512)
    still give finite data and the float32 value (the measured headroom)."""
    mesh = _mesh()
    rows = NamedSharding(mesh, P("data"))
    x = sfy.ScaledArray(jax.device_put(jnp.full((512, 16), 2.0**10, jnp.float16), rows), jnp.float32(2.0**-30))
    g = sfy.ScaledArray(jax.device_put(jnp.full((512, 8), -(2.0**10), jnp.float16), rows), jnp.float32(2.0**40))

    def weight_grad(x, g):
        return x.T @ g

    out = jax.jit(sfy.scalify(weight_grad))(x, g)
    assert out.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(out.data, np.float32)))
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)), -512 * 2.0**30, rtol=1e-3)

    text = _post_partitioner(sfy.scalify(weight_grad), (x, g), tmp_path)
    reductions = [c for c in comm_bytes.collectives(text, (8, 1)) if not c.scalar and c.kind != "all-gather"]
    assert reductions and all(c.dtypes == ["f16"] for c in reductions), [(c.kind, c.shape) for c in reductions]



def test_sharded_sum_of_a_product_reduces_in_16_bits(tmp_path):
    """A layer norm gain's gradient, ``sum(dy * xhat)`` over a batch split over 8
    devices, with the range guard on: the product is summed in float32 in 8 groups, and
    only the group sums cross devices, in float16 (before: the float32 vector). Products
    of 2**9-sized data (2**18 each: beyond float16 at their static scale) give finite
    data and the float32 value to two float16 roundings."""
    mesh = _mesh()
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16, 8, 32)).astype(np.float32)
    x = sfy.ScaledArray(jax.device_put(jnp.asarray(a * 2.0**9, jnp.float16), rows), jnp.float32(2.0**-20))
    y = sfy.ScaledArray(jax.device_put(jnp.asarray(b * 2.0**9, jnp.float16), rows), jnp.float32(2.0**12))

    def gain_grad(x, y):
        return jax.lax.reduce_sum(x * y, (0, 1))

    out = jax.jit(sfy.scalify(gain_grad))(x, y)
    assert out.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(out.data, np.float32)))
    ref = np.sum(np.asarray(sfy.asarray(x, dtype=jnp.float32)) * np.asarray(sfy.asarray(y, dtype=jnp.float32)), (0, 1))
    got = np.asarray(sfy.asarray(out, dtype=jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2**-9 * np.max(np.abs(ref)))

    text = _post_partitioner(sfy.scalify(gain_grad), (x, y), tmp_path)
    reductions = [c for c in comm_bytes.collectives(text, (8, 1)) if not c.scalar and c.kind != "all-gather"]
    assert reductions and all(c.dtypes == ["f16"] for c in reductions), [(c.kind, c.shape, c.dtypes) for c in reductions]

RNG_TABLE = np.random.default_rng(5).standard_normal((8, 64))


def test_broadcast_operand_is_gathered_in_its_data_dtype(tmp_path):
    """A feature-sharded float16 table added to batch-sharded activations (a position
    embedding under FSDP): the partitioner gathers the table at the add, and it moves
    its float16 data there, not the float32 that the add computes in."""
    mesh = _mesh()
    table = sfy.as_scaled_array(jax.device_put(jnp.asarray(RNG_TABLE, jnp.float32),
                                               NamedSharding(mesh, P(None, "data"))), dtype=jnp.float16)
    x = sfy.as_scaled_array(jax.device_put(jnp.ones((16, 8, 64), jnp.float32), NamedSharding(mesh, P("data"))),
                            dtype=jnp.float16)

    def add_table(x, table):
        return jax.lax.with_sharding_constraint(x + table, NamedSharding(mesh, P("data")))

    out = jax.jit(sfy.scalify(add_table))(x, table)
    np.testing.assert_allclose(np.asarray(sfy.asarray(out, dtype=jnp.float32)), np.broadcast_to(
        1 + np.asarray(RNG_TABLE, np.float16).astype(np.float64), (16, 8, 64)), rtol=2e-3, atol=2e-3)
    text = _post_partitioner(sfy.scalify(add_table), (x, table), tmp_path)
    gathers = [c for c in comm_bytes.collectives(text, (8, 1)) if c.kind == "all-gather" and not c.scalar]
    assert gathers and all(c.dtypes == ["f16"] for c in gathers), [(c.shape, c.dtypes) for c in gathers]


HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f16[4,6])) -> pred[] {
  %p = (s32[], f16[4,6]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f16[4,6])) -> (s32[], f16[4,6]) {
  %p = (s32[], f16[4,6]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f16[4,6]{1,0} get-tuple-element(%p), index=1
  %ag = f16[4,6]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, use_global_device_ids=true
  %rs = f16[1,6]{1,0} reduce-scatter(%ag), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f16[4,6]) tuple(%i, %ag)
}

ENTRY %main () -> f32[] {
  %c = s32[] constant(0)
  %z = f16[4,6]{1,0} constant({...})
  %t = (s32[], f16[4,6]) tuple(%c, %z)
  %w = (s32[], f16[4,6]) while(%t), condition=%cond, body=%body
  %v = f32[] constant(1)
  ROOT %ar = f32[] all-reduce(%v), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}
"""


def test_parser_reads_trip_counts_groups_and_bytes():
    colls = {c.kind: c for c in comm_bytes.collectives(HLO, (4, 2))}
    ag, rs, ar = colls["all-gather"], colls["reduce-scatter"], colls["all-reduce"]
    assert ag.runs == rs.runs == 3 and ar.runs == 1  # the loop body runs 3 times
    assert (ag.group, ag.axes) == (4, "data") and ag.bytes == 3 * 4 * 6 * 2
    assert (rs.group, rs.axes) == (4, "data") and rs.bytes == 3 * 1 * 6 * 2 * 4  # operand: result x group
    assert (ar.group, ar.axes, ar.scalar) == (2, "model", True)
    summary = comm_bytes.summarise(list(colls.values()))
    assert summary["bytes_by_category"]["weight_all_gather"] == ag.bytes
    assert summary["bytes_by_category"]["gradient_reduction"] == rs.bytes
    assert summary["scalar_all_reduces"] == {"runs": 1, "instructions": 1}
