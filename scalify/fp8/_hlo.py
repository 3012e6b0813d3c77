"""Readers of StableHLO and HLO text: the matrix products of a program.

`scalify.fp8.report` judges what these find. What they find, for each ``dot_general`` /
``dot`` / ``convolution`` or library GEMM / convolution call: operand and result types
and shapes, the contracted size when it can be read, the enclosing function or
computation, the library kernel that runs it, and each operand's *origin* -- the type
it had before any upcast, found by following ``convert`` back through data movement
and scale multiplications (``convert(f8 -> f32)`` then a transpose reads as float8).

Text, not an API: XLA has no stable programmatic view of its optimised HLO, and the
text is what users can paste into an issue. The readers are lenient: what they cannot
parse they skip.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

_MLIR_TYPES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "i1": "bool", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "ui8": "uint8", "ui16": "uint16", "ui32": "uint32", "ui64": "uint64",
    "pred": "bool", "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
}


def norm_dtype(t: str) -> str:
    """An MLIR or HLO element type (``f32``, ``bf16``, ``f8E4M3FN``, ``s32``) by its NumPy
    name (``float32``, ``bfloat16``, ``float8_e4m3fn``, ``int32``)."""
    t = t.strip()
    low = t.lower()
    if low.startswith("f8") or low.startswith("f4") or low.startswith("f6"):
        return f"float{low[1]}_{low[2:]}"
    return _MLIR_TYPES.get(low, low)


def is_f8(d: str) -> bool:
    """True for a float8 type, by NumPy name."""
    return d.startswith("float8_")


# ---- StableHLO (MLIR) text ----------------------------------------------------------

_TENSOR = re.compile(r"tensor<([^<>]*)>")
_SSA_DEF = re.compile(r"^\s*((?:%[\w#.\-]+(?::\d+)?)(?:\s*,\s*%[\w#.\-]+)*)\s*=\s*\"?([\w.]+)\"?(.*)$")
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@([\w.\-$]+)")
_OPERAND = re.compile(r"%[\w.\-]+(?:#\d+)?")


def _parse_tensor(t: str) -> Tuple[Tuple[int, ...], str]:
    body = t.split(",")[0].strip()  # drop encodings
    parts = body.split("x")
    dtype = norm_dtype(parts[-1])
    shape = tuple(int(p) if p.isdigit() else -1 for p in parts[:-1])
    return shape, dtype


def _signature(rest: str) -> Tuple[List[Tuple[Tuple[int, ...], str]], List[Tuple[Tuple[int, ...], str]]]:
    """Operand and result tensor types from the trailing ``: (A, B) -> C`` (or ``: T``)."""
    idx = rest.rfind(" : ")
    if idx < 0:
        return [], []
    sig = rest[idx + 3 :]
    if "->" in sig:
        ins, outs = sig.rsplit("->", 1)
    else:
        ins, outs = sig, sig
    return [_parse_tensor(t) for t in _TENSOR.findall(ins)], [_parse_tensor(t) for t in _TENSOR.findall(outs)]


# Where the lhs contracting dimensions are written, in each form of text that may hold a
# product.
_CONTRACT_PATTERNS = (
    re.compile(r"contracting_dims\s*=\s*\[([\d,\s]*)\]\s*x"),  # StableHLO pretty form
    re.compile(r"lhs_contracting_dimensions\s*=\s*\[([\d,\s]*)\]"),  # StableHLO generic form
    re.compile(r"lhs_contracting_dims=\{([\d,]*)\}"),  # HLO dot
    re.compile(r'"lhs_contracting_dimensions":\[([\d",]*)\]'),  # GEMM backend_config
)


def _contracted(text: str, lhs_shape: Tuple[int, ...]) -> Optional[int]:
    """The contracted size K of a product, from its text and lhs shape; None if unread."""
    for pat in _CONTRACT_PATTERNS:
        m = pat.search(text)
        if m:
            dims = [int(d) for d in re.findall(r"\d+", m.group(1))]
            if all(0 <= d < len(lhs_shape) for d in dims):
                return int(np.prod([lhs_shape[d] for d in dims], dtype=np.int64))
    return None


# Ops between a float8 value and a product that keep it "float8 data": data movement, and
# a multiply/divide (by a scale) as in the dequantize pattern XLA fuses.
_PASS_THROUGH = {
    "transpose", "reshape", "broadcast_in_dim", "broadcast", "copy", "slice", "dynamic_slice",
    "bitcast", "pad", "reverse", "multiply", "divide", "select", "get-tuple-element",
    "optimization_barrier",
}


def _passed_through(origins: List[str], dtype: str) -> str:
    """The origin of a `_PASS_THROUGH` op's result of type ``dtype`` from its operands'
    origins: the first float8 one; ``"constant"`` when all are constants; else its own
    type."""
    for o in origins:
        if is_f8(o):
            return o
    if origins and all(o == "constant" for o in origins):
        return "constant"
    return dtype


def stablehlo_products(text: str) -> List[Dict[str, Any]]:
    """The products of a StableHLO module, each as the fields of a `MatmulEntry`."""
    defs: Dict[Tuple[str, str], Tuple[str, List[str], List[str]]] = {}
    lines = text.splitlines()
    parsed = []
    func = "<module>"
    for line in lines:
        m = _FUNC.search(line)
        if m:
            func = m.group(1)
            continue
        m = _SSA_DEF.match(line)
        if not m:
            continue
        results = [r.strip() for r in m.group(1).split(",")]
        op = m.group(2).split(".")[-1]
        rest = m.group(3)
        ins, outs = _signature(rest)
        sig_at = rest.rfind(" : ")
        operands = _OPERAND.findall(rest[: sig_at if sig_at >= 0 else len(rest)])
        in_types = [d for _, d in ins]
        for r in results:
            base = r.split(":")[0]
            defs[(func, base)] = (op, operands, in_types)
        parsed.append((func, op, operands, ins, outs, rest))

    def origin(func: str, name: str, dtype: str, depth: int = 0) -> str:
        if is_f8(dtype) or depth > 12:
            return dtype
        d = defs.get((func, name.split("#")[0]))
        if d is None:
            return dtype
        op, operands, in_types = d
        if op in ("constant", "iota"):
            return "constant"
        if op == "convert":
            return in_types[0] if in_types and is_f8(in_types[0]) else dtype
        if op in _PASS_THROUGH:
            got = []
            for i, o in enumerate(operands):
                t = in_types[i] if i < len(in_types) else (in_types[0] if in_types else dtype)
                got.append(origin(func, o, t, depth + 1))
            return _passed_through(got, dtype)
        return dtype

    entries = []
    for func, op, operands, ins, outs, rest in parsed:
        if op not in ("dot_general", "dot", "convolution") or len(ins) < 2 or len(operands) < 2:
            continue
        (ls, ld), (rs, rd) = ins[0], ins[1]
        os_, od = outs[0] if outs else ((), "?")
        if op == "dot":  # plain matmul / matvec: lhs's last dimension
            k = ls[-1] if ls else None
        else:
            k = _contracted(rest, ls) if op == "dot_general" else None
        entries.append(
            dict(
                op=op, lhs_dtype=ld, rhs_dtype=rd, out_dtype=od,
                lhs_shape=ls, rhs_shape=rs, out_shape=os_,
                lhs_origin=origin(func, operands[0], ld), rhs_origin=origin(func, operands[1], rd),
                kernel=None, where=func, k=k,
            )
        )
    return entries


# ---- HLO text -----------------------------------------------------------------------

_HLO_COMP = re.compile(  # "ENTRY %main (a: f32[2]) -> f32[2] {" or "%region_0 {"
    r"^\s*(ENTRY\s+)?%?([\w.\-$]+)\s*(\(.*\))?\s*->.*\{\s*$|^\s*(ENTRY\s+)?%?([\w.\-$]+)\s*\{\s*$"
)
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-$]+)")
_HLO_SHAPE = re.compile(r"^([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _split_top(s: str) -> List[str]:
    """``s`` split at the commas outside brackets."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at ``s[start]``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


