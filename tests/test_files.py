"""Finished files (``radial_lora.files.atomic_path``): readable by others as the umask allows, whatever the writer
created its temporary file with (safetensors' ``save_file`` makes 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from radial_lora import lora
from radial_lora.data import prepare
from radial_lora.files import write_text_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        latents = tmp_path / "clip.safetensors"
        prepare._save_clip(latents, {"latents": torch.zeros(2, 3)}, {"caption": "x"})
        weights = tmp_path / "lora.safetensors"
        lora._atomic_save({"w": torch.ones(2)}, weights, {"format": "test"})
        text = write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    for path in (latents, weights, text):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "clip.safetensors", "lora.safetensors"]
