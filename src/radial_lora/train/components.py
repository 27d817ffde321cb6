"""The parts of a training run that the loop calls: loggers and progress, checkpoints and the final export,
held-out validation, validation sample videos. Each knows what several processes must do together."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from radial_lora import lora as lora_io
from radial_lora.constants import FAMILY_TASK
from radial_lora.train import checkpoint as ckpt
from radial_lora.train import flow_matching as fm
from radial_lora.train.config import ConfigError, TrainConfig, sample_dense_timesteps, sample_every
from radial_lora.train.distributed import optimizer_state

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"


class Loggers:
    """The run's log file, TensorBoard (default) and wandb (optional) scalars, the progress bar; all on the main
    process only (the others get no-ops)."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.tb = self.wandb = self.handler = self.bar = None
        self.console = ExitStack()
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
        logging.getLogger("radial_lora").addHandler(self.handler)
        logging.getLogger("radial_lora").setLevel(logging.INFO)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.logging.wandb:
            import wandb  # type: ignore[import-not-found]

            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(), dir=str(out))

    def progress(self, total: int, initial: int) -> None:
        """Start the loop's tqdm bar (advanced by :meth:`step`); console log lines go above it."""
        if self.enabled:
            self.console.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(total=total, initial=initial, disable=not self.enabled, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W, 3]`` image (TensorBoard only)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def step(self, step: int, stats: Any, *, lr: float, seconds: float, peak_memory_mb: float) -> None:
        """Every ``logging.every`` steps and at the last: the scalars and a log line; the bar every step."""
        steps = self.cfg.train.steps
        if self.enabled and (step % self.cfg.logging.every == 0 or step == steps):
            scalars = {
                "loss": stats.loss,
                f"loss/f{stats.bucket}": stats.loss,
                "lr": lr,
                "grad_norm": stats.grad_norm,
                "step_time_s": seconds,
                "peak_memory_mb": peak_memory_mb,
            }
            if self.cfg.train.consistency_weight > 0:
                scalars["consistency_loss"] = stats.consistency
            self.scalars(scalars, step)
            logger.info(
                "step %d/%d f%d loss %.6f lr %.3g grad %.3g %.2fs",
                step,
                steps,
                stats.bucket,
                stats.loss,
                lr,
                stats.grad_norm,
                seconds,
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats.loss:.4f}", f=stats.bucket, s_per_step=f"{seconds:.2f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.console.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.handler is not None:
            logging.getLogger("radial_lora").removeHandler(self.handler)
            self.handler.close()


class Checkpointer:
    """Checkpoints (LoRA, optimizer, schedule, sampler, every process's RNG) and the final LoRA + ComfyUI export.

    Under FSDP gathering the LoRA and optimizer state is collective: every process calls :meth:`save`."""

    def __init__(
        self, cfg: TrainConfig, rt: Any, data: Any, m: Any, optimizer: Any, scheduler: Any, losses: list[float]
    ) -> None:
        self.cfg, self.rt, self.data, self.m = cfg, rt, data, m
        self.optimizer, self.scheduler, self.losses = optimizer, scheduler, losses
        self.out = Path(cfg.output_dir)

    def _metadata(self, step: int) -> dict[str, Any]:
        m = self.m
        return lora_metadata(self.cfg, m.family, m.controller, step, m.expert_meta, m.identity)

    def save(self, step: int) -> None:
        from accelerate.utils import gather_object

        rt, m = self.rt, self.m
        rng_states = gather_object([ckpt.capture_rng_state()]) if rt.world > 1 else [ckpt.capture_rng_state()]
        lora_state = lora_io.lora_state_dict(m.transformer) if rt.main or m.fsdp else None
        opt_state = optimizer_state(m.transformer, self.optimizer)  # collective under FSDP
        if rt.main:
            ckpt.save_checkpoint(
                self.out,
                step,
                lora_state=lora_state,
                lora_config=m.lora_config,
                metadata=self._metadata(step),
                optimizer_state=opt_state,
                scheduler_state=self.scheduler.state_dict(),
                rng_states=rng_states,
                trainer_state={"sampler": self.data.sampler.state_dict(), "losses": self.losses},
                keep_last=self.cfg.checkpoint.keep_last,
            )
        rt.acc.wait_for_everyone()

    def diverged_message(self, loss: float, step: int, bucket: int, clips: tuple[str, ...] = ()) -> str:
        last = ckpt.list_checkpoints(self.out)
        where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
        named = f", clips {', '.join(clips)}" if clips else ""
        return (
            f"loss is {loss} at step {step} (bucket {bucket} frames{named}); stopping without an optimizer step. "
            f"{where}; lower optimizer.lr or check the data, then --resume latest"
        )

    def export(self, step: int) -> Path | None:
        """The trained LoRA in the diffusers format, its ComfyUI twin and ``losses.json``; the path on the main
        process (None elsewhere)."""
        from radial_lora.files import write_json_atomic

        rt, m = self.rt, self.m
        state = lora_io.lora_state_dict(m.transformer) if rt.main or m.fsdp else None  # collective under FSDP
        lora_path = None
        if rt.main:
            lora_path = lora_io.save_lora(self.out, state, self._metadata(step), lora_config=m.lora_config)
            # The key map reads every dimension from the LoRA and its metadata (mlp_ratio for HunyuanVideo's linear1).
            lora_io.export_comfyui(lora_path, self.out / lora_io.COMFYUI_FILENAME)
            write_json_atomic(self.out / "losses.json", self.losses)
        rt.acc.wait_for_everyone()
        return lora_path


def every_process_forwards(rt: Any, m: Any) -> bool:
    """A forward of a sharded (FSDP) or token-split (sequence-parallel) model needs every process."""
    return m.fsdp or rt.layout.sequence > 1


class Validator:
    """Held-out flow-matching loss at fixed timesteps and noise (``fm.heldout_loss``) on the first
    ``validation.max_clips`` held-out clips, every length represented; logged and returned."""

    def __init__(self, cfg: TrainConfig, rt: Any, data: Any, m: Any, loggers: Loggers) -> None:
        self.cfg, self.rt, self.data, self.m, self.loggers = cfg, rt, data, m, loggers
        lo_hi = m.sigma_range
        self.timesteps = [
            x for x in cfg.validation.timesteps if lo_hi is None or lo_hi[0] <= x / fm.NUM_TRAIN_TIMESTEPS <= lo_hi[1]
        ]
        if cfg.validation.every and data.holdout and not self.timesteps:
            expert, t_range = m.expert_meta or (None, "")
            raise ConfigError(
                f"validation.timesteps {cfg.validation.timesteps}: none is in the {expert} expert's range "
                f"{t_range}; give timesteps the expert denoises"
            )
        self.clips = _round_robin(data.holdout)[: cfg.validation.max_clips]

    def __call__(self, step: int) -> dict[str, Any] | None:
        rt, m = self.rt, self.m
        if not self.clips:
            return None
        res = None
        if rt.main or every_process_forwards(rt, m):
            with m.controller.training_mode(), rt.acc.autocast():
                res = fm.heldout_loss(
                    m.adapter,
                    m.transformer,
                    self.clips,
                    self.timesteps,
                    self.cfg.validation.seed,
                    dataset=self.data.dataset,
                )
        if rt.main:
            logger.info("step %d held-out loss %.6f per bucket %s", step, res.mean, res.per_bucket)
            self.loggers.scalars(
                {"heldout/mean": res.mean, **{f"heldout/f{b}": v for b, v in res.per_bucket.items()}}, step
            )
        rt.acc.wait_for_everyone()
        return None if res is None else res.to_dict()


def _round_robin(records: list[Any]) -> list[Any]:
    """Records interleaved across buckets, so the first N validation clips cover every length."""
    groups: dict[int, list[Any]] = {}
    for rec in records:
        groups.setdefault(rec.bucket, []).append(rec)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for _, g in sorted(groups.items()) if i < len(g)]
    return out


