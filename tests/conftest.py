"""Shared pytest fixtures. Each part of the project adds its fixtures here with small edits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test reaches the network: a hub id that is not a local folder fails at once (the family detection of
# `radial-lora generate` would otherwise wait on the hub's retries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def tiny_wan_dataset(tiny_wan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset (real `data prepare` path) for the tiny Wan model: 6 sample videos, 64x64,
    buckets of 9 and 17 frames (3 and 5 latent frames of 16 tokens), one clip per video and length."""
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("tiny_wan_dataset")
    write_sample_dataset(root / "videos", num_videos=6, num_frames=20, size=(64, 64), fps=16, seed=0)
    prepare_dataset(
        PrepareOptions(
            input=root / "videos",
            out=root / "dataset",
            model=str(tiny_wan_dir),
            family="wan",
            lengths=(9, 17),
            height=64,
            width=64,
            fps=16,
            dtype="float32",
        )
    )
    return root / "dataset"


@pytest.fixture(scope="session")
def tiny_wan_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA (rank 4, random non-zero B) for the tiny Wan model of `tiny_wan_dir` (seed 0), saved with
    `lora.save_lora`; its metadata says it was trained radial with decay 0.5, block size 4, no dense layers."""
    import torch

    from radial_lora import lora
    from radial_lora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan")
    lora.add_lora(pipe.transformer, rank=4)
    gen = torch.Generator().manual_seed(0)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data = 0.3 * torch.randn(param.shape, generator=gen)
    out = tmp_path_factory.mktemp("tiny_lora") / "lora"
    meta = {"family": "wan", "radial": {"pattern": "radial", "decay": 0.5, "block_size": 4, "dense_layers": 0}}
    lora.save_lora(out, pipe.transformer, meta)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on 2 shared cores, OpenMP spinning made the tiny models many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
