"""The evaluation's pictures: metrics vs length per variant, a labelled frame strip per cell, the masks."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from radial_lora.files import atomic_path

logger = logging.getLogger(__name__)

STRIP_FRAMES = 6
STRIP_MIN_HEIGHT = 128
_LABEL_HEIGHT = 14

# (cell key path, axis label); PSNR points that are inf (identical to the reference) are left out.
_PANELS = [
    (("motion", "motion_ratio"), "motion vs the real clips (1 = as much)"),
    (("motion", "failure_rates", "frozen"), "share of videos frozen"),
    (("motion", "failure_rates", "looping"), "share of videos looping"),
    (("quality", "psnr"), "PSNR vs dense (dB; identical not drawn)"),
    (("quality", "ssim"), "SSIM vs dense"),
    (("quality", "temporal_consistency"), "temporal consistency"),
    (("attention", "effective_density"), "attention FLOPs / dense"),
    (("wall_time_s",), "wall time per video (s)"),
    (("peak_memory_bytes",), "peak memory (GiB)"),
    (("heldout_loss",), "held-out flow-matching loss"),
    (("sample_score", "all"), "samples showing their caption"),
]


def _get(cell: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = cell
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) / 2**30 if path == ("peak_memory_bytes",) else float(value)


def plot_metrics_vs_length(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric, one line per variant, frames on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, label) for p, label in _PANELS if any(_get(c, p) is not None for c in results["cells"])]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [v["name"] for v in results["variants"]]
    for ax, (key, label) in zip(axes.flat, panels):
        for n, name in enumerate(names):
            pts = [(c["length"], _get(c, key)) for c in results["cells"] if c["variant"] == name]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:  # one colour per variant in every panel, even where some variants have no point
                ax.plot(*zip(*pts), marker="o", color=colors[n % len(colors)], label=name)
        ax.set_xlabel("frames")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(results["lengths"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], color=colors[n % len(colors)], marker="o", label=name) for n, name in enumerate(names)
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_motion_over_time(results: dict[str, Any], path: Path) -> Path | None:
    """Motion per quarter of the longest videos, one line per variant and one for the real clips: does the
    motion keep up to the end, or die as the clip goes on?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(results["lengths"])
    lines = {c["variant"]: c["motion"]["motion_quarters"] for c in results["cells"] if c["length"] == longest}
    lines = {k: v for k, v in lines.items() if v}
    real = (results.get("real") or {}).get(str(longest))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if real:
        ax.plot(range(1, 5), real["motion_quarters"], color="black", linewidth=2.5, marker="s", label="real")
    for name, quarters in lines.items():
        ax.plot(range(1, 5), quarters, marker="o", label=name)
    ax.set_xticks(range(1, 5), ["Q1", "Q2", "Q3", "Q4"])
    ax.set_ylabel("motion (short sides / s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"motion over the {longest}-frame videos (median per quarter)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def frame_strip(frames: np.ndarray, title: str, count: int = STRIP_FRAMES) -> Image.Image:
    """``count`` evenly spaced frames side by side, each labelled with its index, under a title line."""
    total = frames.shape[0]
    picks = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
    h, w = frames.shape[1:3]
    scale = max(1, math.ceil(STRIP_MIN_HEIGHT / h))
    tiles = [Image.fromarray(frames[i]).resize((w * scale, h * scale), Image.NEAREST) for i in picks]
    tw, th = tiles[0].size
    gap = 4
    canvas = Image.new("RGB", (len(tiles) * (tw + gap) - gap, th + 2 * _LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    for n, (i, tile) in enumerate(zip(picks, tiles)):
        x = n * (tw + gap)
        canvas.paste(tile, (x, _LABEL_HEIGHT))
        draw.text((x + 2, _LABEL_HEIGHT + th + 1), f"frame {i}", fill="black")
    return canvas


def plot_masks(results: dict[str, Any], family: str, path: Path) -> Path | None:
    """The radial block mask at every length (black = computed block), as the radial cells used it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radial_lora.mask import radial_block_mask
    from radial_lora.models import get_adapter

    adapter = get_adapter(family)
    shown: dict[int, dict[str, Any]] = {}
    for cell in results["cells"]:
        if cell["pattern"] == "radial" and cell["length"] not in shown:
            shown[cell["length"]] = cell
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.8), squeeze=False)
    for ax, (length, cell) in zip(axes.flat, sorted(shown.items())):
        a = cell["attention"]
        mask = radial_block_mask(
            a["latent_frames"],
            a["tokens_per_frame"],
            block_size=cell["settings"]["block_size"],
            decay_factor=a["decay_factor"],
            model_type=adapter.mask_model_type,
        )
        ax.imshow(mask.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{length} frames: density {a['mask_density']:.2f}", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_strip(out_dir: Path, cell: dict[str, Any], frames: np.ndarray) -> str:
    """The labelled frame strip of one cell (its first prompt); returns the path relative to ``out_dir``."""
    psnr = cell["quality"].get("psnr")
    title = f"{cell['variant']}  {cell['length']} frames  prompt 0"
    if psnr is not None:
        title += f"  PSNR {psnr:.1f} dB" if math.isfinite(psnr) else "  (same as reference)"
    rel = f"strips/{cell['variant']}_f{cell['length']:04d}.png"
    path = Path(out_dir) / rel
    with atomic_path(path, suffix=".png") as tmp:
        frame_strip(frames, title).save(tmp)
    return rel


def write_plots(out_dir: Path, results: dict[str, Any], family: str | None = None) -> dict[str, Any]:
    """Metric and mask pictures; returns their paths relative to ``out_dir`` plus the cells' strips by cell."""
    out_dir = Path(out_dir)
    plots: dict[str, Any] = {"strips": {}}
    metrics_png = plot_metrics_vs_length(results, out_dir / "metrics_vs_length.png")
    if metrics_png is not None:
        plots["metrics"] = metrics_png.name
    motion_png = plot_motion_over_time(results, out_dir / "motion_over_time.png")
    if motion_png is not None:
        plots["motion"] = motion_png.name
    mask_png = plot_masks(results, family or results["family"], out_dir / "radial_masks.png")
    if mask_png is not None:
        plots["masks"] = mask_png.name
    for cell in results["cells"]:
        if cell.get("strip"):
            plots["strips"][f"{cell['variant']}@{cell['length']}"] = cell["strip"]
    logger.info("plots written to %s", out_dir)
    return plots
