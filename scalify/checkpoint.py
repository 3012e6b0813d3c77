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
- `CheckpointManager`: asynchronous, crash-safe checkpoints of (sharded) training state
  every N steps, kept under one directory as ``<directory>/<step>/``, built on orbax's
  ``CheckpointManager``. See below.

Loading needs ``like``: a tree of the expected structure whose leaves are arrays or
`jax.ShapeDtypeStruct`s (``jax.eval_shape(opt.init, params)`` gives one without
allocating). A checkpoint that does not match it raises `CheckpointMismatchError` naming
the missing, unexpected and mis-shaped paths. Restored leaves take the sharding of the
``like`` leaf when it has one.

CheckpointManager
-----------------
::

    state = init_state()                  # {"params": ..., "opt_state": ...}, sharded
    with checkpoint.CheckpointManager("ckpts", max_to_keep=3) as mgr:
        start = mgr.latest_step()         # None on a fresh run
        if start is not None:             # resume: same structure, state's shardings
            state = mgr.restore(like=state, step=start)
        for step in range(0 if start is None else start + 1, num_steps):
            state = train_step(state, ...)
            if step % N == 0:
                mgr.save(step, state)     # returns once the arrays are off the device
    # leaving the `with` block waits for the last save and closes the manager

``like`` may also be a tree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``
(e.g. ``jax.eval_shape(init_state)`` with the target shardings added), which allocates
nothing before the restore.

