"""A real text corpus that installs with Python: the standard library's own source.

Files are chosen deterministically (sorted names from a fixed list, falling back to every
top-level module in sorted order), so every machine with the same Python gets the same
characters. `--data FILE` in the scripts replaces it with any text file.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Optional, Tuple

import numpy as np

# Large, stable, pure-Python modules present in every CPython 3.10+.
STDLIB_FILES = [
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "dataclasses.py", "datetime.py", "difflib.py", "email/message.py", "enum.py", "fractions.py",
    "ftplib.py", "functools.py", "gettext.py", "imaplib.py", "inspect.py", "ipaddress.py",
    "json/decoder.py", "logging/__init__.py", "mailbox.py", "pathlib.py", "pickle.py",
    "pydoc.py", "random.py", "shutil.py", "smtplib.py", "statistics.py", "string.py",
    "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py", "unittest/case.py",
    "urllib/parse.py", "zipfile.py",
]

# Character vocabulary: newline, tab and printable ASCII; anything else maps to '?'.
VOCAB = "\n\t" + "".join(chr(c) for c in range(32, 127))
_LOOKUP = np.full(256, VOCAB.index("?"), np.int32)
for _i, _c in enumerate(VOCAB):
    _LOOKUP[ord(_c)] = _i


def stdlib_text(max_chars: Optional[int] = None) -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        if max_chars and sum(map(len, parts)) >= max_chars:
            break
    text = "\n".join(parts)
    if not text:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return text[:max_chars] if max_chars else text


def encode(text: str) -> np.ndarray:
    raw = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)
    return _LOOKUP[raw]


def load_corpus(path: Optional[str] = None, max_chars: Optional[int] = 2_000_000,
                val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids of the corpus, split into (train, validation) — the validation split is
    the last ``val_fraction`` of the text, never seen in training."""
    if path is None:
        text = stdlib_text(max_chars)
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if max_chars:
            text = text[:max_chars]
    ids = encode(text)
    n_val = max(int(len(ids) * val_fraction), 1)
    return ids[:-n_val], ids[-n_val:]


def batches(ids: np.ndarray, batch: int, seq_len: int, seed: int):
    """An endless iterator of (batch, seq_len + 1) windows, the same order for a seed."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, batch)
        yield np.stack([ids[s:s + seq_len + 1] for s in starts])
