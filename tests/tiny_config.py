"""The training config the tests run: the shipped quick-test config on the random tiny Wan of conftest.

``conftest.tiny_wan_dataset`` is 64x64 with 9- and 17-frame buckets (base 9); the shipped config targets the
pre-trained tiny base at 32x32, 17 and 33 frames, so the tests set what differs."""

from __future__ import annotations

from pathlib import Path

from radial_lora.train.config import TrainConfig, load_config

QUICK = Path(__file__).parents[1] / "configs" / "lora_quick_test.json"
TINY_RANDOM = (
    "resolution.height=64",
    "resolution.width=64",
    "data.lengths=[9,17]",
    "data.base_length=9",
    "data.if_missing=error",
)

# Three steps with a checkpoint, validation and consistency loss at step 2: the multi-process runs compare
# these (and resume from that checkpoint) against one process.
THREE_STEPS_CHECKPOINTED = (
    "train.steps=3",
    "schedule.warmup_steps=0",
    "checkpoint.every=2",
    "validation.every=2",
    "validation.max_clips=2",
    "validation.timesteps=[500]",
    "logging.tensorboard=false",
    "train.consistency_weight=0.1",
)


def quick_config(model: Path, data: Path, out: Path, *extra: str) -> TrainConfig:
    """The quick-test config on ``model`` and the prepared ``data``, writing to ``out``; ``extra`` overrides last."""
    return load_config(QUICK, [f"model.id={model}", f"data.path={data}", f"output_dir={out}", *TINY_RANDOM, *extra])