- **Asynchronous.** ``save(step, tree)`` returns once the arrays have been copied off the
  device (orbax's ``AsyncCheckpointer``); files are written by background threads while
  training goes on, so the caller may donate or overwrite the saved buffers right after.
  A new ``save`` first waits for the previous one; ``wait()`` blocks until every pending
  save is complete on disk, and ``close()`` / leaving the ``with`` block wait too. A
  failure of a background write is raised by the next ``save``, ``wait`` or ``close``.
  ``save`` raises `ValueError` if the step already has a complete checkpoint. Every
  process of a multi-process run must call ``save``/``restore`` with its part of the
  same global arrays (orbax coordinates the writes); only the primary process writes the
  metadata.
- **Crash safety.** orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and, once
  every file is written, adds ``commit_success.txt`` and renames the directory to
  ``<step>`` (on a local or POSIX file system; on GCS it marks completion by the commit
  file instead). A process killed mid-save (even SIGKILL) leaves the previous checkpoints
  untouched and at most a ``*.orbax-checkpoint-tmp`` directory, which is never reported
  by ``latest_step()``/``all_steps()`` (they list the finalized step directories on disk)
  and is removed by the next manager opened on the directory (in the background, at
  the latest before its first save, which may thus reuse the step number). Checkpoints beyond
  ``max_to_keep`` are first renamed atomically into ``<directory>/.scalify-trash/`` and
  then deleted in the background, so an interrupted deletion never leaves a half-deleted
  step in the listing. (A rename survives a process crash; surviving a power loss also
  needs a file system that orders the data writes before the rename.)
- **Integrity.** At save time a 32-bit fingerprint of every leaf is computed on the
  devices by one jitted function per device set (the leaf's bits viewed as unsigned
  integers, each element mixed by murmur3's ``fmix32`` and multiplied by an odd number
  derived from its position, summed with uint32 wraparound; the result is one replicated
  ``uint32`` per leaf, so it works for sharded arrays and in multi-process runs without
  gathering any array). The fingerprints, with every leaf's path, shape and dtype, are
  stored in the step's ``scalify`` JSON item next to the ``state`` item holding the
  arrays; once the save is complete (noticed by the next ``save``, ``wait`` or
  ``close``), the size of every file of the step is recorded in
  ``<step>/scalify/files.json``. ``restore`` checks those files (missing? other size?),
  reads the arrays, recomputes their fingerprints on the devices and compares: a
  mismatch, a missing, truncated or unreadable file, or any orbax/TensorStore read error
  raises `CheckpointCorruptError` naming the step directory, the leaf paths and the
  files involved when they can be identified (the missing or resized files, the file a
  read failed on, else the step's array data files), never returning wrong values. A
  structure, shape or dtype difference from ``like`` raises `CheckpointMismatchError` as
  for the other formats. A single changed element (32-bit word, for 64-bit types) of a
  leaf always changes its fingerprint; other corruptions go undetected with probability
  about 2**-32.
- **Resuming on another mesh.** ``restore(like, step=None)`` restores the newest
  complete checkpoint (``step`` picks another) into the structure of ``like``; each leaf
  takes the sharding of its ``like`` leaf (``jax.ShapeDtypeStruct(..., sharding=...)``
  or an array's), which may be on a different mesh shape or number of devices than the
  saving run; a ``like`` leaf without a sharding goes to the default device. Values are
  bit-identical in every case (checked by the fingerprints). In a multi-process run,
  ``restore(like)`` restores the latest step seen by process 0 on every process.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "save_npz",
    "load_npz",
    "save_orbax",
    "load_orbax",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointCorruptError",
]

_META = "__scalify_checkpoint__"
_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the tree it is restored into."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files are missing, truncated, unreadable or hold other values than
    were saved (fingerprint mismatch). The message names the step directory, the leaf
    paths and the files involved when they can be identified."""


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
        show = _show
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


# --------------------------------------------------------------------------------------
# CheckpointManager: asynchronous, crash-safe orbax checkpoints with on-device fingerprints.

_TREE_ITEM = "state"  # the orbax item holding the arrays (StandardSave)
_META_ITEM = "scalify"  # the JSON item: leaf paths, shapes, dtypes, fingerprints
_TRASH = ".scalify-trash"  # old steps are renamed here (atomic), then deleted
_FINGERPRINT = "fmix32-odd-position-weighted-sum-v1"
_FILES = "files.json"  # in the scalify item: the size of every file of a complete step
_META_KIND = "scalify.checkpoint.CheckpointManager"


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: a bijection of uint32 that mixes every bit."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _as_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32, elementwise (64-bit and complex elements get a trailing
    axis of two words), so the computation keeps the sharding of ``x``."""
    from jax import lax

    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    if bits == 64:
        return lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {
        2: getattr(jnp, "uint2", None),
        4: getattr(jnp, "uint4", None),
        8: jnp.uint8,
        16: jnp.uint16,
        32: jnp.uint32,
    }.get(bits)
    if unsigned is None:
        raise TypeError(f"cannot fingerprint an array of dtype {x.dtype} ({bits} bits).")
    if x.dtype != unsigned:
        x = lax.bitcast_convert_type(x, unsigned)
    return x.astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum_i fmix32(word_i) * (fmix32(i * golden + c) | 1) mod 2**32 over the row-major
    position i of every 32-bit word (an element of 32 bits or less is one word): any single
    changed word changes the sum (fmix32 is a bijection and the multiplier is odd), moved
    elements almost surely do."""
    from jax import lax

    w = _as_words(x)
    if w.size == 0:
        return jnp.zeros((), jnp.uint32)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        pos = pos + lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride % 2**32)
        stride *= w.shape[d]
    mult = _fmix32(pos * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15)) | np.uint32(1)
    return lax.reduce(_fmix32(w) * mult, np.uint32(0), lax.add, tuple(range(w.ndim)))


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(device_ids: Tuple[int, ...]) -> Any:
    """A jitted function of a list of arrays on the devices ``device_ids``: their
    fingerprints as one uint32 vector replicated on those devices."""
    by_id = {d.id: d for d in jax.devices()}
    mesh = jax.sharding.Mesh(np.array([by_id[i] for i in device_ids]), ("_fingerprint",))
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda xs: jnp.stack([_leaf_fingerprint(x) for x in xs]), out_shardings=out)


def _fingerprints(leaves: Sequence[Any]) -> List[int]:
    """The fingerprint of every leaf, computed on the devices holding it (one jitted call
    per device set, in the same order on every process); only the replicated uint32
    results are fetched, so sharded and non-fully-addressable arrays are fine."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    arrays = []
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        arrays.append(x)
        groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
    pending = [(idx, _fingerprint_fn(key)([arrays[i] for i in idx])) for key, idx in sorted(groups.items())]
    out = [0] * len(arrays)
    for idx, result in pending:
        for i, v in zip(idx, np.asarray(result.addressable_data(0))):
            out[i] = int(v)
    return out


def _default_sharding() -> jax.sharding.Sharding:
    device = jax.config.jax_default_device
    if isinstance(device, str):
        device = jax.local_devices(backend=device)[0]
    if device is None:
        device = jax.local_devices()[0]
    return jax.sharding.SingleDeviceSharding(device)


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (all processes must call this)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _agree_on_step(step: Optional[int]) -> Optional[int]:
    """Process 0's ``step`` on every process (their directory listings may differ while a
    save is being committed)."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    value = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    return None if value < 0 else value


def _size(path: Any) -> Optional[int]:
    """The size of a file in bytes, None if it does not exist."""
    try:
        return int(path.stat().length)
    except (OSError, AttributeError):
        try:
            return os.path.getsize(str(path))
        except OSError:
            return None


def _show(items: Sequence[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _exception_chain(e: Optional[BaseException]) -> List[BaseException]:
    out: List[BaseException] = []
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        stack.extend([x.__context__, x.__cause__])
    return out


def _short(e: BaseException) -> str:
    msg = str(e)
    for cut in (" [tensorstore_spec", " See full TensorStore details", "\n"):
        i = msg.find(cut)
        if i > 0:
            msg = msg[:i]
    msg = msg.strip()
    if len(msg) > 400:
        msg = msg[:400] + " ..."
    return f"{type(e).__name__}: {msg}"


class CheckpointManager:
    """Asynchronous, crash-safe checkpoints of a (sharded) tree every N steps.

    See the module docstring. Wraps ``orbax.checkpoint.CheckpointManager`` with async
    checkpointing; each step directory holds two orbax items: ``state`` (the arrays,
    ``StandardSave``) and ``scalify`` (JSON: leaf paths, shapes, dtypes, fingerprints;
    plus ``files.json``, the size of every file of the step, recorded once the save is
    complete).

    Args:
      directory: the directory of the checkpoints (created if missing); step ``s`` is
        ``<directory>/<s>``.
      max_to_keep: how many of the newest checkpoints to keep (``None``: all).
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3):
        ocp = _orbax()
        from etils import epath

        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}.")
        self._path = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self._directory = str(self._path)
        policies = getattr(ocp, "checkpoint_managers", None)
        if hasattr(policies, "LatestN"):
            keep = {"preservation_policy": policies.LatestN(n=max_to_keep)}
        else:  # pragma: no cover - orbax before preservation policies
            keep = {"max_to_keep": max_to_keep}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            **keep,
            # Remove the `<step>.orbax-checkpoint-tmp` directories of interrupted saves.
            cleanup_tmp_directories=True,
            # Old steps are renamed (atomically) out of the listing before being deleted.
            todelete_subdir=_TRASH,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self._path, options=options)
        self._worker: Optional[threading.Thread] = None
        self._unrecorded: Optional[int] = None  # a saved step whose files.json is not written yet
        self._closed = False
        self._purge_trash()

    @property
    def directory(self) -> str:
        return self._directory

    # -- listing ---------------------------------------------------------------------

    def all_steps(self) -> List[int]:
        """The steps of the complete (finalized) checkpoints on disk, ascending. A save in
        progress, or interrupted by a crash, is not listed."""
        ocp = _orbax()
        return sorted(int(s) for s in ocp.utils.checkpoint_steps(self._path))

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> Any:
        return self._path / str(step)

    # -- saving ----------------------------------------------------------------------

    def save(self, step: int, tree: Any) -> None:
        """Start saving ``tree`` (arrays, ScaledArrays, sharded or not) as ``step``.

        Returns once the arrays are copied off the devices (and their fingerprints
        computed); the files are written in the background. Waits for the previous save
        first (raising its error, if it failed). Numpy arrays and Python numbers are
        stored as ``jnp.asarray`` makes them.

        Raises:
          ValueError: ``step`` already has a checkpoint.
        """
        ocp = _orbax()
        where = "CheckpointManager.save"
        self._check_open(where)
        step = int(step)
        if step < 0:
            raise ValueError(f"{where}: step must be >= 0, got {step}.")
        self._finish_previous()
        if step in self.all_steps() or step in self._mngr.all_steps():
            raise ValueError(f"{where}: step {step} already has a checkpoint in {self._directory}.")
        tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), tree)
        named = _named_leaves(tree, where)
        fingerprints = _fingerprints([leaf for _, leaf in named])
        entries = []
        for (name, leaf), fp in zip(named, fingerprints):
            shape, dtype = _spec(leaf)
            entries.append({"path": name, "dtype": dtype.name, "shape": list(shape), "fingerprint": fp})
        meta = {
            "format": _FORMAT,
            "kind": _META_KIND,
            "step": step,
            "fingerprint": _FINGERPRINT,
            "leaves": entries,
        }
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{_TREE_ITEM: ocp.args.StandardSave(tree), _META_ITEM: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        previous, self._unrecorded = self._unrecorded, step
        # In the background: record the files of the previous (complete) step and delete
        # the steps its save moved to the trash.
        self._worker = threading.Thread(
            target=self._housekeeping, args=(previous,), name="scalify-checkpoint", daemon=True
        )
        self._worker.start()

    def wait(self) -> None:
        """Block until every pending save is complete on disk (raises a save's error)."""
        self._finish_previous()
        self._housekeeping(self._unrecorded)
        self._unrecorded = None

    def close(self) -> None:
        """Wait for the pending saves, then release orbax's resources."""
        if self._closed:
            return
        try:
            self._mngr.close()  # waits for the pending save
        finally:
            self._closed = True
            self._join_worker()
        self._housekeeping(self._unrecorded)
        self._unrecorded = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self, where: str) -> None:
        if self._closed:
            raise ValueError(f"{where}: the manager of {self._directory} is closed.")

    def _finish_previous(self) -> None:
        """Wait for orbax's pending save (raising its error) and for our background work."""
        try:
            self._mngr.wait_until_finished()
        finally:
            self._join_worker()

    def _join_worker(self) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def _housekeeping(self, step: Optional[int]) -> None:
        if step is not None:
            self._record_files(step)
        self._purge_trash()

    def _record_files(self, step: int) -> None:
        """Write ``<step>/scalify/files.json``: the size of every file of the complete
        ``step`` (primary process only; atomically, by a rename)."""
        if jax.process_index() != 0:
            return
        step_dir = self._step_dir(step)
        try:
            target = step_dir / _META_ITEM / _FILES
            if not step_dir.exists() or target.exists():
                return
            prefix = len(str(step_dir)) + 1
            files = {}
            for p in self._files(step_dir):
                size = _size(p)
                if size is not None and not p.name.startswith(f".{_FILES}"):
                    files[str(p)[prefix:]] = size
            tmp = step_dir / _META_ITEM / f".{_FILES}.tmp"
            tmp.write_text(json.dumps({"format": _FORMAT, "files": files}, sort_keys=True))
            tmp.rename(target)
        except OSError:  # pragma: no cover - e.g. the step was deleted meanwhile
            pass

    def _purge_trash(self) -> None:
        """Delete the steps orbax moved to the trash (primary process only)."""
        if jax.process_index() != 0:
            return
        trash = self._path / _TRASH
        try:
            entries = list(trash.iterdir()) if trash.exists() else []
        except OSError:  # pragma: no cover
            return
        for entry in entries:
            try:
                if entry.is_dir():
                    entry.rmtree()
                else:
                    entry.unlink()
            except OSError:  # pragma: no cover - retried by the next purge
                pass

    # -- restoring -------------------------------------------------------------------

    def restore(self, like: Any, step: Optional[int] = None) -> Any:
        """Restore ``step`` (default: the newest complete checkpoint) into the structure
        of ``like``: arrays or `jax.ShapeDtypeStruct`s (ScaledArrays included). Each leaf
        takes the sharding of its ``like`` leaf (any mesh; none: the default device).

        Raises:
          FileNotFoundError: no complete checkpoint (for ``step``).
          CheckpointMismatchError: structure, shape or dtype differ from ``like``.
          CheckpointCorruptError: files missing, truncated or unreadable, or values that
            differ from the saved ones (fingerprints).
        """
        ocp = _orbax()
        where = "CheckpointManager.restore"
        self._check_open(where)
        if step is None:
            step = _agree_on_step(self.latest_step())
            if step is None:
                raise FileNotFoundError(f"{where}: no complete checkpoint in {self._directory}.")
        else:
            step = int(step)
            steps = self.all_steps()
            if step not in steps:
                raise FileNotFoundError(
                    f"{where}: no complete checkpoint of step {step} in {self._directory} "
                    f"(complete steps: {steps})."
                )
        step_dir = self._step_dir(step)

        # 0. The files recorded once the save was complete: all there, same sizes.
        damaged = self._check_recorded_files(step_dir)
        if _any_process(bool(damaged)) and not damaged:
            damaged = ["(another process found missing or truncated files; see its error)"]

        # 1. The scalify item: what was saved, with its fingerprints.
        error: Optional[BaseException] = None
        try:
            meta = self._mngr.restore(
                step, args=ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
            )[_META_ITEM]
            stored, saved_fps = self._parse_meta(meta)
        except Exception as e:  # noqa: BLE001 - any failure to read means a bad checkpoint
            error = e
        if _any_process(error is not None):
            raise self._read_error(step, step_dir, error, [], _META_ITEM, damaged) from error

        named = _check_match(stored, like, where)
        names = [n for n, _ in named]
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                *_spec(x), sharding=getattr(x, "sharding", None) or _default_sharding()
            ),
            like,
        )

        # 2. The arrays, read by orbax straight into the target shardings.
        restored = None
        try:
            restored = self._mngr.restore(
                step, args=ocp.args.Composite(**{_TREE_ITEM: ocp.args.StandardRestore(target)})
            )[_TREE_ITEM]
            got = _named_leaves(restored, where)
            if [n for n, _ in got] != names or any(_spec(x) != stored[n] for n, x in got):
                raise ValueError(
                    "orbax returned other leaves than saved: "
                    + _show([f"{n}: {_spec(x)[1]}{list(_spec(x)[0])}" for n, x in got])
                )
        except Exception as e:  # noqa: BLE001
            error = e
        if _any_process(error is not None):
            raise self._read_error(step, step_dir, error, names, _TREE_ITEM, damaged) from error

        # 3. The values: recompute the fingerprints on the devices and compare.
        fps = _fingerprints(jax.tree.leaves(restored))
        mismatched = [
            f"{n} (saved {saved_fps[n]:#010x}, read {fp:#010x})"
            for n, fp in zip(names, fps)
            if fp != saved_fps[n]
        ]
        if mismatched:
            reason = "the restored values differ from the saved ones (fingerprint mismatch)"
            raise self._corrupt(step, step_dir, reason, mismatched, damaged, data_files=not damaged)
        if damaged:
            reason = "files of the step are missing or changed since it was saved"
            leaves = [f"none read wrong values (all {len(names)} match their saved fingerprints)"]
            raise self._corrupt(step, step_dir, reason, leaves, damaged)
        return restored

    @staticmethod
    def _parse_meta(meta: Any) -> Tuple[_Specs, Dict[str, int]]:
        if not isinstance(meta, dict) or meta.get("kind") != _META_KIND or meta.get("format") != _FORMAT:
            raise ValueError(f"not a {_META_KIND} metadata item (format {_FORMAT}): {str(meta)[:200]}")
        if meta.get("fingerprint") != _FINGERPRINT:
            raise ValueError(f"unknown fingerprint scheme {meta.get('fingerprint')!r}")
        stored: _Specs = {}
        fps: Dict[str, int] = {}
        for e in meta["leaves"]:
            stored[e["path"]] = (tuple(int(d) for d in e["shape"]), _dtype_from_name(e["dtype"]))
            fps[e["path"]] = int(e["fingerprint"])
        return stored, fps

    # -- file checks and error messages ----------------------------------------------

    @staticmethod
    def _files(root: Any) -> List[Any]:
        out, stack = [], [root]
        while stack:
            d = stack.pop()
            try:
                for p in d.iterdir():
                    (stack if p.is_dir() else out).append(p)
            except OSError:  # pragma: no cover - vanished or unreadable directory
                continue
        return sorted(out, key=str)

    def _check_recorded_files(self, step_dir: Any) -> List[str]:
        """The files listed in ``files.json`` that are now missing or of another size."""
        record = step_dir / _META_ITEM / _FILES
        try:
            if not record.exists():
                return []  # the process stopped before recording them: nothing to compare
            files = json.loads(record.read_text())["files"]
            items = sorted((str(k), int(v)) for k, v in files.items())
        except Exception:  # noqa: BLE001
            return [f"{record} (unreadable: truncated or overwritten)"]
        out = []
        for rel, size in items:
            now = _size(step_dir / rel)
            if now is None:
                out.append(f"{step_dir / rel} (missing; {size} bytes when saved)")
            elif now != size:
                out.append(f"{step_dir / rel} ({now} bytes, {size} when saved: truncated or overwritten)")
        return out

    def _data_files(self, step_dir: Any) -> List[str]:
        """The files holding the array bytes of a step (OCDBT ``d/`` files, else all the
        files of the ``state`` item), largest first."""
        files = self._files(step_dir / _TREE_ITEM)
        data = [p for p in files if p.parent.name == "d"] or files
        sized = [(_size(p), str(p)) for p in data]
        sized = sorted(((s, n) for s, n in sized if s is not None), key=lambda t: (-t[0], t[1]))
        return [f"{name} ({size} bytes)" for size, name in sized]

    def _broken_metadata_files(self, step_dir: Any) -> List[str]:
        """orbax's metadata files of the step that are missing or not valid JSON."""
        out = []
        tree_dir = step_dir / _TREE_ITEM
        for p in (tree_dir / "_METADATA", step_dir / _META_ITEM / "metadata"):
            if not p.exists():
                out.append(f"{p} (missing)")
        if (tree_dir / "d").exists() and not (tree_dir / "manifest.ocdbt").exists():
            out.append(f"{tree_dir / 'manifest.ocdbt'} (missing)")
        candidates = [step_dir / "_CHECKPOINT_METADATA", tree_dir / "_METADATA", tree_dir / "_sharding"]
        candidates += [step_dir / _META_ITEM / "metadata"]
        if (tree_dir / "array_metadatas").exists():
            candidates += self._files(tree_dir / "array_metadatas")
        for p in candidates:
            try:
                if p.exists():
                    json.loads(p.read_text())
            except Exception:  # noqa: BLE001
                out.append(f"{p} (unreadable: not valid JSON, truncated or overwritten)")
        return out

    def _read_error(
        self,
        step: int,
        step_dir: Any,
        error: Optional[BaseException],
        names: List[str],
        item: str,
        damaged: List[str],
    ) -> CheckpointCorruptError:
        reason = f"reading its {item!r} item failed"
        if item == _META_ITEM:
            reason += " (the leaf paths, shapes, dtypes and fingerprints of the step)"
        if error is None:
            reason += " on another process (see its error)"
            return self._corrupt(step, step_dir, reason, [], damaged, data_files=not damaged)
        chain = _exception_chain(error)
        text = "\n".join(f"{e!s} {e!r}" for e in chain)
        # Leaves named by the error (orbax's keys are the tree paths joined with ".").
        leaves = [
            name
            for name in names
            if any(f"{q}{name.replace('/', '.')}{end}" in text for q in "\"'" for end in ("/", q))
        ]
        # Files named by the error, orbax metadata files that are missing or unreadable.
        files = list(damaged)
        seen = {f.split(" (")[0] for f in files}
        for m in re.finditer(re.escape(str(step_dir)) + r"[^\s\"'\],)]*", text):
            p = m.group(0).rstrip("/")
            if p in seen or os.path.isdir(p):
                continue
            seen.add(p)
            size = _size(p)
            files.append(f"{p} ({'missing' if size is None else f'{size} bytes'})")
        for f in self._broken_metadata_files(step_dir):
            if f.split(" (")[0] not in seen:
                seen.add(f.split(" (")[0])
                files.append(f)
        messages: List[str] = []
        for e in (chain[0], chain[-1]):
            if _short(e) not in messages:
                messages.append(_short(e))
        return self._corrupt(
            step, step_dir, reason, leaves, files, data_files=not files, errors=messages, n_leaves=len(names)
        )

    def _corrupt(
        self,
        step: int,
        step_dir: Any,
        reason: str,
        leaves: List[str],
        files: List[str],
        data_files: bool = False,
        errors: Sequence[str] = (),
        n_leaves: int = 0,
    ) -> CheckpointCorruptError:
        lines = [f"CheckpointManager.restore: the checkpoint of step {step} in {step_dir} is corrupt: {reason}."]
        if leaves:
            lines.append(f"  leaves: {_show(leaves)}")
        elif n_leaves:
            lines.append(f"  leaves: not identified by the error (any of the {n_leaves} leaves may be affected)")
        if files:
            lines.append(f"  files: {_show(files)}")
        elif data_files:
            data = self._data_files(step_dir)
            lines.append(
                "  files: not identified; the step's array data files are: "
                + (_show(data, 12) if data else f"none found under {step_dir / _TREE_ITEM}")
            )
        for e in errors:
            lines.append(f"  error: {e}")
        lines.append(f"  Restore another step (complete steps: {self.all_steps()}) or delete this one.")
        return CheckpointCorruptError("\n".join(lines))
