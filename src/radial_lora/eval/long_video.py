"""What goes wrong in long generated videos, measured without model weights: motion, frozen, looping, degrading.

Why: past the length a model was trained for, videos fail in three ways that users report most: the motion
slows and stops (frozen), the content comes back (the clip plays back and forth or repeats a stretch of
itself: looping), and the picture fades (contrast, sharpness or colour lost: degrading). A score that asks
only "is the right thing on screen" calls those videos right. This module measures each on any video (a
``uint8 [F, H, W, 3]`` array and its frame rate), with OpenCV's Farneback optical flow (Farnebäck, SCIA 2003)
for motion; ``docs/EVALUATION.md`` says what each number is, its threshold and why.

The three parts share one preparation (:func:`analysis_frames`): grey, resized so the short side is
``ANALYSIS_SIDE`` pixels, blurred a little, and standardised per frame (so flicker, a global brightness
change, is no motion and no change). Motion is in *short sides per second*: 0.1 = a tenth of the frame's
short side each second, whatever the resolution and frame rate.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ANALYSIS_SIDE = 64  # short side (px) the frames are resized to for flow and loop matching
BLUR = 0.02  # Gaussian blur sigma as a fraction of ANALYSIS_SIDE (noise and compression blocks)
MOTION_WINDOW_S = 0.5  # seconds over which persistent motion is measured (at least 2 frames)
TRACK_SPACING = 2  # analysis pixels between the points that follow the flow
EDGE_SHARE = 0.1  # motion is measured at the pixels of the strongest 10% gradients ...
EDGE_QUANTILE = 0.8  # ... as the 80th percentile of their flow magnitudes
STILL = 0.01  # short sides per second: below this a stretch of the clip is still
FROZEN_SHARE = 0.25  # frozen: still for at least this share of the clip, in one stretch
LOOP_RETURN = 0.35  # a frame "comes back" when its distance to an earlier one is below this share of the
#                   largest distance the content went away in between
LOOP_AWAY = 0.08  # ... and the content went away by at least this much (RMS of standardised frames)
LOOP_SHARE = 0.3  # looping: the repeated stretch (both copies) covers at least this share of the clip
LOOP_MIN_GAP_S = 0.25  # a repeat must come back after at least this many seconds
DEGRADE_DROP = 0.4  # degrading: contrast, sharpness or colourfulness of the last quarter 40% below the first
DEGRADE_FLOORS = (8.0, 0.05, 10.0)  # contrast (grey levels), sharpness, colourfulness under which no fade counts
SMOOTH_S = 0.5  # seconds of the moving median that smooths the motion curve before the still test


@dataclass
class VideoScore:
    """The numbers behind each flag of one video (see the module constants for the thresholds)."""

    frames: int
    fps: float
    height: int
    width: int
    motion: float  # mean motion over the clip, short sides per second
    motion_quarters: list[float]  # the same per quarter of the clip
    motion_decay: float | None  # last quarter / first (1 = steady, 0 = the motion died); None: first is still
    still_share: float  # longest still stretch / clip length
    frozen: bool
    loop_kind: str | None  # "back-and-forth" or "repeat" (the longest repeated stretch), None if none
    loop_share: float  # share of the clip the longest repeated stretch covers (both copies)
    loop_lag_s: float | None  # seconds between a frame and its return
    looping: bool
    contrast_change: float  # last quarter vs first: -0.5 = half the contrast
    sharpness_change: float
    colour_change: float
    degrading: bool
    motion_ratio: float | None = None  # with references: motion / the references' median motion (same length)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- preparation ------------------------------------------------------------------------------------------------


def _check(frames: np.ndarray, fps: float) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] < 3:
        raise ValueError(f"a video needs at least 3 frames to be scored; got {frames.shape[0]}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return frames


def analysis_frames(frames: np.ndarray) -> np.ndarray:
    """``uint8 [F, h, w]``: grey, short side ``ANALYSIS_SIDE``, blurred, standardised per frame (flicker-free)."""
    _, height, width, _ = frames.shape
    scale = ANALYSIS_SIDE / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    out = []
    for frame in frames:
        grey = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32), size, interpolation=interp)
        grey = cv2.GaussianBlur(grey, (0, 0), BLUR * ANALYSIS_SIDE)
        grey = (grey - grey.mean()) / max(float(grey.std()), 2.0)
        out.append(np.clip(grey * 40.0 + 128.0, 0, 255).astype(np.uint8))
    return np.stack(out)


# -- motion -----------------------------------------------------------------------------------------------------


def _flows(grey: np.ndarray) -> list[np.ndarray]:
    """Farneback flow from every frame to the next (``[h, w, 2]`` each, analysis pixels)."""
    return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 5, 15, 3, 5, 1.1, 0) for a, b in zip(grey[:-1], grey[1:])]


def _edge_strength(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    return np.hypot(cv2.Sobel(img, cv2.CV_32F, 1, 0), cv2.Sobel(img, cv2.CV_32F, 0, 1))


def persistent_speed(flows: list[np.ndarray], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Carry ``points`` ``[P, 2]`` (x, y) through ``flows`` (one per frame); per point the speed of the motion
    that builds up, in pixels per frame, and whether it stayed in the frame.

    ``v^2 = (|x_w - x_0|^2 - sum |step|^2) / (w^2 - w)`` over ``w`` steps: the speed of steady motion, zero in
    expectation for jitter (sensor noise, grain, compression: a random walk, whose squared distance grows only
    like the sum of its squared steps), and little for an outline that trembles in place.
    """
    height, width = flows[0].shape[:2]
    start, pos = points, points.copy()
    inside = np.ones(len(points), dtype=bool)
    step_sq = np.zeros(len(points))
    for flow in flows:
        step = cv2.remap(flow, pos[:, :1], pos[:, 1:], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[:, 0]
        pos = pos + step
        step_sq += (step**2).sum(axis=1)
        inside &= (pos[:, 0] >= 0) & (pos[:, 0] <= width - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= height - 1)
    w = len(flows)
    speed_sq = (((pos - start) ** 2).sum(axis=1) - step_sq) / (w * w - w)
    return np.sqrt(np.maximum(speed_sq, 0.0)), inside


def motion_curve(grey: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Persistent motion of every window of ``MOTION_WINDOW_S``, short sides per second, and each window's middle.

    Per window a grid of points (one every ``TRACK_SPACING`` pixels) follows the flow for the window's frames
    (:func:`persistent_speed`); the window's motion is the ``EDGE_QUANTILE`` quantile of the speeds of the points
    that start on an edge (the strongest ``EDGE_SHARE`` gradients: inside a flat shape the flow is a guess) and
    stay in the frame. An upper quantile keeps a moving object of a few percent of the frame visible among
    still edges, where the maximum would follow the flow's outliers. So a still picture with noise is still, a
    slow drift on a noisy clip moves, and a shape that wobbles without going anywhere barely counts.
    """
    n, height, width = grey.shape
    w = min(max(2, round(MOTION_WINDOW_S * fps)), n - 1)
    flows = _flows(grey)
    ys, xs = np.mgrid[TRACK_SPACING // 2 : height : TRACK_SPACING, TRACK_SPACING // 2 : width : TRACK_SPACING]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    values = []
    for t in range(n - w):
        speed, inside = persistent_speed(flows[t : t + w], grid)
        strength = _edge_strength(grey[t])[ys.ravel(), xs.ravel()]
        on_edge = (strength >= np.quantile(strength, 1.0 - EDGE_SHARE)) & inside
        values.append(float(np.quantile(speed[on_edge], EDGE_QUANTILE)) if on_edge.any() else 0.0)
    return np.asarray(values) * fps / ANALYSIS_SIDE, np.arange(n - w) + w / 2


def _quarters(values: np.ndarray, times: np.ndarray, frames: int) -> list[float]:
    edges = np.linspace(0, frames - 1, 5)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = values[(times >= lo) & (times <= hi)]
        if inside.size == 0:  # a short clip: the value nearest the quarter's middle
            inside = values[[int(np.argmin(np.abs(times - (lo + hi) / 2)))]]
        out.append(max(0.0, float(inside.mean())))
    return out


def _longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def still_share(values: np.ndarray, fps: float) -> float:
    """Longest stretch whose (moving-median smoothed) motion is under ``STILL``, as a share of the curve."""
    half = max(0, round(SMOOTH_S * fps / 2))
    smooth = np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])
    return _longest_run(smooth < STILL) / len(values)


# -- looping ----------------------------------------------------------------------------------------------------


def distance_matrix(grey: np.ndarray) -> np.ndarray:
    """RMS difference between every two standardised analysis frames (0 = the same picture)."""
    x = grey.reshape(len(grey), -1).astype(np.float32) / 40.0
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0) / x.shape[1]
    return np.sqrt(d2)


def loop_states(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For frames ``i < j``: ``returns[i, j]``, frame ``j`` shows frame ``i``'s picture again after the content
    went away in between; ``differs[i, j]``, it went away and did not come back. Neither: it never went far."""
    n = len(d)
    away = np.zeros_like(d)
    for i in range(n - 2):
        away[i, i + 2 :] = np.maximum.accumulate(d[i, i + 1 : -1])
    went = away >= LOOP_AWAY
    returns = went & (d <= LOOP_RETURN * away)
    return returns, went & ~returns


def find_loop(d: np.ndarray, fps: float) -> tuple[str | None, float, float | None]:
    """The longest repeated stretch: ``(kind, share of the clip both copies cover, lag in seconds)``.

    "repeat": frames ``i .. i+r`` come back as ``i+lag .. i+lag+r``; "back-and-forth": frame ``c-k`` comes back
    as ``c+k`` (the clip plays backwards from ``c``) for every ``k`` up to a reach. Only pictures that went away
    and came back count, so a frozen clip has no loop, and neither has slow steady motion.
    """
    n = len(d)
    min_gap = max(2, round(LOOP_MIN_GAP_S * fps))
    returns, differs = loop_states(d)
    best: tuple[str | None, float, float | None] = (None, 0.0, None)
    for lag in range(min_gap, n):
        run = 0
        for i in range(n - lag):
            run = run + 1 if returns[i, i + lag] else 0
            share = min(run + lag, 2 * run) / n
            if share > best[1]:
                best = ("repeat", share, lag / fps)
    for twice_centre in range(1, 2 * n - 2):  # on frame c (even) or between frames c and c+1 (odd)
        lo, hi = twice_centre // 2, (twice_centre + 1) // 2
        reach = 0
        while lo > 0 and hi < n - 1:
            lo, hi = lo - 1, hi + 1
            if differs[lo, hi]:
                break
            if returns[lo, hi] and hi - lo >= min_gap:
                reach = hi - lo + 1
        if reach / n > best[1]:
            best = ("back-and-forth", reach / n, None)
    return best


# -- degrading --------------------------------------------------------------------------------------------------


def picture_measures(frame: np.ndarray) -> tuple[float, float, float]:
    """Contrast (std of luminance), sharpness (RMS of the Laplacian per unit contrast: a blurred edge keeps its
    mean gradient but loses its Laplacian energy) and colourfulness (Hasler and Süsstrunk 2003) of one
    ``uint8 [H, W, 3]`` frame, on the 0-255 scale."""
    rgb = frame.astype(np.float32)
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    contrast = float(grey.std())
    sharpness = float(np.sqrt(np.mean(cv2.Laplacian(grey, cv2.CV_32F) ** 2))) / max(contrast, 1.0)
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colour = float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))
    return contrast, sharpness, colour


