"""Datasets: video files and captions -> cached latents, plus the synthetic moving-shapes sample set.

Kept light on purpose: importing the package does not import diffusers; ``prepare`` does that.
"""

from radial_lora.data.video_io import VideoReadError, probe_video, read_video, write_video

__all__ = ["VideoReadError", "probe_video", "read_video", "write_video"]
