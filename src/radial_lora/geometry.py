"""Pixel geometry -> latent geometry: how many frames and tokens a video becomes inside the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentGeometry:
    """A video's size in pixels and in transformer tokens (frame-major: frame, row, column)."""

    num_frames: int
    height: int
    width: int
    latent_frames: int
    latent_height: int
    latent_width: int
    tokens_per_frame: int

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.tokens_per_frame


def latent_frames_for(num_frames: int, temporal_factor: int = 4) -> int:
    """Causal video VAEs keep the first frame and compress the rest: ``1 + (F - 1) / t``."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(
            f"num_frames={num_frames} is not of the form {temporal_factor}k+1 "
            f"(e.g. {temporal_factor * ((max(num_frames, 1) - 1) // temporal_factor) + 1}); "
            "the video VAE needs that frame count"
        )
    return 1 + (num_frames - 1) // temporal_factor


def latent_geometry(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int = 4,
    spatial_factor: int = 8,
    patch: tuple[int, int, int] = (1, 2, 2),
) -> LatentGeometry:
    """Latent frames and tokens per frame after the VAE and the transformer's patch embedding."""
    pt, ph, pw = patch
    for name, value, s in (("height", height, spatial_factor * ph), ("width", width, spatial_factor * pw)):
        if value <= 0 or value % s:
            raise ValueError(f"{name}={value} must be a positive multiple of {s} (VAE factor x patch size)")
    frames = latent_frames_for(num_frames, temporal_factor)
    if frames % pt:
        raise ValueError(f"{frames} latent frames are not divisible by the temporal patch size {pt}")
    lh, lw = height // spatial_factor, width // spatial_factor
    return LatentGeometry(
        num_frames=num_frames,
        height=height,
        width=width,
        latent_frames=frames // pt,
        latent_height=lh,
        latent_width=lw,
        tokens_per_frame=(lh // ph) * (lw // pw),
    )
