"""Made-up videos for `radial-lora score`: living clips (objects, camera pans, noise, slow drifts, flicker) and
each failure of long videos (frozen, looping, degrading), as ``uint8 [F, H, W, 3]`` at 16 fps.

Speeds are in pixels per frame of a 64-pixel frame, so motion in short sides per second is
``speed * 16 / 64``. Every case is a pure function of its arguments (seeded noise)."""

from __future__ import annotations

import cv2
import numpy as np

FPS = 16.0
FRAMES = 65
SIDE = 64


def texture(height: int, width: int, seed: int, blur: float = 3.0) -> np.ndarray:
    """A smooth random colour texture (float32, 40-210): a background with structure to follow."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.standard_normal((height, width, 3)).astype(np.float32), (0, 0), blur)
    return 40.0 + 170.0 * (t - t.min()) / (t.max() - t.min())


def _disc(frame: np.ndarray, x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
    h, w = frame.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    frame[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = colour


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def moving_object(speed: float = 1.0, frames: int = FRAMES, side: int = SIDE, seed: int = 0) -> np.ndarray:
    """A red disc crossing a textured background at ``speed`` px/frame, bouncing off the side walls."""
    base = texture(side, side, seed)
    r = 0.12 * side
    span = side - 2 * r - 4
    out = []
    for t in range(frames):
        u = (speed * t) % (2 * span)
        frame = base.copy()
        _disc(
            frame, r + 2 + (u if u <= span else 2 * span - u), side / 2 + 0.1 * side * np.sin(t / 9.0), r, (230, 50, 40)
        )
        out.append(frame)
    return _u8(np.stack(out))


def pan(speed: float = 1.5, frames: int = FRAMES, side: int = SIDE, seed: int = 1) -> np.ndarray:
    """A camera panning right over a texture wider than the frame, ``speed`` px/frame (new content all along)."""
    big = texture(side, side + int(speed * frames) + 8, seed)
    shift = [np.float32([[1, 0, -speed * t], [0, 1, 0]]) for t in range(frames)]
    return _u8(np.stack([cv2.warpAffine(big, m, (side, side), flags=cv2.INTER_LINEAR) for m in shift]))


def still_with_noise(sigma: float = 8.0, frames: int = FRAMES, side: int = SIDE, seed: int = 2) -> np.ndarray:
    """One picture and fresh sensor noise of ``sigma`` grey levels on every frame: nothing moves."""
    base, rng = texture(side, side, seed), np.random.default_rng(seed)
    return _u8(np.stack([base + rng.normal(0.0, sigma, base.shape) for _ in range(frames)]))


def add_noise(video: np.ndarray, sigma: float, seed: int = 3) -> np.ndarray:
    return _u8(video.astype(np.float32) + np.random.default_rng(seed).normal(0.0, sigma, video.shape))


def flicker(video: np.ndarray, amount: float = 0.15, seed: int = 4) -> np.ndarray:
    """Brightness that jumps by up to ``amount`` from frame to frame (a global change: no motion)."""
    gain = 1.0 + amount * np.random.default_rng(seed).uniform(-1.0, 1.0, len(video))
    return _u8(video.astype(np.float32) * gain[:, None, None, None])


def freeze_from(video: np.ndarray, share: float) -> np.ndarray:
    """The motion stops ``share`` of the way in: the rest of the clip holds that frame."""
    k = int(len(video) * share)
    out = video.copy()
    out[k:] = out[k]
    return out


def repeat(video: np.ndarray, period: int) -> np.ndarray:
    """The first ``period`` frames played again and again (a stretch of the clip comes back)."""
    return video[[t % period for t in range(len(video))]]


def back_and_forth(video: np.ndarray, period: int) -> np.ndarray:
    """Forward for ``period`` frames, then backwards, and so on (ping-pong)."""
    cycle = 2 * period - 2
    return video[[u if u < period else cycle - u for u in (t % cycle for t in range(len(video)))]]


def fade(video: np.ndarray, to: float = 0.2) -> np.ndarray:
    """Contrast falls steadily to ``to`` of the original (towards each frame's mean)."""
    v = video.astype(np.float32)
    mean = v.mean(axis=(1, 2, 3), keepdims=True)
    return _u8(mean + (v - mean) * np.linspace(1.0, to, len(video))[:, None, None, None])


def blur_over_time(video: np.ndarray, to: float = 3.0) -> np.ndarray:
    """A Gaussian blur that grows to ``to`` pixels by the last frame."""
    n = len(video)
    return np.stack([cv2.GaussianBlur(f, (0, 0), 0.01 + to * t / n) for t, f in enumerate(video)])


def desaturate(video: np.ndarray, to: float = 0.1) -> np.ndarray:
    """Colour drains steadily to ``to`` of its saturation (towards grey)."""
    v = video.astype(np.float32)
    grey = v.mean(axis=-1, keepdims=True)
    return _u8(grey + (v - grey) * np.linspace(1.0, to, len(video))[:, None, None, None])


def bounce_once_among_movers(frames: int = FRAMES, side: int = SIDE, seed: int = 5) -> np.ndarray:
    """A ball that goes right, bounces once in the middle and comes back, while two other discs keep moving
    one way: the ball retraces its path, the picture does not."""
    base, out = texture(side, side, seed), []
    for t in range(frames):
        frame = base.copy()
        _disc(frame, 12 + (side - 24) * (1 - abs(t - frames // 2) / (frames // 2)), 20, 7, (240, 240, 60))
        _disc(frame, 6 + 0.8 * t, 46, 6, (40, 90, 230))
        _disc(frame, side - 6 - 0.5 * t, 34, 5, (40, 200, 60))
        out.append(frame)
    return _u8(np.stack(out))
