"""Model integration: family adapters, radial attention processors, tiny test pipelines."""

from radial_lora.models.tiny import build_tiny_pipeline, caption_vocabulary, save_tiny_pipeline

__all__ = ["build_tiny_pipeline", "save_tiny_pipeline", "caption_vocabulary"]
