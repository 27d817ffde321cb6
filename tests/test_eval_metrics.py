"""Metric unit tests: PSNR of a known MSE, SSIM against a hand computation and its properties, drift, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radial_lora import files
from radial_lora.eval import metrics


def _video(seed: int = 0, frames: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_psnr_known_mse_and_identical() -> None:
    a = np.zeros((2, 8, 8, 3))
    b = np.full_like(a, 0.1)  # MSE = 0.01 -> 20 dB
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    v = _video()
    assert metrics.psnr(v, v) == math.inf
    assert metrics.psnr_per_frame(v, v) == [math.inf] * 4
    # uint8 and float inputs agree: same pixels on the [0, 1] scale
    assert metrics.psnr(v, 255 - v) == pytest.approx(metrics.psnr(v / 255.0, (255 - v) / 255.0))


def test_ssim_constant_images_hand_computed() -> None:
    # Constant frames: mu = c, sigma = 0, so SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1) exactly.
    c1, c2 = 0.2, 0.7
    a = np.full((1, 16, 16, 3), c1)
    b = np.full((1, 16, 16, 3), c2)
    k1 = (0.01) ** 2
    expected = (2 * c1 * c2 + k1) / (c1**2 + c2**2 + k1)
    assert metrics.ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_brute_force_window() -> None:
    # One 11x11 window on an 11x11 gray image: SSIM is the single weighted statistic, computed by hand.
    rng = np.random.default_rng(1)
    x = rng.random((11, 11))
    y = np.clip(x + 0.1 * rng.standard_normal((11, 11)), 0, 1)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(x[None], y[None]) == pytest.approx(expected, rel=1e-9)


def test_ssim_properties() -> None:
    a, b = _video(0), _video(1)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)  # symmetric
    assert metrics.ssim(a, b) < 0.2  # independent noise is dissimilar
    noisy = np.clip(a.astype(int) + np.random.default_rng(2).integers(-10, 11, a.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(a, b) < metrics.ssim(a, noisy) < 1.0  # less noise, more similar
    # tiny frames (smaller than the 11-pixel window) still work
    assert metrics.ssim(a[:, :5, :5], a[:, :5, :5]) == pytest.approx(1.0)


def test_temporal_consistency() -> None:
    static = np.repeat(_video(frames=1), 5, axis=0)
    assert metrics.temporal_consistency(static) == 1.0
    flicker = np.stack([np.zeros((8, 8, 3)), np.ones((8, 8, 3))] * 2)
    assert metrics.temporal_consistency(flicker) == 0.0
    half = np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.5)])
    assert metrics.temporal_consistency(half) == pytest.approx(0.5)


def test_drift_per_quarter() -> None:
    ref = np.zeros((8, 8, 8, 3))
    video = ref.copy()
    video[6:] = 0.1  # the last quarter is off by 0.1 -> 20 dB there, identical elsewhere
    d = metrics.drift(video, ref, segments=4)
    assert d["segments"] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert d["psnr"][:3] == [math.inf] * 3
    assert d["psnr"][3] == pytest.approx(20.0)
    assert d["psnr_drop"] == math.inf
    assert d["ssim"][0] == pytest.approx(1.0) and d["ssim"][3] < 1.0
    same = metrics.drift(ref, ref)
    assert same["psnr_drop"] == 0.0 and same["ssim_drop"] == pytest.approx(0.0)


def test_summary_and_json_roundtrip() -> None:
    v = _video()
    s = metrics.summarize(v, v)
    text = json.dumps(files.jsonable(s), allow_nan=False)  # strict JSON: inf written as "inf"
    back = files.from_jsonable(json.loads(text))
    assert back["psnr"] == math.inf and back["ssim"] == pytest.approx(1.0)
    assert files.jsonable({"x": float("nan"), "y": -math.inf, "t": torch.tensor(2.5)}) == {
        "x": None,
        "y": "-inf",
        "t": 2.5,
    }


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(_video(frames=3), _video(frames=4))
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        metrics.ssim(np.full((1, 8, 8, 3), 2.0), np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="frames, height, width"):
        metrics.temporal_consistency(np.zeros((8, 8)))


def test_chunking_does_not_change_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _video(3, frames=11, size=12), _video(4, frames=11, size=12)
    whole = metrics.summarize(a, b)
    monkeypatch.setattr(metrics, "CHUNK_FRAMES", 3)  # chunks of 3 frames, the last one partial
    chunked = metrics.summarize(a, b)
    assert chunked["psnr"] == pytest.approx(whole["psnr"], rel=1e-12)
    assert chunked["ssim"] == pytest.approx(whole["ssim"], rel=1e-12)
    assert chunked["temporal_consistency"] == pytest.approx(whole["temporal_consistency"], rel=1e-12)
    assert chunked["drift"]["psnr"] == pytest.approx(whole["drift"]["psnr"], rel=1e-12)
    # and the temporal consistency is the definition computed in one go
    v = a.astype(np.float64) / 255
    assert whole["temporal_consistency"] == pytest.approx(1 - np.abs(np.diff(v, axis=0)).mean(), rel=1e-12)
