"""Checkpoints are data with checksums: every file is named when it is truncated or damaged, ``--resume latest``
takes the newest whole checkpoint (and continues bit for bit), a checkpoint of the older pickle format is read
with ``torch.load(weights_only=True)``, and no file of a checkpoint can run code (CPU, tiny Wan)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from radial_lora import lora
from radial_lora.cli import main
from radial_lora.files import sha256_file
from radial_lora.train import checkpoint as ckpt
from radial_lora.train import trainer
from tiny_config import quick_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMMON = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3", "validation.every=0")
COMMON += ("logging.tensorboard=false", "lora.dropout=0.1")
STATE_FILES = (*ckpt.FILES, ckpt.STATE_FILE)


@pytest.fixture(scope="module")
def run(one_torch_thread, tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6, and its losses."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = trainer.train(quick_config(tiny_wan_dir, tiny_wan_dataset, out, *COMMON))
    return out, result.losses


def _copy(run: tuple[Path, list[float]], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncated":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one byte changed in the middle, the size kept
        data[len(data) // 2] ^= 0x5A
        file.write_bytes(bytes(data))


def test_a_checkpoint_is_data_with_a_checksum_per_file(run) -> None:
    step = run[0] / "checkpoints" / "step_000006"
    assert sorted(p.name for p in step.iterdir()) == sorted(STATE_FILES)  # no pickles
    state = json.loads((step / ckpt.STATE_FILE).read_text())
    assert state["format"] == ckpt.CHECKPOINT_FORMAT and state["step"] == 6
    assert state["files"] == {name: sha256_file(step / name) for name in ckpt.FILES}
    rng = json.loads((step / ckpt.RNG_FILE).read_text())
    assert len(rng) == 1 and len(rng[0]["numpy"]["keys"]) == 624 and isinstance(rng[0]["torch"], str)
    loaded = ckpt.load_checkpoint(step)
    assert loaded["state"]["losses"] == run[1] and loaded["scheduler"]["last_epoch"] == 6
    assert all(type(v["exp_avg"]) is torch.Tensor for v in loaded["optimizer"]["state"].values())


@pytest.mark.parametrize("how", ["truncated", "changed"])
@pytest.mark.parametrize("name", STATE_FILES)
def test_each_damaged_file_is_named_and_latest_takes_the_newest_whole_one(run, tmp_path: Path, name, how) -> None:
    out = _copy(run, tmp_path)
    newest = out / "checkpoints" / "step_000006"
    _damage(newest / name, how)
    with pytest.raises(
        ckpt.CheckpointError, match=rf"checkpoint {newest}: {name.replace('.', '[.]')} .*(damaged|read)"
    ):
        ckpt.load_checkpoint(newest)
    state, skipped = ckpt.find_resume(out, "latest")
    assert state["path"].name == "step_000004" and state["state"]["step"] == 4
    assert len(skipped) == 1 and skipped[0].startswith(f"step_000006 ({name}")


def test_resume_latest_passes_over_a_damaged_checkpoint_and_continues_exactly(
    run, tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _copy(run, tmp_path)
    _damage(out / "checkpoints" / "step_000006" / ckpt.OPTIMIZER_FILE, "changed")
    damaged = (out / "checkpoints" / "step_000006" / ckpt.OPTIMIZER_FILE).read_bytes()
    caplog.set_level("WARNING", logger="radial_lora")
    resumed = trainer.train(quick_config(tiny_wan_dir, tiny_wan_dataset, out, *COMMON), resume="latest")
    (line,) = [r.getMessage() for r in caplog.records if "--resume latest" in r.getMessage()]
    assert "resuming from step_000004; skipped the newer step_000006 (optimizer.safetensors differs" in line
    assert resumed.losses == run[1]  # steps 5 and 6 again, bit for bit
    a, b = load_file(run[0] / lora.LORA_FILENAME), load_file(out / lora.LORA_FILENAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt.load_checkpoint(out / "checkpoints" / "step_000006")  # written anew, whole
    (kept,) = (out / "previous").glob("*/checkpoints/step_000006")  # the damaged one moved aside, not deleted
    assert (kept / ckpt.OPTIMIZER_FILE).read_bytes() == damaged


def test_resume_path_to_a_damaged_checkpoint_is_one_line(run, tmp_path: Path, capsys) -> None:
    out = _copy(run, tmp_path)
    newest = out / "checkpoints" / "step_000006"
    _damage(newest / ckpt.RNG_FILE, "truncated")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((out / "config.json").read_text()), "output_dir": str(out)}))
    assert main(["train", "--config", str(config), "--resume", str(newest)]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith(f"radial-lora train: error: checkpoint {newest}: rng.json differs from its sha256")
    assert "--resume latest takes the newest whole one" in error


def _legacy(step: Path) -> None:
    """Rewrite a checkpoint as radial-lora wrote it before format 2: pickles (torch.save), no checksums."""
    loaded = ckpt.load_checkpoint(step)
    torch.save(loaded["optimizer"], step / "optimizer.pt")
    torch.save(loaded["scheduler"], step / "scheduler.pt")
    old_rng = []
    for entry in loaded["rng"]:
        python, numpy, cpu, _ = ckpt._rng_objects(entry)
        old_rng.append({"python": python, "numpy": numpy, "torch": cpu.clone()})
    torch.save(old_rng, step / "rng.pt")
    state = {k: v for k, v in loaded["state"].items() if k in ("step", "sampler", "losses")}
    (step / ckpt.STATE_FILE).write_text(json.dumps(state))
    for name in (ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, ckpt.RNG_FILE):
        (step / name).unlink()


def test_a_checkpoint_of_the_older_pickle_format_resumes_exactly_as_data(
    run, tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    out = _copy(run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_000006")
    _legacy(out / "checkpoints" / "step_000004")
    assert isinstance(ckpt.load_checkpoint(out / "checkpoints" / "step_000004")["rng"][0]["torch"], str)
    resumed = trainer.train(quick_config(tiny_wan_dir, tiny_wan_dataset, out, *COMMON), resume="latest")
    assert resumed.losses == run[1]
    a, b = load_file(run[0] / lora.LORA_FILENAME), load_file(out / lora.LORA_FILENAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ckpt.LEGACY_FILES)
def test_a_truncated_file_of_an_older_checkpoint_is_named(run, tmp_path: Path, name: str) -> None:
    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_000004"
    _legacy(step)
    _damage(step / name, "truncated")
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{name.replace('.', '[.]')} cannot be read \(truncated or damaged"
    ):
        ckpt.load_checkpoint(step)


class _Payload:
    """Unpickling this runs a shell command: what a checkpoint from someone else could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ckpt.LEGACY_FILES)
