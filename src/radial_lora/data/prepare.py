"""Videos + captions -> cached latents at one or more clip lengths (``radial-lora data prepare``).

Why cache: training the LoRA needs only the transformer; encoding every clip once with the model's own
VAE and text encoder up front takes them out of GPU memory during training. Each requested length is a
bucket (``latents/f{N}/``); the same source gives base-length and extended-length clips.

The job never stops for one bad input: an unreadable file, a too-short video or a missing caption is
skipped with one log line and counted in the summary. It is resumable: clips whose file is present and
matches the manifest checksum are not encoded again, and each finished clip is appended to the manifest
right away, so an interrupted run loses nothing it finished. A run holds its ``--out`` folder's lock
(:mod:`radial_lora.locks`) from start to end: a second run into it stops at once, naming the first.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from radial_lora.data.dataset import DATASET_JSON, FORMAT, MANIFEST, NULL_TEXT, Record, read_manifest
from radial_lora.data.video_io import (
    VIDEO_EXTENSIONS,
    VideoReadError,
    iter_timed_frames,
    probe_video,
    resize_center_crop,
    video_stream,
)
from radial_lora.files import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from radial_lora.geometry import latent_geometry
from radial_lora.locks import FolderLock

log = logging.getLogger(__name__)

VIDEO_COLUMN_ALIASES = ("video", "file_name", "filename", "video_path", "path", "file", "media_path")
CAPTION_COLUMN_ALIASES = ("caption", "text", "prompt", "description", "caption_text")
CLIP_MODES = ("start", "middle", "sliding")

# Exit status of `data prepare` (docs/DATA.md): 1 = no clip at all (nothing to train on), 2 = usage error
# (from the CLI), 3 = some input skipped.
EXIT_OK = 0
EXIT_EMPTY = 1
EXIT_SKIPPED = 3


@dataclass(frozen=True)
class SourceItem:
    """One input video and its caption; ``source`` is its path relative to the input (stable id)."""

    source: str
    path: Path
    caption: str


@dataclass(frozen=True)
class Skip:
    """An input left out, and why (the reason's first word groups the summary)."""

    source: str
    reason: str


@dataclass
class PrepareOptions:
    """Settings of one ``data prepare`` run (the CLI flags)."""

    input: Path
    out: Path
    model: str
    family: str | None = None  # None: read from the model's model_index.json
    lengths: tuple[int, ...] = (17, 65)
    height: int = 480
    width: int = 832
    fps: float = 16.0
    clip_mode: str = "start"
    stride: int | None = None
    max_clips: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    video_column: str | None = None
    caption_column: str | None = None
    offload: bool = False  # GPU: each model on the GPU only while it encodes (VAE and text encoder need not fit)

    def __post_init__(self) -> None:  # callers from Python may pass str paths and lists
        self.input, self.out = Path(self.input), Path(self.out)
        self.lengths = tuple(int(n) for n in self.lengths)


@dataclass
class PrepareSummary:
    """What a run did; ``exit_code`` is 0 when nothing was skipped, 3 when something was, 1 when the dataset
    holds no clip at all."""

    encoded: Counter[int] = field(default_factory=Counter)
    reused: Counter[int] = field(default_factory=Counter)
    skipped: list[Skip] = field(default_factory=list)
    sources: int = 0

    @property
    def clips(self) -> int:
        return sum(self.encoded.values()) + sum(self.reused.values())

    @property
    def exit_code(self) -> int:
        if self.clips == 0:
            return EXIT_EMPTY
        return EXIT_SKIPPED if self.skipped else EXIT_OK

    def format(self) -> str:
        lines = [f"{self.sources} videos with captions"]
        for bucket in sorted(set(self.encoded) | set(self.reused)):
            lines.append(
                f"  f{bucket}: {self.encoded[bucket] + self.reused[bucket]} clips "
                f"({self.encoded[bucket]} encoded, {self.reused[bucket]} already prepared)"
            )
        if self.skipped:
            reasons = Counter(s.reason.split(":")[0] for s in self.skipped)
            lines.append(f"  skipped {len(self.skipped)}: " + ", ".join(f"{n} {r}" for r, n in reasons.items()))
        if self.clips == 0:
            lines.append("  no clip was prepared: the dataset is empty, nothing to train on (see the skipped inputs)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs


_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# Byte-order marks and their codecs; UTF-32 first (its LE mark starts with UTF-16's)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_EXTRA = "\0extra"  # csv.DictReader's key for the fields of a row beyond the header


def read_text(path: Path) -> str:
    """A caption or metadata file's text: UTF-8, or UTF-8/16/32 with a byte-order mark (Notepad's "Unicode" is
    UTF-16 LE). Anything else is a ValueError naming the file and the first bad byte, never U+FFFD soup."""
    data = path.read_bytes()
    codec = next((c for bom, c in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        hint = "it may be Latin-1 or cp1252" if codec == "utf-8" else f"its byte-order mark says {codec}"
        raise ValueError(
            f"{path}: not valid {codec} at byte {exc.start} (0x{data[exc.start]:02x}); {hint}: save it as UTF-8"
        ) from None
    if "\0" in text:
        raise ValueError(f"{path}: contains NUL characters (UTF-16 without a byte-order mark?); save it as UTF-8")
    return text


def _lines(text: str) -> list[str]:
    """Lines split at LF / CRLF / CR only: U+2028, U+2029 and the other separators ``splitlines`` knows are text."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _clean_caption(text: str) -> str:
    """One line of single spaces, zero-width characters removed (a caption of only those is empty)."""
    return " ".join(text.translate(_ZERO_WIDTH).split())


def _pick_column(names: list[str], wanted: str | None, aliases: tuple[str, ...], what: str, where: Path) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{where}: no {what} column {wanted!r}; columns are {names}")
        return wanted
    lowered = {name.lower(): name for name in names}
    for alias in aliases:
        if alias in lowered:
            return lowered[alias]
    raise ValueError(
        f"{where}: no {what} column among {names}; name one with --{what}-column (looked for {list(aliases)})"
    )


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` per row of a CSV / JSONL / JSON table; ``where`` is ``file:line`` (``file row N`` for JSON).

    CSV is parsed as CSV: quoted commas and newlines belong to the field."""
    suffix = path.suffix.lower()
    text = read_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA)
        rows = []
        for row in reader:
            rows.append((f"{path.name}:{reader.line_num}", row))
        return rows
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_lines(text), start=1):
            if line.strip():
                try:
                    rows.append((f"{path.name}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
        return rows
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{video, caption}} objects")
        return [(f"{path.name} row {n}", row) for n, row in enumerate(data, start=1)]
    raise ValueError(f"{path}: unsupported metadata file; use a folder, .csv, .jsonl or .json")


def _row_caption(value: Any, column: str, where: str) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, reason to skip)`` for a caption cell."""
    if isinstance(value, list | dict):
        kind = f"a list of {len(value)}" if isinstance(value, list) else "an object"
        return None, f"caption is {kind} in {where}; give one string per row (a row per caption)"
    caption = _clean_caption("" if value is None else str(value))
    if not caption:
        return None, f"missing caption: empty {column!r} in {where}"
    return caption, None


def _items_from_table(
    path: Path, video_column: str | None, caption_column: str | None
) -> tuple[list[SourceItem], list[Skip]]:
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    if not all(isinstance(row, dict) for _, row in rows):
        raise ValueError(f"{path}: every row must be an object with a video and a caption")
    names = list(dict.fromkeys(key for _, row in rows for key in row if key != _EXTRA))
    vcol = _pick_column(names, video_column, VIDEO_COLUMN_ALIASES, "video", path)
    ccol = _pick_column(names, caption_column, CAPTION_COLUMN_ALIASES, "caption", path)
    items, skips = [], []
    first_seen: dict[str, tuple[str, str]] = {}
    for where, row in rows:
        video = str(row.get(vcol) or "").strip()
        if _EXTRA in row:
            fields = len(names) + len(row[_EXTRA])
            reason = f"{where} has {fields} fields, the header {len(names)}: quote a caption that holds a comma"
            skips.append(Skip(video or where, f"bad row: {reason}"))
            continue
        if not video:
            skips.append(Skip(where, f"no video path in column {vcol!r}"))
            continue
        caption, why = _row_caption(row.get(ccol), ccol, where)
        if caption is None:
            skips.append(Skip(video, why or "missing caption"))
            continue
        if video in first_seen:
            at, kept = first_seen[video]
            same = "the same caption" if kept == caption else "another caption"
            skips.append(Skip(video, f"listed twice: {where} repeats {at} with {same}; the first is kept"))
            continue
        first_seen[video] = (where, caption)
        items.append(SourceItem(video, (path.parent / video), caption))
    return items, skips


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _caption_file(video: Path) -> Path | None:
    """The ``.txt`` beside a video, whatever the case of its extension (``clip.MP4`` + ``clip.TXT``)."""
    exact = video.with_suffix(".txt")
    if exact.is_file():
        return exact
    return next((p for p in video.parent.glob(f"{glob.escape(video.stem)}.*") if p.suffix.lower() == ".txt"), None)


def _items_from_folder(folder: Path) -> tuple[list[SourceItem], list[Skip]]:
    # finetrainers' older layout: prompt.txt and videos.txt, line by line
    prompts, videos = folder / "prompt.txt", folder / "videos.txt"
    if prompts.is_file() and videos.is_file():
        p_lines = _strip_trailing_blank(_lines(read_text(prompts)))
        v_lines = _strip_trailing_blank([v.strip() for v in _lines(read_text(videos))])
        if len(p_lines) != len(v_lines):
            raise ValueError(f"{folder}: prompt.txt has {len(p_lines)} lines but videos.txt {len(v_lines)}")
        items, skips = [], []
        for number, (video, prompt) in enumerate(zip(v_lines, p_lines), start=1):
            caption = _clean_caption(prompt)
            if not video:
                skips.append(Skip(f"videos.txt:{number}", "no video path on this line"))
            elif not caption:
                skips.append(Skip(video, f"missing caption: line {number} of prompt.txt is empty"))
            else:
                items.append(SourceItem(video, folder / video, caption))
        return items, skips
    items, skips = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() not in VIDEO_EXTENSIONS or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            rel.as_posix().encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 in the name (a Latin-1 file system, an old zip)
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            skips.append(Skip(shown, "file name is not valid UTF-8: rename it"))
            continue
        txt = _caption_file(path)
        if txt is None:
            skips.append(Skip(rel.as_posix(), f"missing caption: no {path.with_suffix('.txt').name} next to it"))
            continue
        try:
            caption = _clean_caption(read_text(txt))
        except (ValueError, OSError) as exc:
            skips.append(Skip(rel.as_posix(), f"unreadable caption: {exc}"))
            continue
        if not caption:
            skips.append(Skip(rel.as_posix(), f"missing caption: {txt.name} is empty"))
            continue
        items.append(SourceItem(rel.as_posix(), path, caption))
    return items, skips


def collect_inputs(
    input_path: str | os.PathLike[str], *, video_column: str | None = None, caption_column: str | None = None
) -> tuple[list[SourceItem], list[Skip]]:
    """The usable (video, caption) pairs and the skipped ones with reasons.

    ``input_path``: a folder of videos with same-named ``.txt`` captions (musubi-tuner / diffusion-pipe),
    a folder with ``prompt.txt`` + ``videos.txt`` (finetrainers), or a CSV / JSONL / JSON table with a video
    path (relative to the table) and a caption per row.
    """
    path = Path(input_path)
    if path.is_dir():
        items, skips = _items_from_folder(path)
    elif path.is_file():
        items, skips = _items_from_table(path, video_column, caption_column)
    else:
        raise FileNotFoundError(f"{path}: input not found (give a folder of videos or a CSV/JSONL file)")
    if not items and not skips:
        raise ValueError(f"{path}: no videos found (extensions {', '.join(VIDEO_EXTENSIONS)})")
    return items, skips


# ---------------------------------------------------------------------------------------------- frames


def resampled_frames(path: Path, height: int, width: int, fps: float) -> Iterator[np.ndarray | None]:
    """The video at ``fps``, resized and centre-cropped, one ``uint8 [H, W, 3]`` frame at a time (streaming:
    nothing else is held); ``None`` for an output time whose source frame was damaged (see
    :func:`~radial_lora.data.video_io.iter_timed_frames`).

    Output frame j (time j / fps) is the source frame nearest in presentation time (ties go to the later
    frame); output times run to the end of the last source frame (its time + one frame period).
    """
    source_fps = probe_video(path).fps
    if source_fps <= 0:
        raise VideoReadError(f"{path}: the stream has no frame rate")
    count, eps = 0, 1e-9
    previous: tuple[float, np.ndarray | None] | None = None

    def emit_until(limit: float, frame: np.ndarray | None) -> Iterator[np.ndarray | None]:
        nonlocal count
        resized = None
        while count / fps < limit - eps:
            if frame is not None and resized is None:
                resized = resize_center_crop(frame, height, width)
            yield resized
            count += 1

    for t, frame in iter_timed_frames(path, tolerate_damage=True):
        if previous is not None:
            yield from emit_until((previous[0] + t) / 2, previous[1])
        previous = (t, frame)
    if previous is None:
        raise VideoReadError(f"{path}: no decodable frames")
    yield from emit_until(previous[0] + 1.0 / source_fps, previous[1])


def resampled_count(path: Path, fps: float) -> int:
    """How many frames :func:`resampled_frames` gives, from the packets' timestamps alone (no decoding): what
    the middle clip mode needs before it decodes."""
    import av

    source_fps = probe_video(path).fps
    with av.open(str(path)) as container:
        stream = video_stream(container)
        times = [float(p.pts * p.time_base) for p in container.demux(stream) if p.pts is not None and p.size]
    if not times or source_fps <= 0:
        raise VideoReadError(f"{path}: no timed video packets")
    end = max(times) - min(times) + 1.0 / source_fps
    return max(0, math.ceil((end - 1e-9) * fps - 1e-9))


def load_resampled(
    path: Path, height: int, width: int, fps: float, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """:func:`resampled_frames` as one array (up to ``max_frames``) and the source's average fps; a damaged
    frame is a :class:`VideoReadError`."""
    out: list[np.ndarray] = []
    for frame in resampled_frames(path, height, width, fps):
        if max_frames is not None and len(out) >= max_frames:
            break
        if frame is None:
            raise VideoReadError(f"{path}: damaged frames after output frame {len(out)}")
        out.append(frame)
    return np.stack(out), probe_video(path).fps


@dataclass
class CutClips:
    """What :func:`cut_clips` saw of one video: output frames read, and the clips a damaged stretch cost."""

    frames: int = 0
    damaged: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    complete: bool = False  # the whole video was read (so ``frames`` is its length)


def cut_clips(
    frames: Iterator[np.ndarray | None],
    lengths: list[int],
    mode: str,
    stride: int | None,
    max_clips: int | None,
    total: int | None,
    seen: CutClips,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(length, start, uint8 [length, H, W, 3])`` for each clip of :func:`clip_starts` as soon as its last
    frame is read, holding only ``max(lengths)`` frames; a clip that overlaps a damaged frame is counted in
    ``seen.damaged`` instead. Stops reading once every length has all its clips (``total``: the video's frame
    count when known; ``middle`` needs it)."""
    plans = {n: clip_starts(total, n, mode, stride, max_clips) for n in lengths}
    nexts = {n: next(plans[n], None) for n in lengths}
    window: deque[np.ndarray | None] = deque(maxlen=max(lengths))
    for index, frame in enumerate(frames):
        window.append(frame)
        seen.frames = index + 1
        for n in lengths:
            while nexts[n] is not None and nexts[n] + n - 1 == index:
                clip = list(window)[-n:]
                if any(f is None for f in clip):
                    seen.damaged[n] += 1
                else:
                    yield n, nexts[n], np.stack(clip)
                nexts[n] = next(plans[n], None)
        if all(v is None for v in nexts.values()):
            return
    seen.complete = True


def clip_starts(
    num_frames: int | None, length: int, mode: str, stride: int | None, max_clips: int | None
) -> Iterator[int]:
    """First frames of the clips of ``length`` cut from ``num_frames`` (none when too short), in order.

    ``num_frames=None``: not known yet (a video being streamed): ``sliding`` goes on until the caller runs out of
    frames; ``middle`` needs the count."""
    if num_frames is not None and num_frames < length:
        return iter(())
    if mode == "start":
        starts: Iterator[int] = iter((0,))
    elif mode == "middle":
        if num_frames is None:
            raise ValueError("clip mode 'middle' needs the video's frame count")
        starts = iter(((num_frames - length) // 2,))
    elif mode == "sliding":
        starts = itertools.count(0, stride or length)
        if num_frames is not None:
            starts = itertools.takewhile(lambda s: s <= num_frames - length, starts)
    else:
        raise ValueError(f"clip mode {mode!r} is not one of {CLIP_MODES}")
    return itertools.islice(starts, max_clips) if max_clips else starts


def clip_id(source: str, length: int, start: int) -> str:
    """Readable and unique: the file stem, a hash of the full source path, length and start frame."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:48] or "clip"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:6]
    return f"{stem}_{digest}_f{length}_s{start:05d}"


# ---------------------------------------------------------------------------------------------- encoding


@dataclass
class _PendingClip:
    id: str
    item: SourceItem
    length: int
    start: int
    frames: np.ndarray  # uint8 [F,H,W,3]
    signature: str  # source_signature of the video it was cut from


class _Encoder:
    """The adapter's VAE and text encoder with a cache of text embeddings per caption.

    The cache is bounded (least recently used out): a real T5 embedding is ~4 MB, and captions repeat
    mostly within one source video (its clips of every length), which are encoded close together.
    """

    def __init__(self, adapter: Any, pipe: Any, device: torch.device, cache_size: int = 256) -> None:
        self.adapter, self.pipe, self.device = adapter, pipe, device
        # by caption; where the text encoder reads the image too, by caption and the first frame's digest
        self.text_cache: OrderedDict[Any, dict[str, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size
        vae = getattr(pipe, "vae", None)
        self.dtype = next(vae.parameters()).dtype if vae is not None else torch.float32
        # Wan2.1-FLF2V: each clip's last frame is a condition too
        self.first_last = adapter.task == "i2v" and adapter.conditions_on_last_frame(adapter.transformer_config(pipe))

    @torch.no_grad()
    def text(self, captions: list[str], firsts: list[np.ndarray] | None = None) -> list[dict[str, torch.Tensor]]:
        """The captions' text tensors; with ``firsts`` (an encoder that reads the image: ``text_sees_image``) each
        caption read with its clip's first frame, so a source's clips of every length share one encoding."""
        keys: list[Any] = list(captions)
        if firsts is not None:
            keys = [(c, hashlib.sha1(f.tobytes()).hexdigest()) for c, f in zip(captions, firsts)]
        todo = {k: i for i, k in enumerate(keys) if k not in self.text_cache}  # one of each
        if todo:
            at = list(todo.values())
            if firsts is None:
                encoded = self.adapter.encode_prompts(self.pipe, [captions[i] for i in at])
            else:
                encoded = self.adapter.encode_prompts_with_images(
                    self.pipe, [captions[i] for i in at], [firsts[i] for i in at]
                )
            for j, key in enumerate(todo):
                self.text_cache[key] = {k: v[j].detach().to("cpu").contiguous() for k, v in encoded.items()}
        result = [self.text_cache[k] for k in keys]
        for key in keys:
            self.text_cache.move_to_end(key)
        while len(self.text_cache) > max(self.cache_size, len(keys)):
            self.text_cache.popitem(last=False)
        return result

    @torch.no_grad()
    def conditions(
        self, clips: list[np.ndarray], captions: list[str], length: int
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        """Per clip, its text tensors and its image conditioning: the first frame's at the clip's length (none
        for text-to-video) with the frame itself (uint8, what ``evaluate`` conditions the generated videos on),
        and the last frame's too for a first-last-frame model. Where the text encoder reads the image too
        (``text_sees_image``), each caption is read with its clip's first frame."""
        if self.adapter.task != "i2v":
            return self.text(captions), [{} for _ in clips]
        from radial_lora.constants import FIRST_FRAME, LAST_FRAME

        firsts = [np.ascontiguousarray(c[0]) for c in clips]
        lasts = [np.ascontiguousarray(c[-1]) for c in clips] if self.first_last else None
        encoded = self.adapter.encode_images(self.pipe, firsts, length, lasts)
        images = []
        for i, first in enumerate(firsts):
            images.append({k: v[i].detach().to("cpu", torch.float32).contiguous() for k, v in encoded.items()})
            images[-1][FIRST_FRAME] = torch.from_numpy(first)
            if lasts is not None:
                images[-1][LAST_FRAME] = torch.from_numpy(lasts[i])
        return self.text(captions, firsts if self.adapter.text_sees_image else None), images

    @torch.no_grad()
    def videos(self, clips: list[np.ndarray]) -> torch.Tensor:
        """uint8 [F,H,W,3] clips -> latents [B,C,f,h,w] float32 on the CPU."""
        batch = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3)  # B,3,F,H,W
        batch = (batch.to(self.device, torch.float32) / 127.5 - 1.0).to(self.dtype)
        return self.adapter.encode_videos(self.pipe, batch).detach().to("cpu", torch.float32)


def _save_clip(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Atomic safetensors write; returns the file's sha256."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        digest = sha256_file(tmp)
    return digest


class _ManifestWriter:
    """Append one line per finished clip and flush it to disk at once."""

    def __init__(self, path: Path, existing: list[Record]) -> None:
        self.path = path
        # rewrite once (atomically) without cut-off lines or stale rows, then append
        write_text_atomic(path, "".join(json.dumps(r.to_json()) + "\n" for r in existing))

    def append(self, record: Record) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record.to_json()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- the job


def _check_options(opts: PrepareOptions) -> None:
    if not opts.lengths:
        raise ValueError("--lengths is empty; give frame counts like 17,65")
    for length in opts.lengths:
        latent_geometry(length, opts.height, opts.width)  # 4k+1 frames, sizes multiple of 16
    if opts.clip_mode not in CLIP_MODES:
        raise ValueError(f"--clip-mode {opts.clip_mode!r} is not one of {CLIP_MODES}")
    if not math.isfinite(opts.fps) or opts.fps <= 0:
        raise ValueError(f"--fps {opts.fps} must be a positive number of frames per second (e.g. 16)")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size {opts.batch_size} must be >= 1")
    if opts.stride is not None and opts.stride < 1:
        raise ValueError(f"--stride {opts.stride} must be >= 1")
    if opts.max_clips is not None and opts.max_clips < 1:
        raise ValueError(f"--max-clips {opts.max_clips} must be >= 1")


def _dataset_info(opts: PrepareOptions, adapter: Any, pipe: Any, previous: dict[str, Any] | None) -> dict[str, Any]:
    info = {
        "format": FORMAT,
        "family": opts.family,
        "task": adapter.task,
        "model": opts.model,
        "height": opts.height,
        "width": opts.width,
        "fps": opts.fps,
        "lengths": sorted(set(opts.lengths)),
        "vae_temporal_factor": int(getattr(pipe, "vae_scale_factor_temporal", 4)),
        "vae_spatial_factor": int(getattr(pipe, "vae_scale_factor_spatial", 8)),
        "dtype": opts.dtype,
        "clip_mode": opts.clip_mode,
        "stride": opts.stride,
        "max_clips": opts.max_clips,
    }
    if previous is not None:
        # Every setting that changes the tensors (dtype) or which clips exist (clip mode, stride, max clips):
        # mixing two of them in one dataset is a dataset `validate` rejects, or quietly mixed clips.
        for key in ("format", "family", "model", "height", "width", "fps", "dtype", "clip_mode", "stride", "max_clips"):
            if key in previous and previous.get(key) != info[key]:
                raise ValueError(
                    f"{opts.out / DATASET_JSON}: prepared with {key}={previous.get(key)!r}, this run asks for "
                    f"{info[key]!r}; use another --out folder for different settings"
                )
        info["lengths"] = sorted(set(previous.get("lengths", [])) | set(opts.lengths))
        info["latent_shapes"] = previous.get("latent_shapes", {})
        info["text_keys"] = previous.get("text_keys")
        info["image_keys"] = previous.get("image_keys")
    return info


def _resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def _load(opts: PrepareOptions, adapter: Any | None, pipe: Any | None) -> tuple[Any, Any]:
    """Adapter and pipeline; checks the clip sizes against the model's own geometry rules."""
    if adapter is None:
        from radial_lora.models.registry import detect_family, get_adapter

        opts.family = opts.family or detect_family(opts.model)
        adapter = get_adapter(opts.family)
    opts.family = opts.family or adapter.family
    transformer = None  # a given pipeline has its own
    if pipe is None:
        # Encoding needs only the VAE and the text encoder(s): the transformer(s) are not loaded at all; the
        # geometry check reads their config (the patch size).
        import diffusers
        from diffusers.configuration_utils import FrozenDict

        from radial_lora.models.builtin import resolve_model_id

        log.info("loading the %s pipeline's VAE and text encoder(s) from %s", opts.family, opts.model)
        pipe = adapter.load_pipeline(opts.model, _resolve_dtype(opts.dtype), skip=adapter.denoiser_components)
        transformer_class = getattr(diffusers, adapter.transformer_class_name)
        config = transformer_class.load_config(resolve_model_id(opts.model), subfolder="transformer")
        transformer = SimpleNamespace(config=FrozenDict(config))
        if opts.offload and opts.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=opts.device)  # diffusers moves each model in while it runs
        else:
            if opts.offload:
                log.info("--offload: nothing to offload to on %s; the models stay where they are", opts.device)
            pipe.to(opts.device)
    for length in opts.lengths:
        adapter.geometry(pipe, length, opts.height, opts.width, transformer=transformer)
    return adapter, pipe


def source_signature(path: Path) -> str:
    """What a source video is, cheaply: size, modification time and a sha256 of its first and last 64 KiB.
    A video replaced under the same name (or touched) gets another signature, so its clips are made again."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 16))
        if st.st_size > 1 << 17:
            fh.seek(-(1 << 16), os.SEEK_END)
            digest.update(fh.read(1 << 16))
    return f"{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()[:16]}"


def _signatures(items: list[SourceItem]) -> dict[str, str]:
    out = {}
    for item in items:
        try:
            out[item.source] = source_signature(item.path)
        except OSError:
            out[item.source] = ""  # unreadable: the decode step skips it with its reason
    return out


def warn_long_captions(items: list[SourceItem], adapter: Any, pipe: Any, where: Any) -> int:
    """One warning for the whole input when captions pass the text encoder's token limit (they are cut there):
    how many, the longest, and an example. Returns the count."""
    tokenizer, limit = getattr(pipe, "tokenizer", None), getattr(adapter, "max_sequence_length", None)
    if tokenizer is None or not limit:
        return 0
    lengths = {item.source: len(tokenizer(item.caption)["input_ids"]) for item in items}
    long = {source: n for source, n in lengths.items() if n > limit}
    if long:
        worst = max(long, key=long.get)
        log.warning(
            "%s: %d caption(s) are longer than the text encoder's %d tokens and are cut there (the longest, %s, "
            "has %d tokens); shorten them to keep their ends",
            where,
            len(long),
            limit,
            worst,
            long[worst],
        )
    return len(long)


def _finished_clips(
    out: Path, items: list[SourceItem], signatures: dict[str, str], lengths: list[int]
) -> dict[str, Record]:
    """The manifest's clips a rerun keeps: the file is there unchanged (sha256), and, for the lengths this run
    makes, it was made from this input's video as it is now (its signature) with its caption now. Anything
    else is encoded again, saying why. (Clips of other lengths may come from another input prepared into the
    same dataset; their own rerun checks them.)"""
    existing = read_manifest(out / MANIFEST) if (out / MANIFEST).is_file() else []
    captions = {item.source: item.caption for item in items}
    done: dict[str, Record] = {}
    for record in existing:
        file = out / record.file
        if not (file.is_file() and sha256_file(file) == record.sha256):
            log.warning("clip %s: file missing or changed since it was prepared; encoding it again", record.id)
        elif record.bucket not in lengths:
            done[record.id] = record
        elif record.source in captions and record.caption != captions[record.source]:
            log.warning("clip %s: the caption of %s changed; encoding it again", record.id, record.source)
        elif record.source in signatures and record.source_sig != signatures[record.source]:
            log.warning("clip %s: %s changed (or an older dataset); encoding it again", record.id, record.source)
        else:
            done[record.id] = record
    return done


def _encode_and_write(
    clips: list[Any],
    length: int,
    encoder: Any,
    opts: PrepareOptions,
    manifest: Any,
    summary: PrepareSummary,
    info: dict[str, Any],
) -> None:
    """Encode a batch of same-length clips (VAE + text encoder), write each clip's file and manifest line."""
    latents = encoder.videos([c.frames for c in clips])
    texts, images = encoder.conditions([c.frames for c in clips], [c.item.caption for c in clips], length)
    for clip, latent, text, image in zip(clips, latents, texts, images):
        rel = f"latents/f{length}/{clip.id}.safetensors"
        tensors = {"latents": latent.contiguous(), **text, **image}
        digest = _save_clip(opts.out / rel, tensors, {"id": clip.id, "source": clip.item.source})
        record = Record(
            id=clip.id,
            bucket=length,
            source=clip.item.source,
            caption=clip.item.caption,
            start_frame=clip.start,
            fps=opts.fps,
            height=opts.height,
            width=opts.width,
            num_frames=length,
            latent_shape=tuple(latent.shape),
            file=rel,
            sha256=digest,
            source_sig=clip.signature,
        )
        manifest.append(record)
        summary.encoded[length] += 1
        info.setdefault("latent_shapes", {})[str(length)] = list(latent.shape)
        if info.get("text_keys") is None:
            info["text_keys"] = sorted(text)
        if image and info.get("image_keys") is None:
            info["image_keys"] = sorted(image)


def prepare_dataset(opts: PrepareOptions, *, adapter: Any | None = None, pipe: Any | None = None) -> PrepareSummary:
    """Run the whole job; see the module docstring. ``adapter``/``pipe`` may be given already loaded
    (the demo passes its in-memory tiny pipeline); otherwise they come from ``opts.family``/``opts.model``.
    """
    _check_options(opts)
    _resolve_dtype(opts.dtype)
    items, skipped = collect_inputs(opts.input, video_column=opts.video_column, caption_column=opts.caption_column)
    for skip in skipped:
        log.warning("skip %s: %s", skip.source, skip.reason)
    with FolderLock(opts.out, "radial-lora data prepare"):  # one writer: a second run refuses (locks.py)
        return _prepare(opts, items, skipped, adapter, pipe)


def _prepare(
    opts: PrepareOptions, items: list[SourceItem], skipped: list[Skip], adapter: Any | None, pipe: Any | None
) -> PrepareSummary:
    """The job once it holds ``opts.out``: settings, clips already there, encoding, the manifest."""
    out = opts.out
    info_path = out / DATASET_JSON
    previous = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    adapter, pipe = _load(opts, adapter, pipe)
    warn_long_captions(items, adapter, pipe, opts.input)
    info = _dataset_info(opts, adapter, pipe, previous)
    info["finished"] = False  # until this run ends: `validate` flags an interrupted dataset
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(info_path, info, indent=2)

    signatures = _signatures(items)
    done = _finished_clips(out, items, signatures, sorted(set(opts.lengths)))
    manifest = _ManifestWriter(out / MANIFEST, list(done.values()))
    encoder = _Encoder(adapter, pipe, torch.device(opts.device))
    if not (out / NULL_TEXT).is_file():
        _save_clip(out / NULL_TEXT, encoder.text([""])[0], {"caption": ""})
    summary = PrepareSummary(skipped=skipped, sources=len(items))
    pending: dict[int, list[_PendingClip]] = defaultdict(list)

    def flush(length: int) -> None:
        clips, pending[length] = pending[length], []
        if clips:
            _encode_and_write(clips, length, encoder, opts, manifest, summary, info)

    lengths = sorted(set(opts.lengths))
    for item in tqdm(items, desc="prepare", unit="video", disable=None):
        if opts.clip_mode == "start" and all(clip_id(item.source, n, 0) in done for n in lengths):
            for n in lengths:  # resumed run: every clip of this video is there, no need to decode it
                summary.reused[n] += 1
            continue
        seen = CutClips()
        try:
            total = resampled_count(item.path, opts.fps) if opts.clip_mode == "middle" else None
            frames = resampled_frames(item.path, opts.height, opts.width, opts.fps)
            cuts = cut_clips(frames, lengths, opts.clip_mode, opts.stride, opts.max_clips, total, seen)
            for length, start, clip in cuts:
                cid = clip_id(item.source, length, start)
                if cid in done:
                    summary.reused[length] += 1
                    continue
                pending[length].append(_PendingClip(cid, item, length, start, clip, signatures[item.source]))
                if len(pending[length]) >= opts.batch_size:
                    flush(length)
            frames.close()
        except (VideoReadError, OSError, ValueError) as exc:
            reason = str(exc).replace(str(item.path), "").lstrip(": ") or type(exc).__name__
            if seen.frames:
                reason += f"; the clips within its first {seen.frames} frames are kept"
            summary.skipped.append(Skip(item.source, f"unreadable: {reason}"))
            log.warning("skip %s: unreadable (%s)", item.source, reason)
            continue
        if seen.damaged:
            lost = ", ".join(f"{k} of {n} frames" for n, k in sorted(seen.damaged.items()))
            reason = f"damaged: {lost} overlap damaged frames and were left out; the other clips are kept"
            summary.skipped.append(Skip(item.source, reason))
            log.warning("skip part of %s: %s", item.source, reason)
        too_short = [n for n in lengths if seen.complete and seen.frames < n]
        if too_short:
            reason = f"too short: {seen.frames} frames at {opts.fps:g} fps, no clip of {too_short} frames"
            summary.skipped.append(Skip(item.source, reason))
            log.warning("skip %s: %s", item.source, reason)
    for length in list(pending):
        flush(length)
    counts = Counter(r.bucket for r in done.values()) + summary.encoded
    info["num_clips"] = {str(b): counts[b] for b in info["lengths"]}
    info["finished"] = True
    write_json_atomic(info_path, info, indent=2)
    log.info(
        "dataset %s: %d clips encoded, %d already prepared, %d inputs skipped",
        out,
        sum(summary.encoded.values()),
        sum(summary.reused.values()),
        len(summary.skipped),
    )
    return summary
