"""Datasets: video files and captions -> cached latents, plus the synthetic moving-shapes sample set.

Kept light on purpose: importing the package does not import diffusers; ``prepare`` does that.
"""

from radial_lora.data.sample import CAPTION_VOCABULARY, ClipSpec, caption_for, render_clip, sample_specs
from radial_lora.data.video_io import VideoReadError, probe_video, read_video, write_video

__all__ = [
    "CAPTION_VOCABULARY",
    "ClipSpec",
    "VideoReadError",
    "caption_for",
    "probe_video",
    "read_video",
    "render_clip",
    "sample_specs",
    "write_video",
]
