"""Shared pytest fixtures. Each part of the project adds its fixtures here with small edits."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight WanPipeline saved with save_pretrained (load with DiffusionPipeline.from_pretrained)."""
    from radial_lora.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("tiny") / "wan")


@pytest.fixture(scope="session")
def tiny_wan22_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.2 A14B-style WanPipeline (transformer + transformer_2, boundary_ratio) on disk."""
    from radial_lora.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("wan22", tmp_path_factory.mktemp("tiny") / "wan22")


@pytest.fixture(scope="session")
def tiny_hunyuan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight HunyuanVideoPipeline (Llama + CLIP text encoders, local tokenizers) on disk."""
    from radial_lora.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("hunyuan", tmp_path_factory.mktemp("tiny") / "hunyuan")
