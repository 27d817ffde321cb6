"""Video files <-> uint8 frame arrays through PyAV (FFmpeg): mp4, mov, mkv, webm, gif.

Frames are always ``uint8 [F, H, W, 3]`` RGB, as a player shows them: from the video stream a player picks
(FFmpeg's best stream, never cover art), with square pixels (the sample aspect ratio applied: 720x480 DVD at
32:27 becomes 853x480) and upright (the display matrix's rotation applied, as ffmpeg's autorotate does for
phone videos). Reading raises :class:`VideoReadError` (a ``ValueError``)
naming the file for anything FFmpeg cannot open or decode, so a dataset job can skip the file with one
log line. Writing is atomic: a temp file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from radial_lora.files import atomic_path

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi", ".m4v")

# Encoder and pixel format chosen by the container when the caller does not name a codec.
_DEFAULT_CODEC = {".webm": "libvpx-vp9", ".gif": "gif"}
_PIX_FMT = {"gif": "rgb8", "libvpx-vp9": "yuv420p", "libvpx": "yuv420p"}


class VideoReadError(ValueError):
    """A video file that cannot be opened or decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (``num_frames`` may be an estimate)."""

    path: str
    fps: float
    num_frames: int
    height: int
    width: int
    codec: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    """Average frame rate, falling back to FFmpeg's guess (gifs and some webm lack an average)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 0.0


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The stream a player shows: FFmpeg's best video stream (more decoded frames, default disposition),
    never an attached picture (an mkv's or m4a's cover art)."""
    real = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not real:
        raise VideoReadError(f"{container.name}: the only video stream is cover art (an attached picture)")
    best = container.streams.best("video")
    return best if best in real else real[0]


def as_shown(frame: av.VideoFrame, sample_aspect: Fraction | None) -> np.ndarray:
    """``uint8 [H, W, 3]`` as displayed: stretched to square pixels, then rotated by the display matrix."""
    width, height = frame.width, frame.height
    if sample_aspect and sample_aspect > 0 and sample_aspect != 1:
        if sample_aspect > 1:
            width = int(round(width * sample_aspect))
        else:
            height = int(round(height / sample_aspect))
        image = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    else:
        image = frame.to_ndarray(format="rgb24")
    turns = int(round((frame.rotation or 0) / 90)) % 4  # counter-clockwise, as np.rot90
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoReadError(f"{path}: cannot open as a video ({exc}); is it a complete video file?") from exc
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: the file has no video stream")
    return container


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the header only: fps, frame count (from the container, else duration x fps), the coded size (before
    the aspect ratio and rotation that decoded frames get), codec."""
    path = Path(path)
    container = _open(path)
    try:
        stream = video_stream(container)
        fps = _stream_fps(stream)
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration is not None and stream.time_base is not None:
            frames = int(round(float(stream.duration * stream.time_base) * fps))
        if frames <= 0 and container.duration is not None:
            frames = int(round(container.duration / av.time_base * fps))
        ctx = stream.codec_context
        return VideoInfo(str(path), fps, frames, int(ctx.height), int(ctx.width), ctx.name)
    finally:
        container.close()


def iter_frames(
    path: str | os.PathLike[str], *, start_frame: int = 0, max_frames: int | None = None
) -> Iterator[np.ndarray]:
    """Decode frames one at a time as ``uint8 [H, W, 3]``; stops decoding once ``max_frames`` are out."""
    path = Path(path)
    if start_frame < 0 or (max_frames is not None and max_frames < 0):
        raise ValueError(f"start_frame={start_frame} and max_frames={max_frames} must not be negative")
    container = _open(path)
    emitted = 0
    try:
        stream = video_stream(container)
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and emitted >= max_frames:
                break
            if index < start_frame:
                continue
            yield as_shown(frame, stream.sample_aspect_ratio)
            emitted += 1
    except (av.FFmpegError, OSError) as exc:
        raise VideoReadError(f"{path}: decoding failed after {emitted} frames ({exc})") from exc
    finally:
        container.close()


def iter_timed_frames(
    path: str | os.PathLike[str], *, tolerate_damage: bool = False
) -> Iterator[tuple[float, np.ndarray | None]]:
    """``(seconds since the first frame, uint8 [H, W, 3])`` per frame: presentation times, so variable
    frame rate videos (phones) resample correctly. Frames without a timestamp get index / average fps.

    ``tolerate_damage``: decode packet by packet and go on past a packet the decoder rejects, yielding
    ``(time, None)`` for it and for every frame until the next key frame (they may reference what was
    lost, or come flagged corrupt), so a corrupt stretch costs only the frames near it. Otherwise the first
    decoding error raises :class:`VideoReadError`."""
    path = Path(path)
    container = _open(path)
    first: float | None = None
    index = 0
    damaged = False
    try:
        stream = video_stream(container)
        fps = _stream_fps(stream) or 1.0
        last = 0.0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.FFmpegError, OSError) as exc:
                if not tolerate_damage:
                    raise
                if packet.pts is not None and packet.time_base is not None:
                    last = float(packet.pts * packet.time_base) - (first or 0.0)
                log.debug("%s: damaged packet near %.3f s (%s)", path, last, exc)
                damaged = True
                yield last, None
                continue
            for frame in frames:
                t = frame.time if frame.time is not None else index / fps
                first = t if first is None else first
                last = t - first
                index += 1
                if tolerate_damage and (frame.is_corrupt or (damaged and not frame.key_frame)):
                    damaged = True
                    yield last, None
                    continue
                damaged = False
                yield last, as_shown(frame, stream.sample_aspect_ratio)
    except (av.FFmpegError, OSError) as exc:
        raise VideoReadError(f"{path}: decoding failed after {index} frames ({exc})") from exc
    finally:
        container.close()


