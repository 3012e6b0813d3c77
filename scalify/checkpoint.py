"""Checkpoints of trees holding `ScaledArray`s: a dependency-free ``.npz`` path and orbax.

A `ScaledArray` is a pytree node with two children, ``data`` and ``scale``, so a tree of
params and optimizer state (`scalify.optim.scaled_state`) flattens to plain arrays:
float16/float8 data, float32 scales, integer counts. Both formats store each of those
arrays under its tree path (``"opt/0/mu/w/data"``) and restore them bit for bit.

- `save_npz` / `load_npz`: NumPy only. Each array is stored as its raw bytes with its
  dtype name and shape (so bfloat16 and float8 round-trip, NaN payloads included, with
  no pickling); the file is written to a temporary name and renamed, so an interrupted
  save never leaves a truncated checkpoint under ``path``.
- `save_orbax` / `load_orbax`: thin wrappers of ``orbax.checkpoint.StandardCheckpointer``
  (``pip install orbax-checkpoint``), which handles ScaledArray trees as they are; the
  wrappers add the same structure/shape/dtype check as `load_npz` (orbax would silently
  cast a dtype).

Loading needs ``like``: a tree of the expected structure whose leaves are arrays or
`jax.ShapeDtypeStruct`s (``jax.eval_shape(opt.init, params)`` gives one without
allocating). A checkpoint that does not match it raises `CheckpointMismatchError` naming
the missing, unexpected and mis-shaped paths. Restored leaves take the sharding of the
``like`` leaf when it has one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save_npz", "load_npz", "save_orbax", "load_orbax", "CheckpointMismatchError"]

_META = "__scalify_checkpoint__"
_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the tree it is restored into."""


def _token(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path: Tuple[Any, ...]) -> str:
    """A tree path as ``"a/0/b/data"`` (dict keys, sequence indices, attribute names)."""
    return "/".join(_token(k) for k in path) or "<root>"


def _spec(x: Any) -> Tuple[Tuple[int, ...], np.dtype]:
    if isinstance(x, (bool, int, float, complex)):
        x = np.asarray(x)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"a checkpoint leaf must be an array, got {type(x).__name__}.")
    return tuple(int(d) for d in x.shape), np.dtype(x.dtype)


def _named_leaves(tree: Any, what: str) -> List[Tuple[str, Any]]:
    out, seen = [], set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _path_name(path)
        if name in seen:
            raise ValueError(f"{what}: two leaves share the path name {name!r}.")
        seen.add(name)
        out.append((name, leaf))
    return out


def _dtype_from_name(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))


_Specs = Dict[str, Tuple[Tuple[int, ...], np.dtype]]


def _check_match(stored: _Specs, like: Any, where: str) -> List[Tuple[str, Any]]:
    named = _named_leaves(like, where)
    expected = {n: _spec(x) for n, x in named}
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    mismatched = [
        f"{n}: checkpoint {stored[n][1]}{list(stored[n][0])}, expected {expected[n][1]}{list(expected[n][0])}"
        for n in expected
        if n in stored and (stored[n][0] != expected[n][0] or stored[n][1] != expected[n][1])
    ]
    if missing or unexpected or mismatched:

        def show(items: List[str]) -> str:
            head = ", ".join(items[:8])
            return head + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"{where}: the checkpoint does not match the structure of `like`."]
        if missing:
            lines.append(f"  missing from the checkpoint: {show(missing)}")
        if unexpected:
            lines.append(f"  in the checkpoint but not in `like`: {show(unexpected)}")
        if mismatched:
            lines.append(f"  different shape or dtype: {show(mismatched)}")
        raise CheckpointMismatchError("\n".join(lines))
    return named


def _place(value: Any, like_leaf: Any) -> jax.Array:
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is not None:
        return jax.device_put(value, sharding)
    return jnp.asarray(value)


def save_npz(path: str, tree: Any) -> None:
    """Save every array of ``tree`` (ScaledArrays included) to the ``.npz`` file ``path``.

    Bit for bit: arrays are stored as raw bytes with their dtype name and shape. Leaves
    must be arrays or Python numbers.
    """
    named = _named_leaves(tree, "save_npz")
    arrays: Dict[str, np.ndarray] = {}
    entries = []
    for i, (name, leaf) in enumerate(named):
        shape, dtype = _spec(leaf)
        a = np.ascontiguousarray(np.asarray(leaf, dtype=dtype))
        arrays[f"leaf_{i}"] = np.frombuffer(a.tobytes(), dtype=np.uint8)
        entries.append({"path": name, "dtype": dtype.name, "shape": list(shape)})
    meta = json.dumps({"format": _FORMAT, "leaves": entries}).encode()
    arrays[_META] = np.frombuffer(meta, dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path: str, like: Any) -> Any:
    """Load a checkpoint written by `save_npz` into the structure of ``like``.

    ``like`` is a tree of arrays or `jax.ShapeDtypeStruct`s (ScaledArrays included) with
    the structure, shapes and dtypes of the saved tree; its leaves' shardings, if any,
    are applied to the restored arrays.

    Raises:
      CheckpointMismatchError: paths missing or extra, or a shape or dtype differs.
    """
    with np.load(path, allow_pickle=False) as f:
        if _META not in f.files:
            raise ValueError(f"load_npz: {path} was not written by scalify.checkpoint.save_npz.")
        meta = json.loads(bytes(f[_META]).decode())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"load_npz: unknown checkpoint format {meta.get('format')!r} in {path}.")
        stored = {
            e["path"]: (tuple(e["shape"]), _dtype_from_name(e["dtype"])) for e in meta["leaves"]
        }
        index = {e["path"]: i for i, e in enumerate(meta["leaves"])}
        named = _check_match(stored, like, "load_npz")
        leaves = []
        for name, like_leaf in named:
            shape, dtype = stored[name]
            raw = f[f"leaf_{index[name]}"]
            value = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
            leaves.append(_place(value, like_leaf))
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "scalify.checkpoint's orbax functions need orbax-checkpoint: "
            "`pip install orbax-checkpoint` (or use save_npz/load_npz)."
        ) from e
    return ocp


def save_orbax(path: str, tree: Any) -> None:
    """Save ``tree`` with orbax's ``StandardCheckpointer`` to the directory ``path`` and
    wait until it is written. ``path`` must not exist yet."""
    ocp = _orbax()
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.abspath(path), tree)
        ck.wait_until_finished()


def _orbax_specs(ck: Any, path: str) -> _Specs:
    meta = ck.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:
        tree = getattr(meta, "item_metadata", meta)
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[_path_name(p)] = (tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype))
    return out


def load_orbax(path: str, like: Any) -> Any:
    """Restore a checkpoint written by `save_orbax` (or any orbax ``StandardCheckpointer``)
    into the structure of ``like`` (arrays or `jax.ShapeDtypeStruct`s; shardings kept).

    Raises:
      CheckpointMismatchError: paths missing or extra, or a shape or dtype differs.
    """
    ocp = _orbax()
    path = os.path.abspath(path)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(*_spec(x), sharding=getattr(x, "sharding", None)), like
    )
    with ocp.StandardCheckpointer() as ck:
        try:
            stored = _orbax_specs(ck, path)
        except (AttributeError, TypeError):  # pragma: no cover - orbax metadata API moved
            stored = None
        if stored is not None:
            _check_match(stored, like, "load_orbax")
        return ck.restore(path, target)
