"""Video quality metrics against a reference, with no downloads: PSNR, SSIM, temporal consistency, drift.

The Radial Attention paper (arXiv 2506.19852) reports PSNR and SSIM of a sparse-attention video against
the dense-attention video of the same model, prompt and seed; that is what :func:`summarize` computes.
Videos are ``[F, H, W, 3]`` (or ``[F, H, W]``) arrays or tensors, either ``uint8`` (0..255) or floating
point in ``[0, 1]``; both are compared on the ``[0, 1]`` scale.

JSON and infinity: identical videos have infinite PSNR; ``radial_lora.files.jsonable`` writes it as the
string ``"inf"`` so that ``results.json`` stays strict JSON, and ``files.from_jsonable`` reads it back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
# similarity", IEEE TIP 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


CHUNK_FRAMES = 8  # frames converted to float64 at a time: a 720p, 161-frame video never is at once


def _as_frames(video: Any, name: str) -> torch.Tensor:
    """Shape/dtype-checked ``[F, H, W, C]`` view of the input, still in its own dtype (no copy)."""
    t = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4 or t.shape[0] == 0:
        raise ValueError(
            f"{name} must be [frames, height, width, channels] or [frames, height, width]; got {tuple(t.shape)}"
        )
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating point, got {t.dtype}")
    return t


def _unit(t: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 or float frames -> float64 ``[f, C, H, W]`` in [0, 1] (float input checked for range and NaN)."""
    if t.dtype == torch.uint8:
        t = t.double() / 255.0
    else:
        t = t.double()
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name} is float with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] (or pass uint8)")
        t = t.clamp(0.0, 1.0)
    return t.permute(0, 3, 1, 2).contiguous()


def to_unit_video(video: Any, name: str = "video") -> torch.Tensor:
    """``[F, H, W, C]`` / ``[F, H, W]`` uint8 or float in [0, 1] -> float64 ``[F, C, H, W]`` in [0, 1]."""
    return _unit(_as_frames(video, name), name)


