"""Synthetic sample dataset: one coloured shape bouncing off the walls, with known motion.

Why: the demo and the tests need videos whose content a tiny model can learn in minutes and whose motion
we know exactly (for captions that are true, and for checking motion in generated clips). Rendering is a
pure, vectorised numpy function of a :class:`ClipSpec`; any size and frame rate.

Units: positions are fractions of the free range of the shape's centre (0 = touching the left/top wall,
1 = touching the right/bottom wall); ``speed`` is in free ranges per second along the captioned axis and
``drift`` the speed across it as a fraction of ``speed`` (signed: + = right/down), so the same spec shows
the same motion (and the same bounces) at any size and fps.

Why the drift (``sample_specs`` gives every clip one of 0.35-0.6): a lone shape bouncing along one axis
repeats itself exactly, back and forth, so the real clips of that world *are* looping videos and a looping
detector could not tell a generated ping-pong from the data. With a sideways drift the walls are met at
other times on the two axes and no stretch of a clip comes back. The caption names the captioned axis only
(the drift is the model's to choose, as real captions leave most of the motion unsaid).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from radial_lora.data.video_io import write_video
from radial_lora.files import write_text_atomic

log = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (10, 10, 10), "gray": (110, 110, 110)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# speed (free ranges per second) -> caption adverb; the threshold sits between the two sampled speeds
SPEEDS: dict[str, float] = {"slowly": 0.4, "quickly": 0.9}
_FAST_FROM = 0.65
DRIFT_RANGE: tuple[float, float] = (0.35, 0.6)  # |drift| of ``sample_specs`` (see the module docstring)
# shape radius (fraction of the shorter side) of ``sample_specs``: a 32-pixel frame then shows shapes 14-19 px
# across, big enough that a circle, a square and a triangle differ in more than a few edge pixels (at 0.12-0.2,
# 4-6 px radii, the tiny base's VAE rounded every shape into the same blob)
RADIUS_RANGE: tuple[float, float] = (0.22, 0.3)

_FIXED_WORDS = ("a", "on", "background", "moves", "and", "bounces", "off", "the", "wall", "between", "walls")
CAPTION_VOCABULARY: tuple[str, ...] = tuple(
    sorted({*_FIXED_WORDS, *PALETTE, *BACKGROUNDS, *SHAPES, *DIRECTIONS, *SPEEDS})
)
"""Every word any sample caption can use (lower case, no punctuation): a WordLevel tokenizer covers it."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one synthetic video (see the module docstring for the units)."""

    shape: str = "circle"
    colour: str = "red"
    background: str = "black"
    direction: str = "right"
    speed: float = SPEEDS["slowly"]
    start_x: float = 0.5
    start_y: float = 0.5
    radius: float = 0.15  # fraction of the shorter canvas side
    drift: float = 0.0  # speed across the captioned axis, as a fraction of ``speed`` (+ = right/down)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(PALETTE)),
            ("background", self.background, tuple(BACKGROUNDS)),
            ("direction", self.direction, DIRECTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ClipSpec.{name}={value!r} is not one of {allowed}")
        if not (0.0 <= self.start_x <= 1.0 and 0.0 <= self.start_y <= 1.0):
            raise ValueError(f"ClipSpec start ({self.start_x}, {self.start_y}) must lie in [0, 1]")
        if not 0.02 <= self.radius < 0.5:
            raise ValueError(f"ClipSpec.radius={self.radius} must be in [0.02, 0.5)")
        if self.speed < 0:
            raise ValueError(f"ClipSpec.speed={self.speed} must be >= 0")
        if not -1.0 < self.drift < 1.0:
            raise ValueError(f"ClipSpec.drift={self.drift} must be in (-1, 1): slower than the captioned motion")


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 8 or w < 8:
        raise ValueError(f"size {size} is too small; use at least 8x8 pixels")
    return int(h), int(w)


def _reflect(u: np.ndarray) -> np.ndarray:
    """Unfolded coordinate -> position in [0, 1] bouncing off both ends (a triangle wave of period 2)."""
    m = np.mod(u, 2.0)
    return np.where(m <= 1.0, m, 2.0 - m)


def trajectory(
    spec: ClipSpec, num_frames: int, size: int | tuple[int, int], fps: float
) -> tuple[np.ndarray, np.ndarray]:
    """The shape's centre in pixels per frame: ``(cx [F], cy [F])`` float64 — the ground-truth motion."""
    h, w = _as_hw(size)
    r = spec.radius * min(h, w)
    fx, fy = _unit_trajectory(spec, num_frames, fps)
    return r + fx * (w - 2 * r), r + fy * (h - 2 * r)


def _unit_trajectory(spec: ClipSpec, num_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre as fractions of the free range per frame (independent of the canvas size)."""
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"num_frames={num_frames} must be >= 1 and fps={fps} > 0")
    t = np.arange(num_frames, dtype=np.float64) / fps
    sign = 1.0 if spec.direction in ("right", "down") else -1.0
    along, across = sign * spec.speed * t, spec.drift * spec.speed * t
    if spec.direction in ("left", "right"):
        return _reflect(spec.start_x + along), _reflect(spec.start_y + across)
    return _reflect(spec.start_x + across), _reflect(spec.start_y + along)


def count_bounces(spec: ClipSpec, num_frames: int, fps: float) -> int:
    """Reversals along the captioned axis visible in the sampled frames (what the caption's bounce clause says)."""
    cx, cy = _unit_trajectory(spec, num_frames, fps)
    steps = np.diff(cx if spec.direction in ("left", "right") else cy)
    signs = np.sign(steps[np.abs(steps) > 1e-9])
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def render_clip(spec: ClipSpec, num_frames: int, size: int | tuple[int, int], fps: float) -> np.ndarray:
    """Render the clip as ``uint8 [F, H, W, 3]`` (pure function; one broadcast over all frames)."""
    h, w = _as_hw(size)
    cx, cy = trajectory(spec, num_frames, (h, w), fps)
    r = spec.radius * min(h, w)
    yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
    dx = xx - cx.astype(np.float32)[:, None, None]
    dy = yy - cy.astype(np.float32)[:, None, None]
    if spec.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif spec.shape == "square":
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    else:  # triangle, apex up: half-width grows from 0 at the top to r at the bottom
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    clip = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    clip[:] = np.asarray(BACKGROUNDS[spec.background], dtype=np.uint8)
    clip[inside] = np.asarray(PALETTE[spec.colour], dtype=np.uint8)
    return clip


def caption_for(spec: ClipSpec, num_frames: int | None = None, fps: float | None = None) -> str:
    """An honest caption. The bounce clause needs the clip length: without it the caption omits bounces."""
    adverb = "quickly" if spec.speed >= _FAST_FROM else "slowly"
    text = f"a {spec.colour} {spec.shape} on a {spec.background} background moves {spec.direction} {adverb}"
    if num_frames is not None:
        if fps is None:
            raise ValueError("caption_for needs fps together with num_frames to decide whether it bounces")
        bounces = count_bounces(spec, num_frames, fps)
        if bounces == 1:
            text += " and bounces off the wall"
        elif bounces > 1:
            text += " and bounces between the walls"
    return text


_CAPTION_RE = re.compile(
    rf"^a ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) on a ({'|'.join(BACKGROUNDS)}) background "
    rf"moves ({'|'.join(DIRECTIONS)}) ({'|'.join(SPEEDS)})( and bounces (off the wall|between the walls))?$"
)


def spec_from_caption(caption: str) -> ClipSpec | None:
    """The parts of a :func:`caption_for` caption (shape, colour, background, direction, speed adverb) as a
    spec; None for any other text. Start and radius are not in a caption: the middle of the sampled range.

    Why: evaluation scores generated videos against their prompts when the prompts are sample captions.
    """
    m = _CAPTION_RE.match(" ".join(caption.lower().split()))
    if m is None:
        return None
    colour, shape, background, direction, adverb = m.groups()[:5]
    return ClipSpec(
        shape=shape,
        colour=colour,
        background=background,
        direction=direction,
        speed=SPEEDS[adverb],
        radius=sum(RADIUS_RANGE) / 2,
    )


def sample_specs(n: int, seed: int = 0) -> list[ClipSpec]:
    """``n`` varied specs, the same for the same seed (numpy's PCG64 stream)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(PALETTE), list(BACKGROUNDS)
    specs = []
    for _ in range(n):
        background = backgrounds[rng.integers(len(backgrounds))]
        specs.append(
            ClipSpec(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=colours[rng.integers(len(colours))],
                background=background,
                direction=DIRECTIONS[rng.integers(len(DIRECTIONS))],
                speed=list(SPEEDS.values())[rng.integers(len(SPEEDS))],
                start_x=float(rng.uniform(0.2, 0.8)),
                start_y=float(rng.uniform(0.2, 0.8)),
                radius=float(rng.uniform(*RADIUS_RANGE)),
                drift=float(rng.choice((-1.0, 1.0)) * rng.uniform(*DRIFT_RANGE)),
            )
        )
    return specs


def write_sample_dataset(
    out_dir: str | os.PathLike[str],
    num_videos: int = 8,
    num_frames: int = 81,
    size: int | tuple[int, int] = 64,
    fps: float = 16.0,
    seed: int = 0,
) -> Path:
    """Write ``sample_NNNN.mp4`` + ``sample_NNNN.txt`` per video and a ``metadata.jsonl`` (video, caption,
    spec, bounces) — both the folder format and the JSONL format that ``data prepare`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = _as_hw(size)
    rows = []
    for i, spec in enumerate(tqdm(sample_specs(num_videos, seed), desc="sample videos", unit="video")):
        name = f"sample_{i:04d}"
        caption = caption_for(spec, num_frames, fps)
        write_video(out / f"{name}.mp4", render_clip(spec, num_frames, (h, w), fps), fps, reproducible=True)
        write_text_atomic(out / f"{name}.txt", caption + "\n")
        rows.append(
            {
                "video": f"{name}.mp4",
                "caption": caption,
                "num_frames": num_frames,
                "fps": fps,
                "height": h,
                "width": w,
                "bounces": count_bounces(spec, num_frames, fps),
                "spec": asdict(spec),
            }
        )
    write_text_atomic(out / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    log.info("wrote %d sample videos (%d frames, %dx%d, %g fps) to %s", num_videos, num_frames, w, h, fps, out)
    return out