class SampleRenderer:
    """Validation sample videos (``validation.sample_*``, :mod:`radial_lora.train.samples`) every
    ``sample_every`` steps and at the last. DDP: the main process renders, the others wait; FSDP or sequence
    parallelism: every process runs the forward, the main one writes. The global RNG states are restored afterwards."""

    def __init__(self, cfg: TrainConfig, rt: Any, m: Any, sampler: Any, loggers: Loggers) -> None:
        self.cfg, self.rt, self.m, self.sampler, self.loggers = cfg, rt, m, sampler, loggers
        self.every = sample_every(cfg.validation)

    @classmethod
    def maybe(cls, cfg: TrainConfig, rt: Any, data: Any, m: Any, loggers: Loggers) -> SampleRenderer | None:
        """None unless the config asks for sample prompts."""
        if m.sample_pipe is None:
            return None
        from radial_lora.train.samples import ValidationSampler

        v, r = cfg.validation, cfg.radial
        sampler = ValidationSampler(
            m.sample_pipe,
            m.transformer,
            m.controller,
            Path(cfg.output_dir),
            prompts=list(v.sample_prompts),
            lengths=list(v.sample_lengths) or [max(data.lengths)],
            height=cfg.resolution.height,
            width=cfg.resolution.width,
            steps=v.sample_steps,
            guidance=v.sample_guidance,
            seed=v.sample_seed,
            dense_timesteps=sample_dense_timesteps(v),
            fps=float(data.dataset.info.get("fps") or 16.0),
            device=rt.device,
            settings={
                "model": cfg.model.id,
                "family": m.family,
                "expert": m.expert_meta[0] if m.expert_meta else None,
                "pattern": r.pattern,
                "decay_factor": m.controller.decay_factor,
                "block_size": m.controller.block_size,
                "dense_layers": r.dense_layers,
                "backend": r.backend,
                "dtype": str(rt.weight_dtype).removeprefix("torch."),
                "device": str(rt.device),
            },
            write=rt.main,
            images=_sample_images(data, len(v.sample_prompts)) if m.adapter.task == "i2v" else None,
        )
        return cls(cfg, rt, m, sampler, loggers)

    def maybe_render(self, step: int) -> None:
        if not ((self.every and step % self.every == 0) or step == self.cfg.train.steps):
            return
        if self.rt.main or every_process_forwards(self.rt, self.m):
            self.sampler(step, image_logger=self.loggers.image if self.rt.main else None)
        self.rt.acc.wait_for_everyone()


