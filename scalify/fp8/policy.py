"""What `autocast` does: the float8 formats, and which matmuls keep their precision.

`Fp8Policy` holds every choice in one value. Its ``keep`` filter sees each matrix
product of the traced function as a `MatmulInfo` -- shapes, dtypes, its name stack
(Flax module paths, `jax.named_scope` names) and source line -- and says whether it
stays in its own precision; `keep_names` builds the common filter, by name.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

E4M3 = np.dtype(jnp.float8_e4m3fn)
E5M2 = np.dtype(jnp.float8_e5m2)


@dataclasses.dataclass(frozen=True)
class MatmulInfo:
    """What `autocast`'s ``keep`` filter sees of one matrix product of the traced function.

    Attributes:
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
      lhs_shape, rhs_shape, out_shape: shapes of the operands and the result.
      lhs_dtype, rhs_dtype, out_dtype: their dtypes.
      name: the equation's name stack, e.g. ``"Transformer/head"`` (Flax module paths,
        `jax.named_scope` names; nested jit/scan bodies are joined with ``/``).
      source: the user's source line, ``"file.py:12 (fn)"``.
      params: the primitive's parameters (``dimension_numbers``, ...).
    """

    primitive: str
    lhs_shape: Tuple[int, ...]
    rhs_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_dtype: np.dtype
    name: str
    source: str
    params: Dict[str, Any] = dataclasses.field(repr=False, compare=False, hash=False)

    @property
    def flops(self) -> int:
        """Multiply-adds times two: ``2 * prod(out_shape) * K``."""
        if self.primitive == "dot_general":
            (lc, _), _ = self.params["dimension_numbers"]
            k = int(np.prod([self.lhs_shape[d] for d in lc], dtype=np.int64))
        else:  # convolution: K = kernel size / output features
            k = int(np.prod(self.rhs_shape, dtype=np.int64)) // max(self._out_features(), 1)
        return 2 * int(np.prod(self.out_shape, dtype=np.int64)) * k

    def _out_features(self) -> int:
        dn = self.params.get("dimension_numbers")
        spec = getattr(dn, "rhs_spec", None)
        return int(self.rhs_shape[spec[0]]) if spec is not None else int(self.rhs_shape[0])


def _name_segments(name: str) -> List[str]:
    """``"jvp(Model)/head"`` -> ``["Model", "head"]`` (transform wrappers removed)."""
    out = []
    for seg in name.split("/"):
        while True:
            m = re.fullmatch(r"[\w.\-]+\((.*)\)", seg)
            if not m:
                break
            seg = m.group(1)
        if seg:
            out.append(seg)
    return out


def keep_names(*names: str) -> Callable[[MatmulInfo], bool]:
    """A ``keep`` filter: keep in higher precision the matmuls whose name stack contains
    one of ``names`` as a path component (``"head"`` matches ``"Model/head"`` and
    ``"Model/head/Dense_0"``, not ``"Model/header"``); a name with ``/`` matches
    consecutive components (``"decoder/head"``).

    Names come from Flax module paths (``nn.Dense(..., name="head")``) and from
    `jax.named_scope`.
    """
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("keep_names expects one or more non-empty strings.")
    wanted = [_name_segments(n) for n in names]

    def keep(info: MatmulInfo) -> bool:
        segs = _name_segments(info.name)
        for w in wanted:
            for i in range(len(segs) - len(w) + 1):
                if segs[i : i + len(w)] == w:
                    return True
        return False

    keep.__name__ = f"keep_names{names!r}"
    return keep


def _as_keep(keep: Any) -> Optional[Callable[[MatmulInfo], bool]]:
    if keep is None or callable(keep):
        return keep
    if isinstance(keep, str):
        return keep_names(keep)
    if isinstance(keep, (list, tuple)) and all(isinstance(k, str) for k in keep):
        return keep_names(*keep)
    raise TypeError(
        "Fp8Policy: `keep` must be None, a callable MatmulInfo -> bool, a name or a list of "
        f"names, got {keep!r}."
    )


def _float_dtype(name: str, dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"Fp8Policy: {name} must be a floating dtype, got {d}.")
    return d


@dataclasses.dataclass(frozen=True)
class Fp8Policy:
    """Which matmuls `autocast` runs in float8, and in which formats.

    A policy is a value: make one for a model, hand it to `autocast`
    (``autocast(loss, policy)``), derive another with `dataclasses.replace`. Its fields
    are `autocast`'s keyword arguments, with the same defaults and meanings; they are
    checked when the policy is made, dtypes become NumPy dtypes and a name or a list of
    names in ``keep`` becomes a `keep_names` filter.

    Attributes:
      fwd_dtype: the operands' format on the forward pass (E4M3).
      bwd_dtype: the output cotangent's format on the backward pass (E5M2).
      keep: None, or a callable ``MatmulInfo -> bool`` saying which matmuls keep their
        precision.
      conv: also run convolutions in float8.
      rescale: which float8 casts first move the data's RMS into the scale: ``"grad"``
        (the output cotangents), ``"all"`` (the forward operands too) or None.
      keep_output: keep the output projection in its own precision.
    """

    fwd_dtype: Any = E4M3
    bwd_dtype: Any = E5M2
    keep: Any = None
    conv: bool = False
    rescale: Optional[str] = "grad"
    keep_output: bool = True

    def __post_init__(self) -> None:
        if self.rescale not in (None, "grad", "all"):
            raise ValueError(f"Fp8Policy: rescale must be None, 'grad' or 'all', got {self.rescale!r}.")
        # A frozen dataclass: the normalised fields are set as __init__ sets them.
        object.__setattr__(self, "fwd_dtype", _float_dtype("fwd_dtype", self.fwd_dtype))
        object.__setattr__(self, "bwd_dtype", _float_dtype("bwd_dtype", self.bwd_dtype))
        object.__setattr__(self, "keep", _as_keep(self.keep))
        object.__setattr__(self, "conv", bool(self.conv))
        object.__setattr__(self, "keep_output", bool(self.keep_output))

