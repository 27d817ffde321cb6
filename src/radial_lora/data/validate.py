"""Check a prepared dataset before spending GPU hours on it (``radial-lora data validate``).

Checks that no clip is listed twice, that no ``data prepare`` is writing it now, that every manifest row agrees
with ``dataset.json`` (frame count, size, fps, latent geometry ``F' = 1 + (F - 1) / t``, ``h = H / s``), that
every file is there, matches its checksum, loads, holds finite float32 latents of the recorded shape and the same
text tensors as every other clip.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from radial_lora.constants import IMAGE_LATENTS
from radial_lora.data.dataset import PreparedDataset, Record
from radial_lora.files import sha256_file
from radial_lora.locks import holder

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PROBLEMS = 1

# Normalised latents sit around unit scale (|x| of a few); a value past this is not a VAE latent.
ABSURD_LATENT = 1e3


@dataclass
class BucketStats:
    """Per length bucket: clip and source counts, latent shape(s) and latent value statistics."""

    clips: int = 0
    sources: set[str] = field(default_factory=set)
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, latents: torch.Tensor) -> None:
        x = latents.double()
        self.total += float(x.sum())
        self.total_sq += float((x * x).sum())
        self.count += x.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def std(self) -> float:
        if not self.count:
            return float("nan")
        return max(self.total_sq / self.count - self.mean**2, 0.0) ** 0.5


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    buckets: dict[int, BucketStats] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_PROBLEMS

    def format(self, max_problems: int = 20) -> str:
        lines = []
        for bucket, stats in sorted(self.buckets.items()):
            shapes = ", ".join(str(list(s)) for s in sorted(stats.shapes)) or "-"
            lines.append(
                f"f{bucket}: {stats.clips} clips from {len(stats.sources)} sources, latents {shapes}, "
                f"mean {stats.mean:+.3f} std {stats.std:.3f}"
            )
        lines += [f"warning: {w}" for w in self.warnings[:max_problems]]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s); the first {min(len(self.problems), max_problems)}:")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
        else:
            lines.append("dataset OK")
        return "\n".join(lines)


def _check_record(record: Record, info: dict, where: str) -> list[str]:
    problems = []
    t, s = int(info.get("vae_temporal_factor", 4)), int(info.get("vae_spatial_factor", 8))
    for key, expected in (("height", info.get("height")), ("width", info.get("width")), ("fps", info.get("fps"))):
        if expected is not None and getattr(record, key) != expected:
            problems.append(f"{where}: {key}={getattr(record, key)} but dataset.json says {expected}")
    if record.num_frames != record.bucket:
        problems.append(f"{where}: num_frames={record.num_frames} differs from bucket {record.bucket}")
    if record.bucket not in info.get("lengths", []):
        problems.append(f"{where}: bucket {record.bucket} is not in dataset.json lengths {info.get('lengths')}")
    if len(record.latent_shape) != 4:
        return [*problems, f"{where}: latent_shape {list(record.latent_shape)} is not [C, F, h, w]"]
    _, frames, h, w = record.latent_shape
    expected = (1 + (record.num_frames - 1) // t, record.height // s, record.width // s)
    if (frames, h, w) != expected:
        problems.append(
            f"{where}: latent_shape {list(record.latent_shape)} does not fit {record.num_frames} frames of "
            f"{record.width}x{record.height} (expected [C, {expected[0]}, {expected[1]}, {expected[2]}])"
        )
    return problems


def validate_dataset(path: str | os.PathLike[str], *, checksums: bool = True) -> ValidationReport:
    """Every problem found (not only the first); ``report.ok`` says whether training can use it."""
    report = ValidationReport()
    try:
        dataset = PreparedDataset(path)
    except (FileNotFoundError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    info = dataset.info
    if not dataset.records:
        report.problems.append(f"{dataset.path}: the manifest lists no clips")
    for cid, lines in dataset.duplicates.items():
        report.problems.append(
            f"clip {cid} is listed {len(lines)} times in the manifest (lines {', '.join(map(str, lines))}): two "
            "`data prepare` runs wrote it at once, or it was edited; run `data prepare` again to write each clip once"
        )
    writer = holder(dataset.path)
    if writer is not None:
        report.problems.append(f"{dataset.path} is being written now by {writer}; validate it once that has ended")
    if info.get("finished") is False and writer is None:
        report.problems.append(
            f"{dataset.path}: the last `data prepare` run did not finish (interrupted?); run it again to complete it"
        )
    text_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    channels: set[int] = set()
    stats: dict[int, BucketStats] = defaultdict(BucketStats)
    for record in tqdm(dataset.records, desc="validate", unit="clip", disable=None):
        where = f"clip {record.id} ({record.file})"
        bucket = stats[record.bucket]
        bucket.clips += 1
        bucket.sources.add(record.source)
        bucket.shapes.add(record.latent_shape)
        report.problems += _check_record(record, info, where)
        file = dataset.file_of(record)
        if not file.is_file():
            report.problems.append(f"{where}: file missing")
            continue
        if checksums and sha256_file(file) != record.sha256:
            report.problems.append(f"{where}: sha256 differs from the manifest (file changed or damaged)")
            continue
        try:
            tensors = dataset.load(record)
        except (ValueError, FileNotFoundError) as exc:
            report.problems.append(f"{where}: {exc}")
            continue
        latents = tensors["latents"]
        if latents.dtype != torch.float32:
            report.problems.append(f"{where}: latents are {latents.dtype}, expected float32")
        if not torch.isfinite(latents).all():
            bad = int((~torch.isfinite(latents)).sum())
            report.problems.append(f"{where}: latents hold {bad} NaN/Inf values")
            continue
        peak = float(latents.abs().max()) if latents.numel() else 0.0
        if peak > ABSURD_LATENT:
            report.problems.append(
                f"{where}: latents reach |{peak:.3g}|, far beyond what a VAE gives the transformer (about unit "
                "scale); the file was written by something else, or the VAE stats are wrong: prepare it again"
            )
        bucket.add(latents)
        channels.add(int(latents.shape[0]))
        for key, value in tensors.items():
            if key == "latents":
                continue
            if value.is_floating_point() and not torch.isfinite(value).all():
                report.problems.append(f"{where}: text tensor {key!r} holds NaN/Inf values")
            if key == IMAGE_LATENTS:  # per length: its clip's latents' shape (TI2V-5B: one frame of it)
                frames_ok = value.ndim == latents.ndim and value.shape[1] in (1, latents.shape[1])
                if not frames_ok or value.shape[:1] + value.shape[2:] != latents.shape[:1] + latents.shape[2:]:
                    report.problems.append(
                        f"{where}: {key} is {list(value.shape)}, its latents {list(latents.shape)}; prepare it again"
                    )
                continue
            seen = text_shapes.setdefault(key, (tuple(value.shape), value.dtype))
            if seen != (tuple(value.shape), value.dtype):
                report.problems.append(
                    f"{where}: text tensor {key!r} is {list(value.shape)} {value.dtype}, other clips have "
                    f"{list(seen[0])} {seen[1]}"
                )
        expected_keys = info.get("text_keys")
        if expected_keys is not None:
            expected_keys = sorted([*expected_keys, *(info.get("image_keys") or [])])
        if expected_keys is not None and sorted(k for k in tensors if k != "latents") != expected_keys:
            report.problems.append(
                f"{where}: text tensors {sorted(k for k in tensors if k != 'latents')} != dataset.json {expected_keys}"
            )
    if len(channels) > 1:
        report.problems.append(f"latent channel counts differ between clips: {sorted(channels)}")
    for bucket in info.get("lengths", []):
        if bucket not in stats:
            report.warnings.append(f"bucket f{bucket} is listed in dataset.json but has no clips")
    listed = {Path(r.file).as_posix() for r in dataset.records}
    latents_dir = dataset.path / "latents"
    if latents_dir.is_dir():
        for file in sorted(latents_dir.rglob("*.safetensors")):
            rel = file.relative_to(dataset.path).as_posix()
            if rel not in listed:
                report.warnings.append(f"{rel} is not in the manifest (left over from an interrupted run?)")
    report.buckets = dict(sorted(stats.items()))
    return report
