"""Sample videos during validation: the stock pipeline with the LoRA as it is being trained.

At a sampling step the trainer hands the pipeline it loaded (whose transformer *is* the model being
trained: LoRA and radial processors included) to :class:`ValidationSampler`, which renders every
prompt at every sample length through :func:`radial_lora.inference.generate.render_video` (the
function ``radial-lora generate`` uses) and writes ``OUTPUT/samples/step_XXXXXX/f<frames>_<i>_<slug>.mp4``
with a JSON sidecar. Training is not disturbed: the global RNG states (python, numpy, torch, CUDA) are
restored afterwards, the transformer goes back to train mode, the radial controller's dense-step
setting is put back, and the VAE and text encoders visit the training device only for the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radial_lora.train import checkpoint as ckpt

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
SAMPLE_FORMAT = "radial-lora-training-sample/1"


def sample_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / SAMPLES_DIR / ckpt.checkpoint_name(step)


def sample_stem(num_frames: int, index: int, prompt: str) -> str:
    """``f65_000_a-red-fox...``: length first, so a folder lists each length's prompts together."""
    from radial_lora.inference.generate import slug

    return f"f{num_frames}_{index:03d}_{slug(prompt)}"


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """First, middle and last frame side by side: uint8 ``[H, 3W, 3]`` (fewer frames: fewer panels)."""
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    return np.concatenate([frames[i] for i in picks], axis=1)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global generators (python, numpy, torch CPU and CUDA) as they were before the block."""
    state = ckpt.capture_rng_state()
    try:
        yield
    finally:
        ckpt.restore_rng_state(state)


@contextmanager
def components_on(pipe: Any, device: torch.device, keep: torch.nn.Module) -> Iterator[None]:
    """Every model of ``pipe`` except ``keep`` (the trained transformer, already there) on ``device``
    for the block, each put back where it was afterwards: VAE, text encoders, a second Wan2.2 expert."""
    moved: list[tuple[torch.nn.Module, torch.device]] = []
    try:
        for module in pipe.components.values():
            if not isinstance(module, torch.nn.Module) or module is keep:
                continue
            where = next(module.parameters(), torch.empty(0)).device
            if where != device:
                module.to(device)
                moved.append((module, where))
        yield
    finally:
        for module, where in moved:
            module.to(where)
        if moved and device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def inference_state(transformer: torch.nn.Module, controller: Any, dense_timesteps: int) -> Iterator[None]:
    """Eval mode (no LoRA dropout), no autograd, and the controller's ``dense_timesteps`` for a
    denoising loop; the training state comes back afterwards."""
    was_training, saved_dense = transformer.training, controller.dense_timesteps
    transformer.eval()
    controller.dense_timesteps = dense_timesteps
    try:
        with torch.no_grad():
            yield
    finally:
        controller.dense_timesteps = saved_dense
        controller.new_run()
        transformer.train(was_training)


@dataclass
class ValidationSampler:
    """Renders ``prompts`` x ``lengths`` at a training step; see the module docstring.

    ``write``: this process writes the files (the main one). ``collective``: every process must run
    the forward (FSDP-sharded transformer); processes that do not write then skip the VAE decode.
    """

    pipe: Any
    transformer: torch.nn.Module
    controller: Any
    output_dir: Path
    prompts: list[str]
    lengths: list[int]
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    dense_timesteps: int
    fps: float
    device: torch.device
    settings: dict[str, Any]  # recorded in each sidecar (model, family, attention, expert, ...)
    write: bool = True
    images: list[np.ndarray] | None = None  # image-to-video: prompt i starts from images[i % len(images)]

    def __post_init__(self) -> None:
        self.pipe.set_progress_bar_config(disable=True)  # the training bar is on screen

    def __call__(self, step: int, image_logger: Any = None) -> list[Path]:
        """Render every sample of ``step``; returns the mp4 paths written by this process."""
        from radial_lora.files import write_json_atomic
        from radial_lora.inference.generate import _versions, render_video

        folder = sample_dir(self.output_dir, step)
        if self.write:
            folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        start = time.perf_counter()
        with (
            preserved_rng(),
            inference_state(self.transformer, self.controller, self.dense_timesteps),
            components_on(self.pipe, self.device, self.transformer),
        ):
            for num_frames in self.lengths:
                for i, prompt in enumerate(self.prompts):
                    stem = sample_stem(num_frames, i, prompt)
                    video = folder / f"{stem}.mp4" if self.write else None
                    seed = self.seed + i
                    image = self.images[i % len(self.images)] if self.images else None
                    rendered = render_video(
                        self.pipe,
                        self.controller,
                        video,
                        prompt=prompt,
                        images=None if image is None else [image],
                        num_frames=num_frames,
                        height=self.height,
                        width=self.width,
                        steps=self.steps,
                        guidance=self.guidance,
                        seed=seed,
                        fps=self.fps,
                        device=self.device,
                        measure_memory=self.device.type != "cuda",  # a CUDA reset would break the run's peak
                    )
                    if video is None:
                        continue
                    settings = {
                        **self.settings,
                        "num_frames": num_frames,
                        "height": self.height,
                        "width": self.width,
                        "steps": self.steps,
                        "guidance": self.guidance,
                        "dense_timesteps": self.dense_timesteps,
                        "fps": self.fps,
                        "prompt": prompt,
                        "seed": seed,
                    }
                    info = {
                        "format": SAMPLE_FORMAT,
                        "step": step,
                        "prompt": prompt,
                        "index": i,
                        "num_frames": num_frames,
                        "seed": seed,
                        "video": video.name,
                        "settings": settings,
                        "wall_time_s": rendered.wall_time_s,
                        "peak_memory": rendered.peak_memory,
                        "attention": {"calls": rendered.calls},
                        "versions": _versions(),
                    }
                    write_json_atomic(video.with_suffix(".json"), info)
                    if image_logger is not None:
                        image_logger(f"samples/f{num_frames}_{i:03d}", frame_strip(rendered.frames), step)
                    written.append(video)
        if self.write:
            logger.info(
                "step %d: %d sample video(s) in %.1fs: %s",
                step,
                len(written),
                time.perf_counter() - start,
                ", ".join(str(p) for p in written),
            )
        return written
