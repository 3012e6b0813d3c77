"""Sharding the main job over a device mesh: FSDP over ``data``, tensor parallel over ``model``.

The mesh has two named axes (`make_mesh`, from ``--mesh data=4,model=2``):

  data   data parallel with FSDP: each batch is split over ``data``, and every weight
         matrix (and its optimizer state) is sharded over ``data`` along one dimension,
         so each device stores 1/data of it; XLA gathers a weight for its use and
         reduce-scatters its gradient.
  model  Megatron-style tensor parallel: the first matmul of each pair is
         column-parallel (its output features split over ``model``: the query/key/value
         projection, the MLP's first layer), the second row-parallel (its input features
         split: the attention output projection, the MLP's second layer), so one pair
         needs one reduction of its output, not a gather in between.

`param_specs` gives each parameter of a family (benchmarks/models.py) its
`PartitionSpec` from a table of path patterns; a dimension that does not divide by its
axis' size (the 97-character vocabulary) stays replicated along that axis. Small vectors
(norm gains, biases of row-parallel layers) are replicated. JAX's SPMD partitioner does
all the communication: these specs only say where each array lives.

ScaledArrays are placed with their ``data`` sharded as the parameter and their
``scale`` (a float32 scalar) replicated on every device (`tree_shardings`). Optimizer
state takes the sharding of the parameter it mirrors (matched by tree path), its
counters are replicated.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import scalify as sfy

AXES = ("data", "model")

# Per family: (regex on the parameter's path, spec). First match wins; no match: replicated.
# Column-parallel weights split their output features over "model", row-parallel ones
# their input features; FSDP splits the other dimension over "data".
SPECS: Dict[str, List[Tuple[str, Tuple[Optional[str], ...]]]] = {
    # benchmarks/gpt.py: blocks are stacked over a leading layer axis (lax.scan), kernels
    # are (in, out).
    "gpt": [
        (r"blocks/(wqkv|w1)$", (None, "data", "model")),
        (r"blocks/(wo|w2)$", (None, "model", "data")),
        (r"^(tok_emb|pos_emb)$", (None, "data")),
        (r"^head$", ("data", "model")),
    ],
    # Flax linen GPT-2: DenseGeneral kernels (d, heads, d_head) / (heads, d_head, d).
    "gpt2": [
        (r"attn/(query|key|value)/kernel$", ("data", "model", None)),
        (r"attn/(query|key|value)/bias$", ("model", None)),
        (r"attn/out/kernel$", ("model", None, "data")),
        (r"c_fc/kernel$", ("data", "model")),
        (r"c_fc/bias$", ("model",)),
        (r"c_proj/kernel$", ("model", "data")),
        (r"(wte|wpe)/embedding$", (None, "data")),
    ],
    # Flax NNX Llama: nnx.Linear kernels are (in, out).
    "llama": [
        (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("data", "model")),
        (r"(o_proj|down_proj)/kernel$", ("model", "data")),
        (r"embed_tokens/embedding$", (None, "data")),
        (r"lm_head/kernel$", ("data", "model")),
    ],
    # Equinox: eqx.nn.Linear weights are (out, in).
    "equinox": [
        (r"(query_proj|key_proj|value_proj|fc1)/weight$", ("model", "data")),
        (r"(query_proj|key_proj|value_proj|fc1)/bias$", ("model",)),
        (r"(output_proj|fc2)/weight$", ("data", "model")),
        (r"(tok|pos)/weight$", (None, "data")),
        (r"head/weight$", ("model", "data")),
    ],
}


def parse_mesh(text: str) -> Dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}`` (an omitted axis has size 1)."""
    sizes = {a: 1 for a in AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected 'data=N,model=M' with positive sizes, got {part!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(sizes: Dict[str, int]) -> Mesh:
    """A ``(data, model)`` mesh of every (global) device; the product must be their count."""
    n = len(jax.devices())
    if sizes["data"] * sizes["model"] != n:
        raise ValueError(
            f"--mesh data={sizes['data']},model={sizes['model']} needs {sizes['data'] * sizes['model']} "
            f"devices, {n} are visible (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh((sizes["data"], sizes["model"]), AXES, axis_types=auto)


def _path_name(path: Sequence[Any]) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _fit(spec: Tuple[Optional[str], ...], shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` with every axis that does not divide its dimension dropped."""
    out = []
    for d, axis in enumerate(spec[: len(shape)]):
        out.append(axis if axis is not None and shape[d] % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_specs(family: str, params: Any, mesh: Mesh) -> Any:
    """The `PartitionSpec` of every leaf of ``params`` (plain arrays or ScaledArrays:
    the spec is the data's) by the family's table; unmatched leaves are replicated."""
    table = [(re.compile(p), s) for p, s in SPECS[family]]

    def spec(path: Any, x: Any) -> P:
        name = _path_name(path)
        for pattern, s in table:
            if pattern.search(name):
                return _fit(s, np.shape(x), mesh)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=sfy.core.is_scaled_leaf)


def tree_shardings(tree: Any, specs_by_path: Dict[str, P], mesh: Mesh) -> Any:
    """`NamedSharding`s for every array of ``tree`` (params, optimizer state, ...).

    A leaf whose path ends with a parameter's path (``0/mu/blocks/w1`` ends with
    ``blocks/w1``) and has the parameter's shape takes its spec; a ScaledArray's scale
    and every other leaf (step counters, loss scales) are replicated."""
    replicated = NamedSharding(mesh, P())

    def of(path: Any, x: Any) -> Any:
        name = _path_name(path)
        shape = np.shape(x.data if isinstance(x, sfy.ScaledArray) else x)
        spec = P()
        for pname, (pshape, pspec) in specs_by_path.items():
            if (name == pname or name.endswith("/" + pname)) and tuple(shape) == pshape:
                spec = pspec
                break
        if isinstance(x, sfy.ScaledArray):  # (data, scale) node holding shardings
            return jax.tree.unflatten(jax.tree.structure(x), [NamedSharding(mesh, spec), replicated])
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(of, tree, is_leaf=sfy.core.is_scaled_leaf)


def specs_by_path(family: str, params: Any, mesh: Mesh) -> Dict[str, Tuple[Tuple[int, ...], P]]:
    """``{path: (shape, spec)}`` of the parameters, longest path first (so a state leaf
    matches its own parameter, not a parameter whose path is a suffix of it)."""
    specs = param_specs(family, params, mesh)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=sfy.core.is_scaled_leaf)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    out = {}
    for (path, x), spec in zip(flat, spec_leaves):
        shape = np.shape(x.data if isinstance(x, sfy.ScaledArray) else x)
        out[_path_name(path)] = (tuple(shape), spec)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))


def place(tree: Any, shardings: Any) -> Any:
    """Put every array of ``tree`` (host or single-device values, the same on every
    process) on the devices of its sharding; works across processes."""

    def put(x: Any, sharding: NamedSharding) -> Any:
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    return jax.tree.map(put, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``(batch, seq)``: split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, P("data", None))


def host_value(x: Any) -> np.ndarray:
    """A replicated (or fully addressable) array as a NumPy array on this process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))
