"""Validation sample videos: written at the sampling steps, readable, and invisible to training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radial_lora import lora
from radial_lora.data.video_io import read_video
from radial_lora.train import trainer
from radial_lora.train.components import LOG_FILE
from radial_lora.train.config import ConfigError, config_from_dict, load_config, sample_dense_timesteps
from radial_lora.train.samples import SAMPLE_FORMAT, frame_strip
from tiny_config import quick_config

PROMPT = "A red fox runs through fresh snow"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    base = (
        "train.steps=4",
        "validation.every=2",
        "validation.max_clips=1",
        "validation.timesteps=[500]",
        "checkpoint.every=2",
        "schedule.warmup_steps=1",
        "lora.dropout=0.1",
    )
    return quick_config(model, data, out, *base, *extra)


def test_samples_are_written_and_leave_training_bit_identical(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    sampling = (
        f"validation.sample_prompts={json.dumps([PROMPT])}",
        "validation.sample_steps=2",
        "validation.sample_dense_timesteps=1",
    )
    plain = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "plain"))
    out = tmp_path / "sampled"
    sampled = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *sampling))

    # Training did not notice: same losses, held-out loss and LoRA, bit for bit (LoRA dropout on).
    assert sampled.losses == plain.losses
    assert sampled.heldout == plain.heldout
    a, b = load_file(tmp_path / "plain" / lora.LORA_FILENAME), load_file(out / lora.LORA_FILENAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # One video per sampling step (every 2 steps; the last step is one), at the longest training length.
    steps = sorted(p.name for p in (out / "samples").iterdir())
    assert steps == ["step_000002", "step_000004"]
    for step in (2, 4):
        folder = out / "samples" / f"step_{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == [
            "f17_000_a-red-fox-runs-through-fresh-snow.json",
            "f17_000_a-red-fox-runs-through-fresh-snow.mp4",
        ]
        frames, fps = read_video(folder / "f17_000_a-red-fox-runs-through-fresh-snow.mp4")
        assert frames.shape == (17, 64, 64, 3) and fps == 16
        info = json.loads((folder / "f17_000_a-red-fox-runs-through-fresh-snow.json").read_text())
        assert info["format"] == SAMPLE_FORMAT and info["prompt"] == PROMPT
        assert (info["step"], info["num_frames"], info["seed"]) == (step, 17, 0)
        assert info["wall_time_s"] > 0
        s = info["settings"]
        assert (s["steps"], s["dense_timesteps"], s["pattern"], s["block_size"], s["dense_layers"]) == (
            2,
            1,
            "radial",
            16,
            1,
        )
        assert info["attention"]["calls"]["sparse"] > 0  # step 2 of 2 is radial, as trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()  # first, middle and last frame side by side, per sampling step
    strips = [(e.step, e.width, e.height) for e in events.Images("samples/f17_000")]
    assert strips == [(2, 192, 64), (4, 192, 64)]
    log = (out / LOG_FILE).read_text()
    assert "step 4: 1 sample video(s)" in log and "f17_000_a-red-fox" in log

    # Resuming the sampled run from its step-2 checkpoint still reproduces the curve.
    resumed = trainer.train(
        _cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "resumed", *sampling),
        resume=str(out / "checkpoints" / "step_000002"),
    )
    assert resumed.losses == plain.losses
    assert (tmp_path / "resumed" / "samples" / "step_000004").is_dir()
    assert not (tmp_path / "resumed" / "samples" / "step_000002").exists()


def test_frame_strip_is_first_middle_last() -> None:
    frames = torch.arange(5).view(5, 1, 1, 1).expand(5, 2, 3, 3).numpy().astype("uint8")
    strip = frame_strip(frames)
    assert strip.shape == (2, 9, 3) and strip[0, ::3, 0].tolist() == [0, 2, 4]


MINIMAL = {"model": {"id": "m"}, "data": {"path": "d", "lengths": [161], "base_length": 81}}


@pytest.mark.parametrize(
    ("validation", "key"),
    [
        ({"sample_prompts": ["a cat"], "sample_lengths": [64]}, r"validation.sample_lengths\[0\]: 64 frames"),
        ({"sample_prompts": ["a cat"], "sample_lengths": [81, 81]}, "validation.sample_lengths"),
        ({"sample_prompts": [""]}, r"validation.sample_prompts\[0\]"),
        ({"sample_prompts": "a cat"}, "validation.sample_prompts"),
        ({"sample_steps": 0}, "validation.sample_steps"),
        ({"sample_every": -1}, "validation.sample_every"),
        ({"sample_steps": 10, "sample_dense_timesteps": 11}, "validation.sample_dense_timesteps"),
        ({"sample_guidance": -1}, "validation.sample_guidance"),
    ],
)
def test_bad_sample_settings_name_the_key(validation: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config_from_dict({**MINIMAL, "validation": validation})


def test_sample_settings_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = config_from_dict(MINIMAL)
    assert cfg.validation.sample_prompts == [] and cfg.validation.sample_lengths == []  # off by default
    assert sample_dense_timesteps(cfg.validation) == 1  # 20 steps: round(0.04 x 20), the paper's 2 of 50
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL))
    cfg = load_config(
        path,
        [
            'validation.sample_prompts=["a cat", "a dog"]',
            "validation.sample_lengths=[81,161]",
            "validation.sample_steps=50",
            "validation.sample_dense_timesteps=null",
        ],
    )
    assert cfg.validation.sample_prompts == ["a cat", "a dog"] and cfg.validation.sample_lengths == [81, 161]
    assert sample_dense_timesteps(cfg.validation) == 2