def _hlo_type(t: str) -> Tuple[Tuple[int, ...], str]:
    t = t.strip()
    if t.startswith("("):
        first = _split_top(t[1 : balanced(t, 0) - 1])
        return _hlo_type(first[0]) if first else ((), "tuple")
    m = _HLO_SHAPE.match(t)
    if not m:
        return (), t
    dims = tuple(int(x) for x in m.group(2).split(",") if x)
    return dims, norm_dtype(m.group(1))


def split_instruction(line: str) -> Optional[Tuple[str, str, str, str, str, bool]]:
    """An HLO instruction's line as text parts ``(name, type, opcode, operands,
    attributes, root)``, or None for another line::

        ROOT %dot.1 = f32[2,2]{1,0} dot(f32[2,3]{1,0} %a, f32[3,2]{1,0} %b), lhs_...
        -> ("dot.1", "f32[2,2]{1,0}", "dot", "f32[2,3]{1,0} %a, f32[3,2]{1,0} %b",
            ", lhs_...", True)
    """
    s = line.strip()
    root = s.startswith("ROOT ")
    if root:
        s = s[5:]
    eq = s.find(" = ")
    if eq < 0 or not (s[:eq].startswith("%") or re.fullmatch(r"[\w.\-]+", s[:eq])):
        return None
    name = s[:eq].lstrip("%")
    rest = s[eq + 3 :]
    if rest.startswith("("):
        end = balanced(rest, 0)
        type_str, rest = rest[:end], rest[end:].lstrip()
    else:
        sp = rest.find(" ")
        if sp < 0:
            return None
        type_str, rest = rest[:sp], rest[sp + 1 :].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    end = balanced(rest, m.end() - 1)
    return name, type_str, m.group(1), rest[m.end() : end - 1], rest[end:], root


