"""Scale telemetry: per-tensor log2 scales and data statistics over training, and the
first non-finite value with the primitive and source line that produced it.

Usage in a training loop::

    cap = sfy.telemetry.Capture()
    step_fn = jax.jit(sfy.scalify(step))
    with cap.tracing():                    # taps are inserted when the step is traced
        out = step_fn(params, batch)       # first call traces: every scaled op is tapped
    for i in range(steps):
        params, loss = step_fn(params, batch)
        cap.record_tree("weights", params)  # concrete trees: recorded eagerly
        cap.end_step(loss)                  # blocks on the step, closes the record

    cap.first_nonfinite()                   # {'step', 'primitive', 'where', ...} or None
    cap.first_nonfinite(exclude_kinds=("activation",))  # weights, gradients, state only
    sfy.telemetry.plot_scales(cap, "scales.png")

Activations and gradients inside the step are tapped with `jax.debug.callback`: each
equation's ScaledArray output reports its log2 scale, the RMS and max-abs of its data and
the fractions of zero and non-finite data. Tapping costs a reduction and a host callback
per equation: use it for diagnosis runs, not for benchmarks.
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scalify import _jax_compat
from scalify.core.datatype import ScaledArray, is_float_dtype, is_scaled_leaf
from scalify.core.interpreter import observe


@dataclasses.dataclass
class TensorStats:
    """Statistics of one tensor at one step."""

    step: int
    kind: str  # "weights", "gradients", "activation" ...
    name: str  # tree path or "primitive @ file:line"
    order: int  # program order of the equation within the step (-1 for trees)
    log2_scale: float
    data_rms: float
    data_absmax: float
    zero_fraction: float
    nonfinite: int


def _data_stats(data: Any, scale: Any) -> Dict[str, Any]:
    d = jnp.asarray(data).astype(jnp.float32)
    finite = jnp.isfinite(d)
    safe = jnp.where(finite, d, 0.0)
    return {
        "log2_scale": jnp.log2(jnp.asarray(scale, jnp.float32)),
        "data_rms": jnp.sqrt(jnp.mean(safe * safe)),
        "data_absmax": jnp.max(jnp.abs(safe)) if d.size else jnp.float32(0),
        "zero_fraction": jnp.mean((d == 0).astype(jnp.float32)),
        "nonfinite": jnp.sum(~finite),
    }


class Capture:
    """Collects `TensorStats` records over steps (see module docstring)."""

    def __init__(self) -> None:
        self.records: List[TensorStats] = []
        self.step = 0
        self._lock = threading.Lock()
        self._order = 0

    # --- tapping inside scalify ------------------------------------------------------
    def _observer(self, eqn: Any, invals: Any, outvals: Any) -> None:
        where = _jax_compat.source_line(eqn)
        for out in outvals:
            if isinstance(out, ScaledArray):
                data, scale = out.data, out.scale
            elif hasattr(out, "dtype") and is_float_dtype(out.dtype) and not isinstance(out, np.ndarray):
                data, scale = out, jnp.float32(1.0)
            else:
                continue
            order = self._order
            self._order += 1
            name = f"{eqn.primitive.name} @ {where}"
            # Name and order are static: bound into the callback, not passed as arrays.
            jax.debug.callback(functools.partial(self._receive, name, order), _data_stats(data, scale))

    def _receive(self, name: str, order: int, stats: Dict[str, Any]) -> None:
        with self._lock:
            self.records.append(TensorStats(self.step, "activation", name, order,
                                            **{k: float(v) for k, v in stats.items()}))

    @contextlib.contextmanager
    def tracing(self) -> Iterator["Capture"]:
        """While active, functions traced by `scalify` tap every equation's output."""
        self._order = 0
        with observe(self._observer):
            yield self

    # --- eager recording of concrete trees -------------------------------------------
    def record_tree(self, kind: str, tree: Any) -> None:
        """Record statistics of every float leaf of a concrete pytree (e.g. weights)."""
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_scaled_leaf)[0]
        for path, leaf in leaves:
            if isinstance(leaf, ScaledArray):
                data, scale = leaf.data, leaf.scale
            elif hasattr(leaf, "dtype") and is_float_dtype(leaf.dtype):
                data, scale = leaf, 1.0
            else:
                continue
            stats = jax.device_get(_data_stats(data, scale))
            self.records.append(TensorStats(self.step, kind, jax.tree_util.keystr(path), -1,
                                            **{k: float(v) for k, v in stats.items()}))

    def end_step(self, *block_on: Any) -> None:
        """Wait for ``block_on`` (the step's outputs) so its taps have arrived; next step."""
        jax.block_until_ready(block_on)
        jax.effects_barrier()
        self.step += 1

    # --- queries ---------------------------------------------------------------------
    def first_nonfinite(self, kinds: Optional[Sequence[str]] = None,
                        exclude_kinds: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
        """The earliest step's first equation (program order) whose output holds a
        non-finite value: ``{'step', 'primitive', 'where', 'kind', 'count'}``, or None.

        ``kinds`` restricts the search to records of those kinds; ``exclude_kinds``
        leaves some out. A causal mask filled with ``-inf`` is a non-finite activation by
        design: ``exclude_kinds=("activation",)`` then looks only at the recorded trees
        (weights, gradients, optimizer state)."""
        bad = [r for r in self.records if r.nonfinite > 0 and r.kind not in exclude_kinds
               and (kinds is None or r.kind in kinds)]
        if not bad:
            return None
        first = min(bad, key=lambda r: (r.step, r.order < 0, r.order))
        prim, _, where = first.name.partition(" @ ")
        return {"step": first.step, "primitive": prim, "where": where or first.name,
                "kind": first.kind, "count": int(first.nonfinite)}

    def log2_scales(self, kind: Optional[str] = None) -> Dict[int, np.ndarray]:
        """Per step, the log2 scales of all recorded tensors (optionally of one kind).
        All-zero tensors (scale 0: no magnitude, log2 of -inf) are left out."""
        out: Dict[int, List[float]] = {}
        for r in self.records:
            if (kind is None or r.kind == kind) and np.isfinite(r.log2_scale):
                out.setdefault(r.step, []).append(r.log2_scale)
        return {k: np.asarray(v) for k, v in sorted(out.items())}


def plot_scales(capture: Capture, path: str, title: str = "Per-tensor scales over training") -> str:
    """PNG of per-tensor log2-scale distributions over steps, one panel per kind
    (activations, weights, gradients...). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r.kind for r in capture.records})
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(5 * max(len(kinds), 1), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        per_step = capture.log2_scales(kind)
        steps = list(per_step)
        if steps:
            data = [per_step[s] for s in steps]
            pct = np.array([np.percentile(d, [0, 10, 50, 90, 100]) for d in data])
            ax.fill_between(steps, pct[:, 0], pct[:, 4], alpha=0.2, label="min-max")
            ax.fill_between(steps, pct[:, 1], pct[:, 3], alpha=0.4, label="10-90%")
            ax.plot(steps, pct[:, 2], label="median")
        ax.set_title(kind)
        ax.set_xlabel("step")
        ax.set_ylabel("log2(scale)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
