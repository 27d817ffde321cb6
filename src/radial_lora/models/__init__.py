"""Model integration: family adapters, radial attention processors, tiny test pipelines."""

from radial_lora.models.adapter import ModelAdapter
from radial_lora.models.radial import (
    RadialController,
    apply_radial_attention,
    radial_controller,
    remove_radial_attention,
)
from radial_lora.models.registry import detect_family, families, get_adapter
from radial_lora.models.tiny import build_tiny_pipeline, caption_vocabulary, save_tiny_pipeline

__all__ = [
    "ModelAdapter",
    "get_adapter",
    "detect_family",
    "families",
    "RadialController",
    "apply_radial_attention",
    "remove_radial_attention",
    "radial_controller",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "caption_vocabulary",
]