def test_a_pickled_payload_in_an_older_checkpoint_does_not_run(run, tmp_path: Path, name: str) -> None:
    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_000004"
    _legacy(step)
    torch.save({"state": {}, "payload": _Payload(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert (tmp_path / "proof").exists()

    marker = tmp_path / "ran"
    torch.save({"state": {}, "payload": _Payload(marker)}, step / name)
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} .* holds a reference to \S*system, so it is not loaded"):
        ckpt.load_checkpoint(step)
    with pytest.raises(ValueError, match="no whole checkpoint"):  # step 6 was whole: make latest reach step 4
        shutil.rmtree(out / "checkpoints" / "step_000006")
        shutil.rmtree(out / "checkpoints" / "step_000002")
        ckpt.find_resume(out, "latest")
    assert not marker.exists()


@pytest.mark.parametrize("name", (ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, ckpt.RNG_FILE))
def test_a_pickle_with_matching_checksums_is_not_loaded_either(run, tmp_path: Path, name: str) -> None:
    """Someone rewrites a file as a pickle and state.json's checksums to match: it is read as data and fails."""
    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_000006"
    marker = tmp_path / "ran"
    torch.save({"payload": _Payload(marker)}, step / name)
    state = json.loads((step / ckpt.STATE_FILE).read_text())
    state.pop("state_sha256")
    state["files"][name] = sha256_file(step / name)
    (step / ckpt.STATE_FILE).write_text(json.dumps({**state, "state_sha256": ckpt._state_digest(state)}))
    with pytest.raises(ckpt.CheckpointError, match=rf"{name.replace('.', '[.]')} cannot be read"):
        ckpt.load_checkpoint(step)
    assert not marker.exists()


def test_rng_states_round_trip_through_json() -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # numpy keeps a cached gaussian
    state = json.loads(json.dumps(ckpt.capture_rng_state()))
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.standard_normal()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
