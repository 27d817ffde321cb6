"""Benchmark: radial block mask construction time for the paper's configurations.

Each timing starts from a cold per-pair pattern cache (``_pair_blocks.cache_clear()``), so it is
what the first denoising step or training batch of a new geometry pays. Writes the "Mask
construction" section of ``benchmarks/RESULTS.md``.

    python benchmarks/mask.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling module with the RESULTS.md helpers

from attention import RESULTS, machine_info, update_section  # noqa: E402
from radial_lora import mask as mask_mod  # noqa: E402
from radial_lora.geometry import latent_geometry  # noqa: E402

logger = logging.getLogger("bench.mask")

# (label, model type, frames, height, width, decay, text tokens): decays from the authors' scripts;
# HunyuanVideo's joint attention appends its 256 text tokens.
CONFIGS = [
    ("Wan2.1 720p 81 frames (1x)", "wan", 81, 720, 1280, 0.2, 0),
    ("Wan2.1 720p 161 frames (2x)", "wan", 161, 720, 1280, 0.2, 0),
    ("Wan2.1 720p 321 frames (4x)", "wan", 321, 720, 1280, 0.2, 0),
    ("Wan2.2 A14B 720p 161 frames (2x)", "wan", 161, 720, 1280, 0.8, 0),
    ("HunyuanVideo 720p 509 frames (4x)", "hunyuan", 509, 720, 1280, 0.95, 256),
]


def time_config(model: str, frames: int, height: int, width: int, decay: float, text: int, repeats: int):
    """Best cold-cache construction time in seconds, and the mask."""
    geo = latent_geometry(frames, height, width)
    best, mask = float("inf"), None
    for _ in range(repeats):
        mask_mod._pair_blocks.cache_clear()
        t0 = time.perf_counter()
        mask = mask_mod.radial_block_mask(
            geo.latent_frames, geo.tokens_per_frame, decay_factor=decay, model_type=model, num_text_tokens=text
        )
        best = min(best, time.perf_counter() - t0)
    return best, mask, geo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first two configurations, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    configs = CONFIGS[:2] if args.quick else CONFIGS
    repeats = 1 if args.quick else args.repeats
    rows = []
    for label, model, frames, height, width, decay, text in configs:
        seconds, mask, geo = time_config(model, frames, height, width, decay, text, repeats)
        seq = geo.video_tokens + text
        density = mask_mod.mask_density(mask, seq)
        logger.info("%s: %s in %.1f ms, density %.3f", label, tuple(mask.shape), seconds * 1e3, density)
        rows.append(
            f"| {label} | {model} | {decay} | {geo.latent_frames} x {geo.tokens_per_frame} + {text} = {seq} | "
            f"{mask.shape[0]} x {mask.shape[1]} | {density:.3f} | {1 - density:.3f} | {seconds * 1e3:.1f} |"
        )
    body = (
        f"`radial_block_mask`, block 128, cold pattern cache, best of {repeats}.\n"
        f"Machine: {machine_info('cpu')}.\n\n"
        "| configuration | model | decay | latent frames x tokens + text = seq | blocks | density | sparsity | "
        "time ms |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        update_section(args.results, "mask", "## Mask construction", body)
        logger.info("wrote the mask section of %s", args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
