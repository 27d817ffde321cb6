"""Rectified-flow training objective of Wan and HunyuanVideo: noising, timestep sampling, loss, held-out loss.

Both families are trained as flow matching (Esser et al. 2024, "Scaling Rectified Flow Transformers"):
``x_t = (1 - s) x0 + s noise`` and the transformer predicts the velocity ``noise - x0``. The
transformer's timestep input is ``s * 1000``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it
(``timesteps = sigmas * num_train_timesteps``). Sampling noise levels with the model's flow shift
``s' = shift s / (1 + (shift - 1) s)`` puts the training distribution where inference spends its steps.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from radial_lora.constants import TIMESTEP_SCHEMES

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
# Fixed evaluation noise levels (scheduler units): spread over the whole trajectory.
DEFAULT_HELDOUT_TIMESTEPS: tuple[int, ...] = (100, 300, 500, 700, 900)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow shift ``shift*s / (1 + (shift-1)*s)`` (identity for shift 1); keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigmas`: ``s' / (shift - (shift-1) s')``."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return sigmas / (shift - (shift - 1.0) * sigmas)


def sample_sigmas(
    batch_size: int,
    *,
    scheme: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``[batch_size]`` float32 noise levels in (0, 1) on CPU (move them yourself): same generator, same draws.

    "uniform": s ~ U(0, 1); "logit_normal": s = sigmoid(N(mean, std)) (SD3's choice). Then the flow shift.
    ``sigma_range=(lo, hi)``: the same distribution conditioned on ``lo <= s < hi`` (a Wan2.2 expert only
    sees its share of the trajectory), drawn by inverse CDF so every sample costs exactly one draw.
    """
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; expected one of {TIMESTEP_SCHEMES}")
    if sigma_range is not None:
        return _sample_sigmas_in_range(batch_size, scheme, shift, logit_mean, logit_std, generator, sigma_range)
    if scheme == "uniform":
        s = torch.rand(batch_size, generator=generator)
    else:
        s = torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    # Keep away from the exact end points: s = 0 gives a zero-information target for nothing.
    return shift_sigmas(s, shift).clamp(1e-5, 1.0 - 1e-5)


def _sample_sigmas_in_range(
    batch_size: int,
    scheme: str,
    shift: float,
    logit_mean: float,
    logit_std: float,
    generator: torch.Generator | None,
    sigma_range: tuple[float, float],
) -> torch.Tensor:
    """Truncated sampling: map the range back through the shift (and the logit-normal CDF), draw inside it."""
    lo, hi = (max(1e-5, float(sigma_range[0])), min(1.0 - 1e-5, float(sigma_range[1])))
    if not lo < hi:
        raise ValueError(f"empty noise-level range [{sigma_range[0]}, {sigma_range[1]})")
    bounds = unshift_sigmas(torch.tensor([lo, hi], dtype=torch.float64), shift)
    if scheme == "logit_normal":
        bounds = torch.special.ndtr((torch.logit(bounds) - logit_mean) / logit_std)
    u = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(batch_size, generator=generator).double()
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.special.ndtri(u) * logit_std + logit_mean)
    # float64 until here: the result is in [lo, hi] up to float32 rounding (callers keep a margin).
    return shift_sigmas(u, shift).clamp(lo, hi).float()


