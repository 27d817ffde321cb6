"""Does a video show what a synthetic sample caption says? Colour, motion direction, speed and shape.

Why: a loss number alone does not say whether the videos got better. The tiny base's model card, the demo and
``radial-lora evaluate`` (for prompts that are sample captions) quote how often generated clips draw the
captioned shape moving the captioned way; this scorer is the measurement, checked against the rendered truth
at 17 and 65 frames in the tests. It knows
the layout of :mod:`radial_lora.data.sample` (the free range, the shape templates, the speed threshold).
Pure numpy: no model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from radial_lora.data.sample import _FAST_FROM, PALETTE, ClipSpec, spec_from_caption

FG_MIN = 30.0  # RGB distance (0-255) below which nothing counts as foreground
TRI_DY = 1.0 / 3.0  # a triangle's centroid sits r/3 below the centre of its bounding box (apex up)
AREA = {"circle": math.pi, "square": 1.7**2, "triangle": 2.0}  # shape area / r^2 (see ``render_clip``)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """``[H,W]`` bool: the ``render_clip`` shape of radius ``r`` whose centroid is at ``(cx, cy)``."""
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] + 0.5
    dx = xx - cx
    dy = yy - (cy - TRI_DY * r if shape == "triangle" else cy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)


def score_clip(video: np.ndarray, spec: ClipSpec, fps: float = 16.0) -> dict[str, Any]:
    """Score a ``uint8 [F,H,W,3]`` clip shown at ``fps`` against its caption's spec (only what the caption says).

    Foreground: pixels farther (RGB) from the frame's median colour (the background) than half the video's
    99.5th-percentile distance (and than ``FG_MIN``). Colour: the mean foreground colour's nearest palette
    colour. Motion: the foreground centroid per frame; the axis with the longer path, the sign of the first
    run of same-sign steps that covers 1.5 px (a bounce after it is fine); "static" under 2 px of range.
    Speed: mean |step| along that axis, quick above the step of the caption's threshold speed (``_FAST_FROM``
    free ranges per second, between the sampled 0.4 and 0.9).
    Shape: per frame a circle, square and triangle of the mask's area at its centroid; the summed IoU
    picks the shape.
    """
    v = video.astype(np.float32)
    f = v.shape[0]
    bg = np.median(v.reshape(f, -1, 3), axis=1)
    dist = np.linalg.norm(v - bg[:, None, None, :], axis=-1)
    thr = max(FG_MIN, 0.5 * float(np.percentile(dist, 99.5)))
    mask = dist > thr
    out: dict[str, Any] = {"colour": False, "direction": False, "speed": False, "shape": False}
    if mask.sum() == 0:
        out.update(colour_pred=None, direction_pred="none", shape_pred=None, shape_iou=0.0, colour_err=None)
        return out
    mean_rgb = v[mask].mean(axis=0)
    names = list(PALETTE)
    errs = [float(np.linalg.norm(mean_rgb - np.asarray(PALETTE[c], np.float32))) for c in names]
    out["colour_pred"] = names[int(np.argmin(errs))]
    out["colour"] = out["colour_pred"] == spec.colour
    out["colour_err"] = errs[names.index(spec.colour)]
    # centroids of frames with a visible shape
    cents, ious = [], {s: [] for s in AREA}
    for t in range(f):
        m = mask[t]
        area = int(m.sum())
        if area < 3:
            cents.append(None)
            continue
        ys, xs = np.nonzero(m)
        cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
        cents.append((cx, cy))
        for s, k in AREA.items():
            tmpl = shape_mask(s, cx, cy, math.sqrt(area / k), m.shape[0])
            ious[s].append(float((m & tmpl).sum() / max(1, (m | tmpl).sum())))
    valid = [c for c in cents if c is not None]
    if len(valid) >= f // 2:
        xy = np.asarray(valid)
        path = np.abs(np.diff(xy, axis=0)).sum(axis=0)
        axis = int(np.argmax(path))
        pos = xy[:, axis]
        pred = "static"
        if pos.max() - pos.min() >= 2.0:
            run_sign, run_len = 0.0, 0.0
            for d in np.diff(pos):
                sgn = float(np.sign(d)) if abs(d) > 0.1 else run_sign
                if sgn != run_sign:
                    run_sign, run_len = sgn, 0.0
                run_len += abs(d)
                if run_sign != 0 and run_len >= 1.5:
                    break
            names_ax = (("left", "right"), ("up", "down"))[axis]
            pred = names_ax[int(run_sign > 0)] if run_sign != 0 else "static"
        out["direction_pred"] = pred
        out["direction"] = pred == spec.direction
        px_per_frame = float(path[axis] / max(1, len(valid) - 1))
        out["speed_px"] = px_per_frame
        h, w = v.shape[1:3]  # the free range along the captioned axis, as ``render_clip`` lays it out
        free_px = (w if spec.direction in ("left", "right") else h) - 2 * spec.radius * min(h, w)
        fast_px = _FAST_FROM * free_px / fps
        out["speed"] = out["direction"] and ((px_per_frame > fast_px) == (spec.speed >= _FAST_FROM))
    else:
        out["direction_pred"] = "none"
    tot = {s: float(np.sum(v_)) for s, v_ in ious.items()}
    out["shape_pred"] = max(tot, key=tot.get) if valid else None
    out["shape"] = out["shape_pred"] == spec.shape
    out["shape_iou"] = float(np.mean(ious[spec.shape])) if ious[spec.shape] else 0.0
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Fractions right per measure (``all``: colour, direction and shape together), mean IoU and colour error."""
    n = len(rows)
    keys = ("colour", "direction", "speed", "shape")
    s = {k: sum(bool(r[k]) for r in rows) / n for k in keys}
    s["all"] = sum(all(r[k] for k in ("colour", "direction", "shape")) for r in rows) / n
    s["shape_iou"] = float(np.mean([r["shape_iou"] for r in rows]))
    errs = [r["colour_err"] for r in rows if r.get("colour_err") is not None]
    s["colour_err"] = float(np.mean(errs)) if errs else float("nan")
    return s


def score_prompts(videos: list[np.ndarray], prompts: list[str], fps: float = 16.0) -> dict[str, Any] | None:
    """The :func:`summarise` of each video scored against its prompt, plus ``n`` and the per-prompt rows;
    None when any prompt is not a sample caption (a real model's prompts: nothing to check them against)."""
    specs = [spec_from_caption(p) for p in prompts]
    if not specs or any(s is None for s in specs):
        return None
    rows = [score_clip(v, s, fps) for v, s in zip(videos, specs)]
    return {"n": len(rows), **summarise(rows), "per_prompt": rows}
