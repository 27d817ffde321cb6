"""Evaluation: quality metrics vs a dense reference, the length x variant grid, the report and its plots."""

from radial_lora.eval.evaluate import GridOptions, Variant, make_variants, parse_lengths, run_grid
from radial_lora.eval.metrics import drift, psnr, ssim, summarize, temporal_consistency

__all__ = [
    "psnr",
    "ssim",
    "temporal_consistency",
    "drift",
    "summarize",
    "GridOptions",
    "Variant",
    "make_variants",
    "parse_lengths",
    "run_grid",
]