def read_video(
    path: str | os.PathLike[str], *, start_frame: int = 0, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """Whole video (or ``max_frames`` from ``start_frame``) as ``(uint8 [F, H, W, 3], fps)``."""
    path = Path(path)
    container = _open(path)
    try:
        fps = _stream_fps(video_stream(container))
    finally:
        container.close()
    frames = list(iter_frames(path, start_frame=start_frame, max_frames=max_frames))
    if not frames:
        raise VideoReadError(f"{path}: no decodable frames (from frame {start_frame})")
    if fps <= 0:
        raise VideoReadError(f"{path}: the stream has no frame rate; re-encode it with a fixed fps")
    return np.stack(frames), fps


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {frames.dtype}; convert with (x * 255).round()")
    return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row/column rather than refuse the video."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        log.debug("padding %dx%d frames to even size %dx%d for yuv420p", w, h, w + pw, h + ph)
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float,
    *,
    codec: str | None = None,
    crf: int = 18,
    odd_size: str = "pad",
    reproducible: bool = False,
) -> Path:
    """Write ``uint8 [F, H, W, 3]`` frames as a real video file; returns the path.

    ``codec=None`` picks by extension: H.264 (``libx264``, yuv420p) for mp4/mov/mkv, VP9 for webm, GIF for
    gif. yuv420p needs even sizes: ``odd_size="pad"`` replicates one edge row/column, ``"error"`` refuses.
    ``reproducible=True`` (H.264 only) decodes to the same frames on any machine and run: lossless (qp 0), so
    the decoded frames are the input's yuv420p whatever the encoder decides (lossy x264 still varied in its
    P/B-frame choices between runs of tiny 32x32 clips after every other fix), one encoder thread (x264's
    output depends on its thread count, which follows the cores) and bit-exact muxing, so the bytes repeat
    too. For test fixtures and sample data: bigger files than ``crf``.
    """
    path = Path(path)
    frames = _check_frames(frames)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    codec = codec or _DEFAULT_CODEC.get(suffix, "libx264")
    pix_fmt = _PIX_FMT.get(codec, "yuv420p")
    if reproducible and codec != "libx264":
        raise ValueError(f"{path}: reproducible=True writes lossless H.264 (.mp4/.mov/.mkv), not {codec}")
    if pix_fmt == "yuv420p" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        if odd_size == "error":
            raise ValueError(
                f"{path}: {codec}/yuv420p needs even width and height, got {frames.shape[2]}x{frames.shape[1]}"
            )
        if odd_size != "pad":
            raise ValueError(f"odd_size must be 'pad' or 'error', got {odd_size!r}")
        frames = _pad_even(frames)
    with atomic_path(path, suffix=suffix) as tmp:
        _encode(
            str(tmp),
            frames,
            Fraction(fps).limit_denominator(1001),
            codec,
            pix_fmt,
            crf,
            container_format(suffix),
            reproducible,
        )
    return path


def container_format(suffix: str) -> str | None:
    """FFmpeg muxer for an extension (the temp file's ``.tmp.mp4`` suffix would confuse the guess)."""
    return {
        ".mp4": "mp4",
        ".m4v": "mp4",
        ".mov": "mov",
        ".mkv": "matroska",
        ".webm": "webm",
        ".gif": "gif",
        ".avi": "avi",
    }.get(suffix)


def _encode(
    target: str,
    frames: np.ndarray,
    rate: Fraction,
    codec: str,
    pix_fmt: str,
    crf: int,
    fmt: str | None,
    reproducible: bool = False,
) -> None:
    options: dict[str, str] = {}
    if codec == "libx264":
        options = {"qp": "0"} if reproducible else {"crf": str(crf)}
        options["preset"] = "medium"
    elif codec in ("libvpx-vp9", "libvpx"):
        options = {"crf": str(max(crf, 4)), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
    container_options: dict[str, str] = {}
    if reproducible:
        options |= {"threads": "1", "flags": "+bitexact"}
        container_options = {"fflags": "+bitexact"}
    with av.open(target, mode="w", format=fmt, options=container_options) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        for index, image in enumerate(frames):
            # Converted here and with timestamps (1/rate units): left to encode(), PyAV's implicit pixel
            # conversion made the third of three same-process encodes of fixed frames differ run to run.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format=pix_fmt)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale so the frame covers ``height x width`` (aspect kept), then cut the centre."""
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        frame = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0))
    top, left = (nh - height) // 2, (nw - width) // 2
    return frame[top : top + height, left : left + width]


def read_image(path: str | os.PathLike[str], height: int, width: int) -> np.ndarray:
    """A picture file (PNG, JPEG, WebP, ...) as uint8 ``[height, width, 3]``, scaled to cover and centre-cropped
    as ``data prepare`` does the videos' frames; a file that cannot be read is one line naming it."""
    from PIL import UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as img:
            rgb = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {p} not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{p}: cannot read it as a picture ({exc}); give a PNG, JPEG or WebP file") from None
    return np.ascontiguousarray(resize_center_crop(rgb, height, width))