def _parse_hlo_instr(line: str) -> Optional[Dict[str, Any]]:
    """The instruction on ``line`` with its result type and its operands' names and
    types (where written) read; None for another line."""
    parts = split_instruction(line)
    if parts is None:
        return None
    name, type_str, opcode, operand_str, attrs, root = parts
    operands = []
    for tok in _split_top(operand_str):
        typed = tok.rsplit(" ", 1)
        if len(typed) == 2 and typed[1].startswith("%"):
            operands.append((typed[1].lstrip("%"), _hlo_type(typed[0])))
        else:
            operands.append((tok.lstrip("%"), None))
    return {"name": name, "type": _hlo_type(type_str), "opcode": opcode, "operands": operands,
            "attrs": attrs, "root": root}


def hlo_products(text: str) -> List[Dict[str, Any]]:
    """The products of an HLO module (optimised or not), each as the fields of a
    `MatmulEntry`: dots, convolutions and library GEMM / convolution custom calls."""
    comps: Dict[str, Dict[str, Dict[str, Any]]] = {}
    order: List[Tuple[str, Dict[str, Any]]] = []
    callers: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
    roots: Dict[str, str] = {}
    comp = "<module>"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " = " not in stripped.split("(")[0]:
            m = _HLO_COMP.match(line)
            if m:
                comp = m.group(2) or m.group(5)
                comps.setdefault(comp, {})
                continue
        ins = _parse_hlo_instr(line)
        if ins is None:
            continue
        comps.setdefault(comp, {})[ins["name"]] = ins
        if ins["root"]:
            roots[comp] = ins["name"]
        order.append((comp, ins))
        for called in _CALLED.findall(ins["attrs"]):
            callers.setdefault(called, []).append((comp, ins))

    def type_of(comp: str, name: str, given: Any) -> Tuple[Tuple[int, ...], str]:
        if given is not None:
            return given
        d = comps.get(comp, {}).get(name)
        return d["type"] if d else ((), "?")

    def origin(comp: str, name: str, depth: int = 0) -> str:
        d = comps.get(comp, {}).get(name)
        if d is None:
            return "?"
        dtype = d["type"][1]
        if is_f8(dtype) or depth > 16:
            return dtype
        op = d["opcode"]
        if op in ("constant", "iota"):
            return "constant"
        if op == "parameter":
            idx = int(d["operands"][0][0]) if d["operands"] and d["operands"][0][0].isdigit() else None
            for pcomp, call in callers.get(comp, []):
                if call["opcode"] == "fusion" and idx is not None and idx < len(call["operands"]):
                    got = origin(pcomp, call["operands"][idx][0], depth + 1)
                    if is_f8(got) or got == "constant":
                        return got
            return dtype
        if op == "convert":
            src = d["operands"][0]
            t = type_of(comp, src[0], src[1])[1]
            if is_f8(t):
                return t
            return origin(comp, src[0], depth + 1) if t == "?" else dtype
        if op == "fusion":  # look inside: the fused computation's root
            m = re.search(r"calls=%?([\w.\-$]+)", d["attrs"])
            if m and m.group(1) in roots:
                got = origin(m.group(1), roots[m.group(1)], depth + 1)
                return got if is_f8(got) or got == "constant" else dtype
            return dtype
        if op in _PASS_THROUGH:
            return _passed_through([origin(comp, o, depth + 1) for o, _ in d["operands"]], dtype)
        return dtype

    def fused_kernel(comp: str) -> Optional[str]:
        """The kind of a custom fusion calling ``comp`` (e.g. a Triton GEMM), if any."""
        for _, call in callers.get(comp, []):
            m = re.search(r'"kind":"(__[\w$]+)"', call["attrs"])
            if call["opcode"] == "fusion" and m and "kCustom" in call["attrs"]:
                return m.group(1)
        return None

    entries = []
    for comp_name, ins in order:
        op = ins["opcode"]
        target = None
        if op == "custom-call":
            m = re.search(r'custom_call_target="([^"]+)"', ins["attrs"])
            target = m.group(1) if m else None
            if target is None or not any(k in target.lower() for k in ("matmul", "gemm", "conv")):
                continue
        elif op in ("dot", "convolution"):
            target = fused_kernel(comp_name)
        else:
            continue
        if len(ins["operands"]) < 2:
            continue
        (ln, lt), (rn, rt) = ins["operands"][0], ins["operands"][1]
        (ls, ld), (rs, rd) = type_of(comp_name, ln, lt), type_of(comp_name, rn, rt)
        lo = ld if is_f8(ld) else origin(comp_name, ln)
        ro = rd if is_f8(rd) else origin(comp_name, rn)
        lo = ld if lo == "?" else lo
        ro = rd if ro == "?" else ro
        os_, od = ins["type"]
        entries.append(
            dict(
                op=f"custom-call:{target}" if op == "custom-call" else op,
                lhs_dtype=ld, rhs_dtype=rd, out_dtype=od,
                lhs_shape=ls, rhs_shape=rs, out_shape=os_,
                lhs_origin=lo, rhs_origin=ro, kernel=target, where=comp_name,
                k=_contracted(ins["attrs"], ls) if op != "convolution" else None,
            )
        )
    return entries