def _pair_chunks(video: Any, reference: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching float64 ``[f, C, H, W]`` chunks of video and reference, ``CHUNK_FRAMES`` frames each."""
    a, b = _as_frames(video, "video"), _as_frames(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(
            f"video and reference differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} ([F, H, W, C]); "
            "compare videos of the same length and resolution"
        )
    for s in range(0, a.shape[0], CHUNK_FRAMES):
        yield _unit(a[s : s + CHUNK_FRAMES], "video"), _unit(b[s : s + CHUNK_FRAMES], "reference")


def frame_mse(video: Any, reference: Any) -> list[float]:
    """Mean squared error of each frame on the [0, 1] scale."""
    return [float(m) for a, b in _pair_chunks(video, reference) for m in ((a - b) ** 2).mean(dim=(1, 2, 3))]


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse <= 0.0 else 10.0 * math.log10(1.0 / mse)


def psnr(video: Any, reference: Any) -> float:
    """PSNR in dB over the whole video (one MSE over every pixel): ``10 log10(1 / MSE)``; ``inf`` if identical."""
    mse = frame_mse(video, reference)
    return _psnr_from_mse(sum(mse) / len(mse))


def psnr_per_frame(video: Any, reference: Any) -> list[float]:
    """PSNR of each frame (``inf`` for identical frames)."""
    return [_psnr_from_mse(m) for m in frame_mse(video, reference)]


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _window_for(height: int, width: int) -> tuple[int, float]:
    """The standard 11x11 window, shrunk (odd size, sigma scaled alike) for frames smaller than 11 pixels."""
    size = min(SSIM_WINDOW, height, width)
    if size % 2 == 0:
        size -= 1
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def _ssim_frames(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Mean SSIM map value of each frame of two float64 ``[f, C, H, W]`` chunks."""
    _, channels, height, width = a.shape
    size, sigma = _window_for(height, width)
    win = _gaussian_window(size, sigma)[None, None].expand(channels, 1, size, size).contiguous()
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return [float(v) for v in (num / den).mean(dim=(1, 2, 3))]


def ssim_per_frame(video: Any, reference: Any) -> list[float]:
    """Mean SSIM of each frame (Gaussian window, 'valid' positions, averaged over channels); 1.0 if identical."""
    return [v for a, b in _pair_chunks(video, reference) for v in _ssim_frames(a, b)]


def ssim(video: Any, reference: Any) -> float:
    """Mean SSIM over frames (Wang et al. 2004 with the standard constants)."""
    values = ssim_per_frame(video, reference)
    return float(sum(values) / len(values))


def temporal_consistency(video: Any) -> float:
    """Mean similarity of consecutive frames, ``1 - mean |frame[t+1] - frame[t]|`` on [0, 1]: 1.0 = static.

    Flicker and temporal collapse in long videos show up as a lower value than the dense video's;
    a frozen video scores 1.0, so read it next to the reference's value, not alone. 1.0 for one frame.
    """
    raw = _as_frames(video, "video")
    frames = raw.shape[0]
    if frames < 2:
        return 1.0
    total = 0.0
    for s in range(0, frames - 1, CHUNK_FRAMES):
        x = _unit(raw[s : s + CHUNK_FRAMES + 1], "video")  # one frame of overlap with the next chunk
        total += float((x[1:] - x[:-1]).abs().sum())
    return float(1.0 - total / ((frames - 1) * raw[0].numel()))


def segment_bounds(num_frames: int, segments: int) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges splitting a video into ``segments`` nearly equal parts along time."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    segments = min(segments, num_frames)
    edges = [round(i * num_frames / segments) for i in range(segments + 1)]
    return [(edges[i], edges[i + 1]) for i in range(segments)]


def drift(video: Any, reference: Any, segments: int = 4) -> dict[str, Any]:
    """Quality along time: PSNR and SSIM vs the reference per segment (quarters by default).

    Attention errors in a long video tend to grow with distance from the start; ``psnr_drop`` (first
    segment minus last, dB) and ``ssim_drop`` summarise how much quality decays towards the end.
    """
    return _drift_from(frame_mse(video, reference), ssim_per_frame(video, reference), segments)


def _drift_from(mse: list[float], ssims: list[float], segments: int) -> dict[str, Any]:
    bounds = segment_bounds(len(mse), segments)
    seg_psnr = [_psnr_from_mse(float(np.mean(mse[s:e]))) for s, e in bounds]
    seg_ssim = [float(np.mean(ssims[s:e])) for s, e in bounds]
    return {
        "segments": [[s, e] for s, e in bounds],
        "psnr": seg_psnr,
        "ssim": seg_ssim,
        "psnr_drop": _difference(seg_psnr[0], seg_psnr[-1]),
        "ssim_drop": seg_ssim[0] - seg_ssim[-1],
    }


def _difference(first: float, last: float) -> float:
    """``first - last`` with infinities: inf - inf (identical throughout) is 0, not NaN."""
    if math.isinf(first) and math.isinf(last):
        return 0.0
    return first - last


def summarize(video: Any, reference: Any | None = None, segments: int = 4) -> dict[str, Any]:
    """All metrics of one video: temporal consistency alone, plus PSNR/SSIM/drift when a reference is given."""
    out: dict[str, Any] = {
        "frames": int(_as_frames(video, "video").shape[0]),
        "temporal_consistency": temporal_consistency(video),
    }
    if reference is not None:
        mse, ssims = frame_mse(video, reference), ssim_per_frame(video, reference)
        out["psnr"] = _psnr_from_mse(sum(mse) / len(mse))
        out["ssim"] = float(sum(ssims) / len(ssims))
        out["drift"] = _drift_from(mse, ssims, segments)
        out["reference_temporal_consistency"] = temporal_consistency(reference)
    return out


def mean_finite(values: Sequence[float]) -> float:
    """Mean that keeps infinities meaningful: all inf -> inf; otherwise the mean of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf if values and all(v == math.inf for v in values) else math.nan
    return float(sum(finite) / len(finite))
