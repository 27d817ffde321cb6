"""Finished files (``radial_lora.files.atomic_path``): readable by others as the umask allows, whatever the writer
created its temporary file with (safetensors' ``save_file`` makes 0600); an earlier run is never replaced unasked
(``set_aside``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from radial_lora import lora
from radial_lora.data import prepare
from radial_lora.files import set_aside, write_text_atomic


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


def test_set_aside_refuses_or_moves_never_deletes(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000001" / "state.json").write_text("{}")
    (tmp_path / "final.bin").write_bytes(b"weights")
    (tmp_path / "mine.txt").write_text("not a run's file")
    names = ["checkpoints", "final.bin", "losses.json"]  # losses.json is not there: skipped
    assert set_aside(tmp_path, ["absent"], overwrite=False, holds="x", ways="y") is None
    with pytest.raises(ValueError) as err:
        set_aside(tmp_path, names, overwrite=False, holds="a run", ways="resume it")
    assert str(err.value) == (
        f"{tmp_path} already holds a run; resume it, or pass --overwrite to move it into {tmp_path}/previous/<time>/ "
        "(nothing is deleted)"
    )
    assert (tmp_path / "final.bin").read_bytes() == b"weights"
    first = set_aside(tmp_path, names, overwrite=True, holds="a run", ways="resume it")
    assert first.parent == tmp_path / "previous" and sorted(p.name for p in first.iterdir()) == names[:2]
    assert (first / "checkpoints" / "step_000001" / "state.json").read_text() == "{}"
    assert (first / "final.bin").read_bytes() == b"weights" and (tmp_path / "mine.txt").is_file()
    (tmp_path / "final.bin").write_bytes(b"again")
    second = set_aside(tmp_path, names, overwrite=True, holds="a run", ways="resume it")  # the same second
    assert second != first and (second / "final.bin").read_bytes() == b"again"
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"video")
    nested = set_aside(tmp_path, ["videos/a.mp4"], overwrite=True, holds="v", ways="w")
    assert (nested / "videos" / "a.mp4").read_bytes() == b"video" and (tmp_path / "videos").is_dir()