def sigma_to_timestep(sigmas: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The transformer's timestep input for noise level ``sigmas`` (FlowMatchEulerDiscreteScheduler units)."""
    return sigmas * num_train_timesteps


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - s) x0 + s noise`` with one ``s`` per batch element."""
    s = _expand(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer is trained to predict: ``noise - x0``."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, given: int = 0) -> torch.Tensor:
    """Mean squared error of the velocity prediction, computed in float32 (stable under bf16 autocast), over the
    latent frames the model generates (``given``: leading frames it is handed, e.g. Wan2.2-TI2V's image)."""
    err = (pred.float() - flow_target(x0.float(), noise.float())) ** 2
    return torch.mean(err[:, :, given:] if given else err)


@dataclass
class FlowStep:
    """One flow-matching forward: what the transformer saw, what it predicted, and the loss."""

    loss: torch.Tensor  # scalar, float32
    prediction: torch.Tensor  # velocity, ``[B, C, F, h, w]``
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor  # ``[B]``, scheduler units, on the latents' device


def flow_step(
    adapter: Any,
    transformer: nn.Module,
    x0: torch.Tensor,
    text: Mapping[str, torch.Tensor],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> FlowStep:
    """The forward of one training step (the trainer's, the demo's timing, the benchmark's, the tiny base's
    pretraining): ``x_t`` at ``sigmas``, the family adapter's velocity prediction, the flow-matching loss.

    The caller draws ``sigmas`` and ``noise`` (the trainer per sample, from per-sample generators) and runs
    the backward; ``x0``, ``noise`` and ``text`` are on the transformer's device.
    """
    noisy = add_noise(x0, noise, sigmas)
    timesteps = sigma_to_timestep(sigmas).to(x0.device)
    prediction = adapter.predict(transformer, noisy, timesteps, dict(text))
    loss = flow_matching_loss(prediction, x0, noise, adapter.given_frames(transformer))
    return FlowStep(loss, prediction, noisy, timesteps)


def per_sample_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sample MSE (for per-bucket / per-timestep logging)."""
    err = (pred.float() - flow_target(x0.float(), noise.float())) ** 2
    return err.flatten(1).mean(dim=1)


def clip_noise(clip_id: str, timestep: float, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Deterministic float32 CPU noise for one (clip, timestep): identical in every run, device and process."""
    digest = hashlib.sha256(f"{seed}|{clip_id}|{float(timestep):.6f}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=gen)


@dataclass
class HeldoutResult:
    """Held-out flow-matching loss: overall mean plus breakdowns (plain floats, JSON-ready)."""

    mean: float
    per_bucket: dict[int, float]
    per_timestep: dict[float, float]
    per_clip: dict[str, float]
    count: int
    timesteps: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "per_bucket": {str(k): v for k, v in self.per_bucket.items()},
            "per_timestep": {str(k): v for k, v in self.per_timestep.items()},
            "per_clip": dict(self.per_clip),
            "count": self.count,
            "timesteps": list(self.timesteps),
        }


ClipLike = tuple[str, int, Mapping[str, torch.Tensor]]


def _iter_clips(clips: Iterable[Any], dataset: Any | None) -> Iterable[ClipLike]:
    for item in clips:
        if isinstance(item, tuple) and len(item) == 3:
            yield item
        elif hasattr(item, "bucket") and hasattr(item, "id"):
            if dataset is None:
                raise ValueError("heldout_loss got dataset Records but no dataset= to load their tensors from")
            yield item.id, int(item.bucket), dataset.load(item)
        else:
            raise ValueError(
                f"heldout_loss clips must be dataset Records or (clip_id, bucket, tensors) tuples; got {type(item)}"
            )


@torch.no_grad()
def heldout_loss(
    adapter: Any,
    transformer: nn.Module,
    clips: Iterable[Any],
    timesteps: Sequence[float] = DEFAULT_HELDOUT_TIMESTEPS,
    seed: int = 0,
    *,
    dataset: Any | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> HeldoutResult:
    """Flow-matching loss on held-out clips at fixed timesteps with fixed noise, comparable across runs.

    ``clips``: ``Record``s of a ``PreparedDataset`` (pass ``dataset=``) or ``(clip_id, bucket, tensors)``
    with ``tensors`` as stored in the dataset ("latents" ``[C,F,h,w]`` + text tensors, no batch dim).
    ``timesteps`` are in scheduler units (0..1000, sigma = t / 1000). The noise of each (clip, timestep)
    depends only on ``seed``, the clip id and the timestep, so two LoRAs (or a LoRA and the base model)
    are scored on exactly the same inputs. Runs in eval mode (LoRA dropout off) and restores the mode.
    """
    ts = [float(t) for t in timesteps]
    if not ts or any(not 0.0 < t <= NUM_TRAIN_TIMESTEPS for t in ts):
        raise ValueError(f"heldout timesteps must be in (0, {NUM_TRAIN_TIMESTEPS}]; got {list(timesteps)}")
    param = next(transformer.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    was_training = transformer.training
    transformer.eval()
    by_bucket: dict[int, list[float]] = defaultdict(list)
    by_t: dict[float, list[float]] = defaultdict(list)
    per_clip: dict[str, float] = {}
    try:
        for clip_id, bucket, tensors in _iter_clips(clips, dataset):
            x0 = tensors["latents"].float().unsqueeze(0)
            text = {k: v.unsqueeze(0).to(device) for k, v in tensors.items() if k != "latents"}
            text = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in text.items()}
            losses = []
            for t in ts:
                noise = clip_noise(clip_id, t, x0.shape[1:], seed).unsqueeze(0)
                sigma = torch.tensor([t / NUM_TRAIN_TIMESTEPS])
                xt = add_noise(x0, noise, sigma).to(device=device, dtype=dtype)
                pred = adapter.predict(transformer, xt, torch.tensor([t], device=device, dtype=dtype), text)
                loss = float(
                    flow_matching_loss(pred, x0.to(device), noise.to(device), adapter.given_frames(transformer))
                )
                if not math.isfinite(loss):
                    raise FloatingPointError(f"held-out loss is {loss} on clip {clip_id!r} at timestep {t}")
                losses.append(loss)
                by_t[t].append(loss)
            per_clip[clip_id] = sum(losses) / len(losses)
            by_bucket[int(bucket)].append(per_clip[clip_id])
    finally:
        transformer.train(was_training)
    if not per_clip:
        raise ValueError("heldout_loss got no clips; check the holdout split (data.holdout) is not empty")
    return HeldoutResult(
        mean=sum(per_clip.values()) / len(per_clip),
        per_bucket={b: sum(v) / len(v) for b, v in sorted(by_bucket.items())},
        per_timestep={t: sum(v) / len(v) for t, v in sorted(by_t.items())},
        per_clip=per_clip,
        count=len(per_clip),
        timesteps=ts,
    )