def _sample_images(data: Any, count: int) -> list[np.ndarray]:
    """First frames (and last, for a first-last-frame model) for an image-to-video model's sample videos: the
    held-out clips' (else the training clips'), one per sample prompt where there are enough."""
    records = data.holdout or [r for clips in data.by_bucket.values() for r in clips]
    return [data.dataset.image_condition(r) for r in records[:count]]


def lora_metadata(
    cfg: TrainConfig,
    family: str,
    controller: Any,
    step: int,
    expert: tuple[str, list[float]] | None = None,
    identity: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a LoRA file says about how it was trained (and must be used).

    ``expert``: (name, [lowest, highest] timestep) for a Wan2.2 expert LoRA; generation reads the name
    to load the file into ``transformer_2`` for "low". ``identity``: ``builtin.model_identity`` of the base
    (a name and config hash that stay true when the LoRA moves to a machine without ``base_model``'s path).
    """
    from radial_lora.models.builtin import resolve_model_id

    local = Path(resolve_model_id(cfg.model.id))
    meta = {
        "format": lora_io.LORA_FORMAT,
        "base_model": str(local.resolve()) if local.is_dir() else cfg.model.id,
        **(identity or {}),
        "family": family,
        "task": FAMILY_TASK[family],
        "trained_lengths": cfg.data.lengths,
        "base_length": cfg.data.base_length,
        "height": cfg.resolution.height,
        "width": cfg.resolution.width,
        "attention": {
            "pattern": cfg.radial.pattern,
            "decay": controller.decay_factor,
            "block_size": controller.block_size,
            "dense_layers": cfg.radial.dense_layers,
        },
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha if cfg.lora.alpha is not None else float(cfg.lora.rank),
        "targets": cfg.lora.targets,
        "steps": step,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.optimizer.lr,
        "consistency_weight": cfg.train.consistency_weight,
        "base_quantization": cfg.model.base_quantization,  # what it trained on; it loads onto any base dtype
    }
    if expert is not None:
        meta["expert"], meta["expert_timesteps"] = expert[0], expert[1]
    return meta


# --- the run -------------------------------------------------------------------------------------