def _change(series: np.ndarray, floor: float) -> float:
    """Last quarter vs first quarter of a per-frame series, as a relative change (-0.3 = 30% lost); 0 when the
    first quarter is under ``floor`` (a white square on black has no colour to lose, and noise in a tiny
    value is no fade)."""
    q = max(1, len(series) // 4)
    first, last = float(np.median(series[:q])), float(np.median(series[-q:]))
    return 0.0 if first < floor else last / first - 1.0


def _steady_decline(series: np.ndarray) -> bool:
    """The quarters' medians never rise by more than 5% (a fade, not content that comes and goes)."""
    meds = [float(np.median(part)) for part in np.array_split(series, 4)]
    return all(b <= a * 1.05 for a, b in zip(meds, meds[1:]))


# -- one video --------------------------------------------------------------------------------------------------


def score_frames(frames: np.ndarray, fps: float) -> VideoScore:
    """Every measure and flag of one ``uint8 [F, H, W, 3]`` video shown at ``fps``."""
    frames = _check(frames, fps)
    n, height, width, _ = frames.shape
    grey = analysis_frames(frames)
    values, times = motion_curve(grey, fps)
    quarters = _quarters(values, times, n)
    still = still_share(values, fps)
    kind, share, lag = find_loop(distance_matrix(grey), fps)
    measures = np.array([picture_measures(f) for f in frames])
    changes = [_change(measures[:, i], floor) for i, floor in enumerate(DEGRADE_FLOORS)]
    degrading = any(c <= -DEGRADE_DROP and _steady_decline(measures[:, i]) for i, c in enumerate(changes))
    frozen = still >= FROZEN_SHARE
    return VideoScore(
        frames=n,
        fps=float(fps),
        height=height,
        width=width,
        motion=max(0.0, float(values.mean())),
        motion_quarters=quarters,
        motion_decay=quarters[-1] / quarters[0] if quarters[0] > STILL else None,
        still_share=still,
        frozen=frozen,
        loop_kind=kind,
        loop_share=share,
        loop_lag_s=lag,
        looping=(not frozen) and share >= LOOP_SHARE,
        contrast_change=changes[0],
        sharpness_change=changes[1],
        colour_change=changes[2],
        degrading=degrading,
    )


# -- files ------------------------------------------------------------------------------------------------------


@dataclass
class ScoreRun:
    """What ``radial-lora score`` found: one entry per scored video, one line per file that could not be."""

    videos: list[dict[str, Any]]
    errors: list[dict[str, str]]
    reference: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def video_files(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, folders as the video files directly inside them (sorted); a missing path raises."""
    from radial_lora.data.video_io import VIDEO_EXTENSIONS

    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{path}: a folder with no video files ({', '.join(VIDEO_EXTENSIONS)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return out


def score_file(path: str | os.PathLike[str]) -> VideoScore:
    """Read a video as a player shows it (:func:`radial_lora.data.video_io.read_video`) and score it; a file
    that cannot be read raises ``ValueError`` naming it."""
    from radial_lora.data.video_io import read_video

    frames, fps = read_video(path)
    try:
        return score_frames(frames, fps)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def reference_motion(scores: list[VideoScore]) -> dict[int, float]:
    """Median motion of reference clips per frame count."""
    by_length: dict[int, list[float]] = {}
    for s in scores:
        by_length.setdefault(s.frames, []).append(s.motion)
    return {n: float(np.median(v)) for n, v in sorted(by_length.items())}


def relative_motion(score: VideoScore, references: dict[int, float]) -> tuple[float | None, str | None]:
    """``motion / the references' median motion`` at the same frame count, else over all references (with a
    note saying so); None without references or when they do not move."""
    if not references:
        return None, None
    if score.frames in references:
        ref, note = references[score.frames], None
    else:
        ref = float(np.median(list(references.values())))
        note = f"no reference clip has {score.frames} frames: motion compared with all references"
    return (score.motion / ref if ref > STILL else None), note


def score_paths(
    paths: list[str | os.PathLike[str]], reference: list[str | os.PathLike[str]] | None = None, progress: bool = False
) -> ScoreRun:
    """Score every video under ``paths`` (and ``reference``); a file that cannot be read is one error line, the
    rest are still scored. With references each video gets ``motion_ratio`` (1.0 = as much as the real clips)."""
    from tqdm import tqdm

    def run(files: list[Path], desc: str) -> tuple[list[tuple[Path, VideoScore]], list[dict[str, str]]]:
        done, failed = [], []
        for path in tqdm(files, desc=desc, unit="video", disable=not progress):
            try:
                done.append((path, score_file(path)))
            except ValueError as exc:  # VideoReadError included: names the file
                failed.append({"path": str(path), "error": str(exc)})
        return done, failed

    scored, errors = run(video_files(paths), "score")
    refs: dict[int, float] = {}
    ref_info = None
    if reference:
        ref_scored, ref_errors = run(video_files(reference), "references")
        errors += ref_errors
        refs = reference_motion([s for _, s in ref_scored])
        ref_info = {"clips": len(ref_scored), "motion_by_frames": {str(k): v for k, v in refs.items()}}
    videos = []
    for path, score in scored:
        score.motion_ratio, note = relative_motion(score, refs)
        if note:
            score.notes.append(note)
        videos.append({"path": str(path), **score.to_dict()})
    return ScoreRun(videos, errors, ref_info)


def failure_rates(scores: list[VideoScore]) -> dict[str, float]:
    """Share of the videos flagged frozen, looping and degrading."""
    n = max(1, len(scores))
    return {k: sum(bool(getattr(s, k)) for s in scores) / n for k in ("frozen", "looping", "degrading")}
