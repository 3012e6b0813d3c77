import jax
import jax.numpy as jnp
import numpy as np

import scalify as sfy
from tests.utils import scaled


def _mlp_step(params, x):
    def loss(p):
        h = jax.nn.relu(x @ p["w1"])
        return jnp.mean(jnp.square(h @ p["w2"]))

    l, g = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), l


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"w1": jax.random.normal(k1, (8, 16)) / 3, "w2": jax.random.normal(k2, (16, 4)) / 4}


def test_capture_records_scales_of_activations_and_trees():
    cap = sfy.telemetry.Capture()
    params = sfy.as_scaled_array(_params(), dtype=jnp.float16)
    x = sfy.as_scaled_array(jax.random.normal(jax.random.PRNGKey(1), (4, 8)), dtype=jnp.float16)
    step = jax.jit(sfy.scalify(_mlp_step))
    with cap.tracing():
        params, loss = step(params, x)
    cap.record_tree("weights", params)
    cap.end_step(loss)
    for _ in range(2):
        params, loss = step(params, x)
        cap.record_tree("weights", params)
        cap.end_step(loss)
    acts = [r for r in cap.records if r.kind == "activation"]
    assert {r.step for r in acts} == {0, 1, 2}
    assert any(r.name.startswith("dot_general @") and "test_telemetry.py" in r.name for r in acts)
    # The recorded log2 scale of the weights is the actual scale.
    w1 = [r for r in cap.records if r.kind == "weights" and "w1" in r.name and r.step == 2][0]
    assert w1.log2_scale == float(np.log2(float(params["w1"].scale)))
    np.testing.assert_allclose(w1.data_absmax, float(jnp.max(jnp.abs(params["w1"].data.astype(jnp.float32)))))
    assert cap.first_nonfinite() is None
    assert set(cap.log2_scales()) == {0, 1, 2}


def test_first_nonfinite_names_the_primitive_and_line():
    cap = sfy.telemetry.Capture()

    def f(x):
        y = x * 2.0
        z = jnp.log(y - 8.0)  # log of negative numbers: NaN starts here
        return jnp.sum(z * 3.0)

    x = scaled([1.0, 2.0, 5.0], 1.0)
    with cap.tracing():
        out = jax.jit(sfy.scalify(f))(x)
    cap.end_step(out)
    first = cap.first_nonfinite()
    assert first is not None and first["primitive"] == "log", first
    assert "test_telemetry.py" in first["where"] and first["step"] == 0
    # The filters: the NaN is in activations, none in the (absent) recorded trees.
    assert cap.first_nonfinite(kinds=("activation",))["primitive"] == "log"
    assert cap.first_nonfinite(exclude_kinds=("activation",)) is None
    cap.record_tree("weights", {"w": scaled([1.0, np.inf], 1.0)})
    cap.end_step()
    tree = cap.first_nonfinite(exclude_kinds=("activation",))
    assert tree is not None and tree["kind"] == "weights" and tree["step"] == 1, tree


def test_plot_scales_writes_png(tmp_path):
    cap = sfy.telemetry.Capture()
    for _ in range(3):
        cap.record_tree("weights", sfy.as_scaled_array(_params(), dtype=jnp.float16))
        cap.end_step()
    path = sfy.telemetry.plot_scales(cap, str(tmp_path / "scales.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
