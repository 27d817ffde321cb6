"""The prepared-dataset format (docs/ARCHITECTURE.md) and its reader, used by training and evaluation.

```
DATASET/dataset.json       settings the clips were made with (format, family, model, size, fps, lengths)
DATASET/manifest.jsonl     one JSON object per finished clip (see :class:`Record`)
DATASET/latents/f{N}/{id}.safetensors   "latents" [C,F,h,w] float32 + the text tensors, no batch dim
DATASET/null_text.safetensors           the empty caption's text tensors (caption dropout, guidance)
```
The manifest is append-only while ``data prepare`` runs; a crash can leave a cut-off last line, which
:func:`read_manifest` drops with a warning (that clip is simply prepared again on the next run).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from radial_lora.files import sha256_file

log = logging.getLogger(__name__)

FORMAT = "radial-lora-dataset/1"
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.jsonl"
NULL_TEXT = "null_text.safetensors"


@dataclass(frozen=True)
class Record:
    """One cached clip: a row of ``manifest.jsonl``. ``file`` is relative to the dataset folder."""

    id: str
    bucket: int
    source: str
    caption: str
    start_frame: int
    fps: float
    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, ...]
    file: str
    sha256: str
    source_sig: str = ""  # what the source video was when this clip was made (data.prepare.source_signature)

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str) -> Record:
        """Build from a manifest row; ``where`` (file:line) goes into the error for a bad row."""
        names = {f.name for f in fields(cls) if f.name != "source_sig"}  # older manifests lack source_sig
        missing = sorted(names - set(row))
        if missing:
            raise ValueError(f"{where}: manifest row lacks {missing}; re-run `radial-lora data prepare`")
        try:
            return cls(
                id=str(row["id"]),
                bucket=int(row["bucket"]),
                source=str(row["source"]),
                caption=str(row["caption"]),
                start_frame=int(row["start_frame"]),
                fps=float(row["fps"]),
                height=int(row["height"]),
                width=int(row["width"]),
                num_frames=int(row["num_frames"]),
                latent_shape=tuple(int(x) for x in row["latent_shape"]),
                file=str(row["file"]),
                sha256=str(row["sha256"]),
                source_sig=str(row.get("source_sig", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad value in manifest row ({exc})") from exc

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["latent_shape"] = list(self.latent_shape)
        return row


def read_manifest(path: str | os.PathLike[str]) -> list[Record]:
    """Rows in file order; a later row with the same id replaces the earlier one (a re-prepared clip).

    A cut-off *last* line (interrupted append) is dropped with a warning; any other bad line is an error.
    """
    return manifest_rows(path)[0]


def manifest_rows(path: str | os.PathLike[str]) -> tuple[list[Record], dict[str, list[int]]]:
    """:func:`read_manifest`'s records, and the ids listed on more than one line with those line numbers.

    ``data prepare`` writes each clip once (it rewrites the manifest when it starts), so an id listed twice means
    two writers at once, or an edit: ``data validate`` and training name them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `radial-lora data prepare` first")
    lines = path.read_text(encoding="utf-8").splitlines()
    by_id: dict[str, Record] = {}
    seen: dict[str, list[int]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: ignoring a cut-off last line (interrupted run)", path, number)
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({exc}); the manifest is damaged") from exc
        record = Record.from_json(row, f"{path}:{number}")
        by_id.pop(record.id, None)
        by_id[record.id] = record
        seen[record.id].append(number)
    return list(by_id.values()), {i: n for i, n in seen.items() if len(n) > 1}


class PreparedDataset:
    """Read-only view of a prepared dataset folder: settings, clip records by bucket, tensors per clip."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        info_path = self.path / DATASET_JSON
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{info_path} not found: {self.path} is not a prepared dataset (run `radial-lora data prepare`)"
            )
        try:
            self.info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{info_path}: not valid JSON ({exc})") from exc
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{info_path}: format {self.info.get('format')!r} is not {FORMAT!r}")
        self.records, self.duplicates = manifest_rows(self.path / MANIFEST)  # duplicates: id -> manifest lines

    def __len__(self) -> int:
        return len(self.records)

    @property
    def buckets(self) -> dict[int, list[Record]]:
        """Records grouped by frame count, buckets in ascending order, records in manifest order."""
        groups: dict[int, list[Record]] = defaultdict(list)
        for record in self.records:
            groups[record.bucket].append(record)
        return {bucket: groups[bucket] for bucket in sorted(groups)}

    def file_of(self, record: Record) -> Path:
        return self.path / record.file

    def verify(self, records: list[Record], temporal_factor: int = 4, *, files: bool = True) -> None:
        """No clip listed twice in the manifest, and (``files``) every record's file exists with its manifest
        sha256 and latent frames matching its bucket (``1 + (bucket - 1) / temporal_factor``); else a ValueError
        naming the first bad clips and files."""
        from tqdm import tqdm

        problems = [
            f"clip {cid} is listed {len(lines)} times ({MANIFEST} lines {', '.join(map(str, lines))})"
            for cid, lines in self.duplicates.items()
        ]
        for record in tqdm(records if files else [], desc="verify clips", unit="clip", disable=None):
            file = self.file_of(record)
            frames = 1 + (record.bucket - 1) // temporal_factor
            if len(record.latent_shape) < 2 or record.latent_shape[1] != frames:
                problems.append(
                    f"clip {record.id}: bucket {record.bucket} frames needs {frames} latent frames, the manifest "
                    f"says latent_shape {list(record.latent_shape)}"
                )
            elif not file.is_file():
                problems.append(f"clip {record.id}: {file} is missing")
            elif sha256_file(file) != record.sha256:
                problems.append(f"clip {record.id}: {file} does not match its manifest checksum (changed or damaged)")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(
                f"{self.path}: {len(problems)} clip(s) fail the check{more}: "
                + "; ".join(problems[:5])
                + "; re-run `radial-lora data prepare` (it re-encodes them and writes each clip once)"
            )

    def null_text(self) -> dict[str, torch.Tensor]:
        """The empty caption's text tensors (what the pipelines encode for guidance's unconditional branch)."""
        file = self.path / NULL_TEXT
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing (the empty caption's embedding, for train.caption_dropout); re-run "
                "`radial-lora data prepare` with the same options: it reuses every clip and adds this file"
            )
        return load(file.read_bytes())

    def image_condition(self, record: Record) -> Any:
        """The images an image-to-video clip starts from, as ``generate`` takes them: its first frame, uint8
        ``[H, W, 3]``, or its first and last frames ``[2, H, W, 3]`` (first-last-frame models)."""
        from radial_lora.constants import FIRST_FRAME, LAST_FRAME

        tensors = self.load(record)
        if FIRST_FRAME not in tensors:
            raise ValueError(f"{self.path} was prepared for text-to-video: its clips hold no first frames")
        if LAST_FRAME in tensors:
            return torch.stack([tensors[FIRST_FRAME], tensors[LAST_FRAME]]).numpy()
        return tensors[FIRST_FRAME].numpy()

    def load(self, record: Record, *, verify: bool = False) -> dict[str, torch.Tensor]:
        """The clip's tensors ("latents" [C,F,h,w] float32 + text tensors). ``verify`` checks the sha256."""
        file = self.file_of(record)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: latent file of clip {record.id!r} is missing; re-run `radial-lora data prepare`"
            )
        if verify and sha256_file(file) != record.sha256:
            raise ValueError(f"{file}: checksum differs from the manifest; the file was changed or damaged")
        try:
            # read the bytes, not load_file: its tensors map the file, and a file rewritten later (a resumed
            # prepare) would then crash the reader with SIGBUS instead of raising
            tensors = load(file.read_bytes())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{file}: cannot read safetensors ({exc}); re-run `radial-lora data prepare`") from exc
        if "latents" not in tensors:
            raise ValueError(f"{file}: no 'latents' tensor (has {sorted(tensors)})")
        if tuple(tensors["latents"].shape) != record.latent_shape:
            raise ValueError(
                f"{file}: latents shape {tuple(tensors['latents'].shape)} != manifest {record.latent_shape}"
            )
        return tensors

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
        """(train, holdout) by *source video*: clips of one source never land on both sides.

        Deterministic for a seed; with a fraction > 0 and two or more sources, both sides get at least one.
        """
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction={holdout_fraction} must be in [0, 1)")
        sources = sorted({r.source for r in self.records})
        random.Random(seed).shuffle(sources)
        count = round(holdout_fraction * len(sources))
        if holdout_fraction > 0 and len(sources) > 1:
            count = min(max(count, 1), len(sources) - 1)  # both sides non-empty
        held = set(sources[:count])
        train = [r for r in self.records if r.source not in held]
        holdout = [r for r in self.records if r.source in held]
        return train, holdout
