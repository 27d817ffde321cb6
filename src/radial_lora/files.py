"""Finished files only: every file radial-lora writes goes to a temporary name beside it, then is renamed over
the target, so a crash or a reader never sees half a dataset record, LoRA, report or video. One home for that,
for strict JSON (identical videos have an infinite PSNR: ``inf`` is written as the string ``"inf"``), and for
not replacing an earlier run's results unasked (:func:`set_aside`).

No torch or model imports beyond what :func:`jsonable` converts, so every layer can use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends, removed if it
    raises. ``suffix`` keeps an extension for writers that choose the format by it (``.png``, ``.mp4``).

    The finished file gets the mode of a file the process creates (0666 less the umask), as every other tool
    writes them: some writers (safetensors' ``save_file``) create 0600, which another user or a container with
    another uid could not read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PREVIOUS_DIR = "previous"  # FOLDER/previous/<time>/: an earlier run moved aside by --overwrite


def set_aside(
    folder: str | os.PathLike[str], names: Sequence[str], *, overwrite: bool, holds: str, ways: str
) -> Path | None:
    """Keep an earlier run's results from being replaced: ``names`` are the entries of ``folder`` a new run would
    replace (none: None, nothing to do). Without ``overwrite`` a ValueError says so in one line: the folder,
    what it ``holds``, the ``ways`` on, and ``--overwrite``. With it they move into ``folder/previous/<time>/``
    (returned), never deleted, and out of sight of what reads ``folder`` (``--resume latest`` reads only
    ``folder/checkpoints``). The one helper of ``train``, ``generate`` and ``evaluate`` for this."""
    folder = Path(folder)
    names = [n for n in names if os.path.lexists(folder / n)]
    if not names:
        return None
    if not overwrite:
        raise ValueError(
            f"{folder} already holds {holds}; {ways}, or pass --overwrite to move it into "
            f"{folder / PREVIOUS_DIR}/<time>/ (nothing is deleted)"
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = folder / PREVIOUS_DIR / stamp, 1
    while dest.exists():
        n += 1
        dest = folder / PREVIOUS_DIR / f"{stamp}-{n}"
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder / name, dest / name)
    return dest


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int = 1) -> Path:
    """Strict JSON of :func:`jsonable` ``data`` (a trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(jsonable(data), indent=indent, allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """Plain JSON types, recursively: ``inf`` -> ``"inf"``, ``-inf`` -> ``"-inf"``, NaN -> ``None``; numpy/torch
    scalars -> float/int."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-element tensor
        value = value.item()
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return value


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`jsonable` for numbers: ``"inf"``/``"-inf"`` strings back to floats, recursively."""
    if isinstance(value, Mapping):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value
