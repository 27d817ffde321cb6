"""The LoRA length-extension training loop (Radial Attention, arXiv 2506.19852, section 4.3).

Read top to bottom: load the base pipeline through its family adapter, keep only the transformer,
attach LoRA, install radial attention, then for every step draw a length bucket, a global batch of
that bucket, noise it (flow matching) and take an AdamW step on the LoRA weights only. Wan2.2 A14B
has two experts; ``model.expert`` picks one and its noise levels are drawn only from that expert's range.
With ``validation.sample_prompts`` the whole pipeline is kept and sample videos are rendered with the
LoRA as trained (:mod:`radial_lora.train.samples`), without touching the training RNG streams.

Reproducibility is by construction: the bucket and clips of step ``k`` come from a sampler whose whole
state is saved, and the noise and noise level of sample ``i`` of step ``k`` come from a generator seeded
with ``(seed, k, i)``. A resumed run, or a run on N processes with the same global batch, therefore sees
exactly the same inputs as the uninterrupted single-process run.

Data parallelism: each process holds the (frozen) base model and computes its share of the global
batch; torch's ``DistributedDataParallel`` averages the LoRA gradients while backward runs, skipping the
sync (``no_sync``) on all but the last accumulation step (``accelerate`` sets up the process group:
``accelerate launch`` / ``torchrun``, gloo on CPU, NCCL on GPU). The adapters call the wrapper and read
``config``/``dtype`` from the model inside (``models.adapter.unwrap``). ``train.distributed="fsdp"`` instead shards the base and the LoRA with torch's FSDP2
``fully_shard`` (called directly: accelerate 1.15 ignores its FSDP plugin on CPU and wraps in DDP, so
this is the one path that also runs, and is tested, with gloo); FSDP averages the LoRA gradients itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from radial_lora import lora as lora_io
from radial_lora.train import checkpoint as ckpt
from radial_lora.train import flow_matching as fm
from radial_lora.train.config import (
    ConfigError,
    TrainConfig,
    check_expert_family,
    sample_dense_timesteps,
    sample_every,
)

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"


class TrainingDiverged(ValueError):
    """The loss became NaN/Inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None
    losses: list[float] = field(default_factory=list)  # one per optimizer step, all steps of the run
    last_step: int = 0
    heldout: dict[str, Any] | None = None


# --- schedule and optimiser ------------------------------------------------------------------------


def lr_factor(step: int, *, total: int, warmup: int, name: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warmup, then cosine or flat."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optimizer
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError("optimizer.name='adamw8bit' needs bitsandbytes (not installed); use 'adamw'") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    if o.fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


# --- data ----------------------------------------------------------------------------------------


class BucketSampler:
    """Draws (bucket, global batch of clip indices) per step, reproducibly and resumably.

    The bucket of step ``k`` is drawn from ``rng(seed, k)`` with the configured weights; clips of a
    bucket are served in epoch-wise permutations (``rng(seed, bucket, epoch)``), so every clip is seen
    once per epoch. The state is just the (epoch, position) of each bucket.
    """

    def __init__(self, sizes: dict[int, int], weights: dict[int, float], seed: int) -> None:
        self.sizes, self.seed = dict(sizes), seed
        self.buckets = sorted(sizes)
        total = sum(weights[b] for b in self.buckets)
        self.probs = np.array([weights[b] / total for b in self.buckets])
        self.pos = {b: [0, 0] for b in self.buckets}  # bucket -> [epoch, position]

    def _perm(self, bucket: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, bucket, epoch]).permutation(self.sizes[bucket])

    def draw(self, step: int, batch_size: int) -> tuple[int, list[int]]:
        bucket = int(np.random.default_rng([self.seed, step]).choice(self.buckets, p=self.probs))
        epoch, pos = self.pos[bucket]
        out: list[int] = []
        while len(out) < batch_size:
            perm = self._perm(bucket, epoch)
            take = perm[pos : pos + batch_size - len(out)].tolist()
            out += take
            pos += len(take)
            if pos >= len(perm):
                epoch, pos = epoch + 1, 0
        self.pos[bucket] = [epoch, pos]
        return bucket, out

    def state_dict(self) -> dict[str, Any]:
        return {str(b): list(v) for b, v in self.pos.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for b, v in state.items():
            if int(b) in self.pos:
                self.pos[int(b)] = [int(v[0]), int(v[1])]


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of global sample ``index`` at optimizer step ``step``: independent of process count."""
    digest = hashlib.sha256(f"train|{seed}|{step}|{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def collate(items: list[dict[str, torch.Tensor]], where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack clips of one bucket: latents ``[B,C,F,h,w]`` and every text tensor with a batch dim."""
    keys = sorted(items[0])
    for it in items[1:]:
        if sorted(it) != keys:
            raise ValueError(f"{where}: clips carry different tensors ({sorted(it)} vs {keys}); re-prepare the dataset")
    try:
        batch = {k: torch.stack([it[k] for it in items]) for k in keys}
    except RuntimeError as exc:
        raise ValueError(f"{where}: clips of one bucket have different tensor shapes ({exc})") from exc
    latents = batch.pop("latents")
    return latents, batch


# --- setup helpers -------------------------------------------------------------------------------


def shard_model(transformer: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``): one unit per transformer block, then the root, over all processes.

    The frozen base and the LoRA are both sharded; each block's weights are gathered only while it
    runs, so a 14B base no longer has to fit on every GPU. Tested with gloo on CPU; not yet on NCCL/GPUs.
    """
    from torch.distributed.fsdp import fully_shard

    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):  # Wan: blocks; HunyuanVideo: (single_)transformer_blocks
            for block in child:
                fully_shard(block)
    fully_shard(transformer)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded tensors gathered (collective), so a checkpoint is the same
    file under DDP and FSDP and resumes on any number of processes."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()} for i, st in sd["state"].items()
    }
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of full tensors: shard each per-parameter tensor like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, base weight dtype)."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype_name = cfg.model.dtype
    if dtype_name == "auto":
        dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    return mixed, getattr(torch, dtype_name)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# Settings whose change makes a resumed run differ from the run it continues (dotted config keys).
RESULT_KEYS = ("model.id", "model.expert", "data.path", "data.lengths", "data.weights", "data.base_length",
               "resolution", "lora", "radial", "optimizer", "schedule", "train.steps", "train.batch_size",
               "train.grad_accum", "train.seed", "train.timestep_sampling", "train.consistency_weight")  # fmt: skip


def record_config(out: Path, cfg: TrainConfig, *, resumed: bool) -> list[str]:
    """Write ``out/config.json``; on resume, first warn about every setting that differs from the saved one
    and changes results (:data:`RESULT_KEYS`), keeping the old file as ``config.previous.json``. Returns the
    differing keys."""
    from radial_lora.files import write_json_atomic

    path, new = out / "config.json", cfg.to_dict()
    changed: list[str] = []
    if resumed and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))

        def get(d: dict, key: str) -> Any:
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        changed = [k for k in RESULT_KEYS if get(old, k) != get(new, k)]
        for k in changed:
            logger.warning("resuming with %s = %s; the run being resumed used %s (results will differ from an "
                           "uninterrupted run)", k, json.dumps(get(new, k)), json.dumps(get(old, k)))  # fmt: skip
        if changed:
            write_json_atomic(out / "config.previous.json", old, indent=2)
    write_json_atomic(path, new, indent=2)
    return changed


def ensure_dataset(cfg: TrainConfig) -> None:
    """A missing prepared dataset: a clear error naming the command that makes one, or (``data.if_missing
    = "sample"``) synthetic sample videos written beside ``data.path`` and prepared there with the model."""
    from radial_lora.data.dataset import DATASET_JSON
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset
    from radial_lora.models.registry import detect_family

    path = Path(cfg.data.path)
    if (path / DATASET_JSON).is_file():
        return
    d, r = cfg.data, cfg.resolution
    lengths = ",".join(map(str, d.lengths)) or "LENGTHS"
    if d.if_missing == "error":
        raise FileNotFoundError(
            f"data.path {path}: no prepared dataset there (no {DATASET_JSON}). Make one with `radial-lora data "
            f"prepare VIDEOS --out {path} --model {cfg.model.id} --family {cfg.model.family or 'FAMILY'} --lengths "
            f"{lengths} --height {r.height} --width {r.width}` (docs/DATA.md)"
        )
    family = cfg.model.family or detect_family(cfg.model.id)
    videos = path.with_name(path.name + "_videos")
    num_videos = 8
    logger.info("data.path %s has no prepared dataset: writing %d sample videos to %s and preparing them at %s "
                "frames (data.if_missing='sample')", path, num_videos, videos, lengths)  # fmt: skip
    write_sample_dataset(videos, num_videos=num_videos, num_frames=max(d.lengths) + 3, size=(r.height, r.width))
    summary = prepare_dataset(PrepareOptions(
        input=videos, out=path, model=cfg.model.id, family=family, lengths=tuple(d.lengths), height=r.height,
        width=r.width, dtype="float32" if cfg.model.dtype == "auto" else cfg.model.dtype,
    ))  # fmt: skip
    logger.info("%s", summary.format())


def _own_aligned_weights(module: torch.nn.Module) -> None:
    """Give every weight its own allocator-aligned storage (CPU).

    Loaded weights are views into the file's buffer at arbitrary offsets, and the CPU kernels round by a few
    ulp differently for differently aligned operands (measured on the tiny Wan: a copy of the weights moved
    its outputs by 5e-7). FSDP's gathered weights are fresh allocations, so without this a sharded run could
    not reproduce a one-process run bit for bit."""
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.clone()
        for buf_module in module.modules():
            for name, buf in buf_module.named_buffers(recurse=False):
                buf_module._buffers[name] = buf.clone()


@contextmanager
def _base_model(transformer: torch.nn.Module, controller: Any) -> Iterator[None]:
    """The frozen base model: LoRA disabled, dense attention everywhere, no gradients."""
    transformer.disable_adapters()
    try:
        with torch.no_grad(), controller.force_dense():
            yield
    finally:
        transformer.enable_adapters()


def _round_robin(records: list[Any]) -> list[Any]:
    """Records interleaved across buckets, so the first N validation clips cover every length."""
    groups: dict[int, list[Any]] = {}
    for rec in records:
        groups.setdefault(rec.bucket, []).append(rec)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for _, g in sorted(groups.items()) if i < len(g)]
    return out


def _file_logger(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("radial_lora").addHandler(handler)
    logging.getLogger("radial_lora").setLevel(logging.INFO)
    return handler


class _Loggers:
    """TensorBoard (default) and wandb (optional) scalars; main process only."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool) -> None:
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.logging.wandb:
            import wandb  # type: ignore[import-not-found]

            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(), dir=str(out))

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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
        "format": "radial-lora/1",
        "base_model": str(local.resolve()) if local.is_dir() else cfg.model.id,
        **(identity or {}),
        "family": family,
        "trained_lengths": cfg.data.lengths,
        "base_length": cfg.data.base_length,
        "height": cfg.resolution.height,
        "width": cfg.resolution.width,
        "attention": {
            "pattern": cfg.radial.pattern,
            "decay": controller.decay_factor,
            "block_size": cfg.radial.block_size,
            "dense_layers": cfg.radial.dense_layers,
        },
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha if cfg.lora.alpha is not None else float(cfg.lora.rank),
        "targets": cfg.lora.targets,
        "steps": step,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.optimizer.lr,
        "consistency_weight": cfg.train.consistency_weight,
    }
    if expert is not None:
        meta["expert"], meta["expert_timesteps"] = expert[0], expert[1]
    return meta


# --- the run -------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: str | None = None, *, pipe: Any | None = None) -> TrainResult:
    """Run (or continue) a training job described by ``cfg``; see the module docstring.

    ``pipe`` may be an already loaded pipeline (tests, demo); otherwise ``cfg.model.id`` is loaded.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.models.builtin import model_identity
    from radial_lora.models.radial import apply_radial_attention
    from radial_lora.models.registry import detect_family, get_adapter

    out = Path(cfg.output_dir)
    cpu = not torch.cuda.is_available()
    probe = torch.device("cpu" if cpu else "cuda")
    mixed, weight_dtype = _resolve_precision(cfg, probe)
    acc = Accelerator(mixed_precision=mixed, cpu=cpu)
    device, world, rank, main = acc.device, acc.num_processes, acc.process_index, acc.is_main_process
    if device.type == "cpu":
        device = torch.device("cpu")  # distributed accelerate says "cpu:0": to() would copy every weight
    t = cfg.train
    micro_total = t.batch_size // t.grad_accum
    if micro_total % world:
        raise ValueError(
            f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro_total} samples per "
            f"micro-step cannot be split over {world} processes; make it a multiple of {world}"
        )
    micro = micro_total // world
    handler = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handler = _file_logger(out / LOG_FILE)
        record_config(out, cfg, resumed=resume is not None)
    set_seed(t.seed)

    # Data: the prepared dataset, its buckets, the holdout split.
    if main:
        ensure_dataset(cfg)
    acc.wait_for_everyone()
    dataset = PreparedDataset(cfg.data.path)
    info = dataset.info
    if (info.get("height"), info.get("width")) != (cfg.resolution.height, cfg.resolution.width):
        raise ValueError(
            f"resolution {cfg.resolution.height}x{cfg.resolution.width} differs from the dataset's "
            f"{info.get('height')}x{info.get('width')} ({cfg.data.path}/dataset.json); set resolution.* to match"
        )
    train_records, holdout_records = dataset.split(cfg.data.holdout, seed=cfg.data.holdout_seed)
    by_bucket: dict[int, list[Any]] = {}
    for rec in train_records:
        by_bucket.setdefault(rec.bucket, []).append(rec)
    lengths = cfg.data.lengths or sorted(by_bucket)
    missing = [n for n in lengths if n not in by_bucket]
    if missing:
        raise ValueError(
            f"data.lengths {missing} have no training clips in {cfg.data.path} (it has {sorted(by_bucket)}); "
            "prepare those lengths or change data.lengths"
        )
    if cfg.validation.every and not holdout_records:
        logger.warning("validation.every=%d but the holdout split is empty (data.holdout=%g): no validation",
                       cfg.validation.every, cfg.data.holdout)  # fmt: skip
    weights = dict(zip(lengths, cfg.data.weights or [1.0] * len(lengths)))
    sampler = BucketSampler({n: len(by_bucket[n]) for n in lengths}, weights, t.seed)

    # Model: transformer only (latents and text embeddings are pre-computed), LoRA, radial attention.
    family = cfg.model.family or (detect_family(pipe) if pipe is not None else detect_family(cfg.model.id))
    check_expert_family(cfg.model.expert, family)  # the family may only be known now (auto-detected)
    if info.get("family") not in (None, family):
        raise ValueError(f"dataset {cfg.data.path} was prepared for family {info.get('family')!r}, model is {family!r}")
    adapter = get_adapter(family)
    if pipe is None:
        pipe = adapter.load_pipeline(cfg.model.id, torch_dtype=weight_dtype)
    # Wan2.2 A14B: one LoRA per expert, trained only at the noise levels WanPipeline sends that expert to.
    expert = (cfg.model.expert or "high") if family == "wan22" else None
    sigma_range: tuple[float, float] | None = None
    expert_meta = None
    if expert is None:
        transformer = adapter.transformers(pipe)[0]
    else:
        try:
            transformer = adapter.expert_transformer(pipe, expert)
        except ValueError as exc:
            raise ConfigError(f"model.expert: {exc}") from None
        sigma_range = adapter.expert_sigma_range(pipe, expert)
        t_range = [round(x * fm.NUM_TRAIN_TIMESTEPS, 3) for x in sigma_range]
        expert_meta = (expert, t_range)
        logger.info("Wan2.2 A14B: training the %s-noise expert, timesteps in [%.1f, %.1f]", expert, *t_range)
        if sigma_range == (0.0, 1.0):
            sigma_range = None  # no boundary: the high expert sees every noise level
    val_timesteps = [x for x in cfg.validation.timesteps
                     if sigma_range is None or sigma_range[0] <= x / fm.NUM_TRAIN_TIMESTEPS <= sigma_range[1]]  # fmt: skip
    if cfg.validation.every and holdout_records and not val_timesteps:
        raise ConfigError(
            f"validation.timesteps {cfg.validation.timesteps}: none is in the {expert} expert's range "
            f"{expert_meta[1] if expert_meta else ''}; give timesteps the expert denoises"
        )
    sched_cfg = pipe.scheduler.config
    shift = cfg.model.flow_shift or float(sched_cfg.get("flow_shift") or sched_cfg.get("shift") or 1.0)
    # Validation samples need the whole pipeline (its transformer is the one trained below).
    sample_pipe = pipe if cfg.validation.sample_prompts else None
    del pipe
    identity = model_identity(cfg.model.id, transformer.config)
    transformer.to(device=device, dtype=weight_dtype)
    if device.type == "cpu":
        _own_aligned_weights(transformer)
    params = lora_io.add_lora(
        transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.targets
    )
    # Resume, part 1: the LoRA weights go in before any sharding (plain tensors, every process alike).
    state = None
    if resume:
        path = ckpt.resolve_resume(out, resume)
        state = ckpt.load_checkpoint(path)
        from peft import set_peft_model_state_dict

        sd = {k[len(lora_io.PREFIX) :]: v for k, v in state["lora_state"].items()}
        result = set_peft_model_state_dict(transformer, sd)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {path} does not match this LoRA config: unexpected {result.unexpected_keys[:3]}")
    for p in params:
        p.data = p.data.float()  # trainable weights in fp32 even when the base is bf16
    controller = apply_radial_attention(
        transformer, pattern=cfg.radial.pattern, dense_layers=cfg.radial.dense_layers,
        decay_factor=cfg.radial.decay, block_size=cfg.radial.block_size, backend=cfg.radial.backend,
    )  # fmt: skip
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    lora_cfg = lora_io.adapter_config(transformer)
    fsdp = t.distributed == "fsdp" and world > 1
    if fsdp:
        shard_model(transformer)
        params = [p for p in transformer.parameters() if p.requires_grad]  # now sharded DTensors
        here = sum(p.to_local().numel() for p in transformer.parameters())
        logger.info("FSDP: transformer sharded over %d processes, %d of %d parameters held per process",
                    world, here, sum(p.numel() for p in transformer.parameters()))  # fmt: skip
    elif t.distributed == "fsdp":
        logger.info("train.distributed='fsdp' with one process: nothing to shard")
    # DDP: torch's DistributedDataParallel averages the gradients while backward runs (the LoRA's only;
    # the frozen base has none); accumulation steps skip the sync (no_sync) until the last one.
    ddp = world > 1 and not fsdp
    model = torch.nn.parallel.DistributedDataParallel(transformer, broadcast_buffers=False) if ddp else transformer
    optimizer = build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total=t.steps, warmup=cfg.schedule.warmup_steps, name=cfg.schedule.name,
                            min_ratio=cfg.schedule.min_lr_ratio),
    )  # fmt: skip

    # Resume, part 2: optimizer (full tensors in the file, re-sharded under FSDP), schedule, sampler, RNG.
    start, losses = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if fsdp:
            shard_optimizer_state(optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["state"]["sampler"])
        rngs = state["rng"]
        ckpt.restore_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start, losses = int(state["state"]["step"]), list(state["state"]["losses"])
        logger.info("resumed from %s at step %d", path, start)
        if start >= t.steps:
            logger.info("checkpoint step %d >= train.steps %d: nothing to train", start, t.steps)

    loggers = _Loggers(cfg, out, main)
    samples_every = sample_every(cfg.validation)
    samples = None
    if sample_pipe is not None:
        from radial_lora.train.samples import ValidationSampler

        v = cfg.validation
        samples = ValidationSampler(
            sample_pipe, transformer, controller, out, prompts=list(v.sample_prompts),
            lengths=list(v.sample_lengths) or [max(lengths)], height=cfg.resolution.height,
            width=cfg.resolution.width, steps=v.sample_steps, guidance=v.sample_guidance, seed=v.sample_seed,
            dense_timesteps=sample_dense_timesteps(v), fps=float(info.get("fps") or 16.0), device=device,
            settings={"model": cfg.model.id, "family": family, "expert": expert, "pattern": cfg.radial.pattern,
                      "decay_factor": controller.decay_factor, "block_size": cfg.radial.block_size,
                      "dense_layers": cfg.radial.dense_layers, "backend": cfg.radial.backend,
                      "dtype": str(weight_dtype).removeprefix("torch."), "device": str(device)},
            write=main,
        )  # fmt: skip
    n_base = 1 + (cfg.data.base_length - 1) // 4  # latent frames of the base length

    def save(step: int) -> None:
        rng_states = gather_object([ckpt.capture_rng_state()]) if world > 1 else [ckpt.capture_rng_state()]
        # Under FSDP gathering the LoRA and optimizer state is collective: every process takes part.
        lora_state = lora_io.lora_state_dict(transformer) if main or fsdp else None
        optimizer_state = full_optimizer_state(optimizer) if fsdp else optimizer.state_dict()
        if main:
            ckpt.save_checkpoint(
                out, step, lora_state=lora_state, lora_config=lora_cfg,
                metadata=lora_metadata(cfg, family, controller, step, expert_meta, identity), optimizer_state=optimizer_state,
                scheduler_state=scheduler.state_dict(), rng_states=rng_states,
                trainer_state={"sampler": sampler.state_dict(), "losses": losses}, keep_last=cfg.checkpoint.keep_last,
            )  # fmt: skip
        acc.wait_for_everyone()

    def validate(step: int) -> dict[str, Any] | None:
        if not holdout_records:
            return None
        res = None
        if main or fsdp:  # a sharded model's forward needs every process
            clips = _round_robin(holdout_records)[: cfg.validation.max_clips]
            with controller.training_mode(), acc.autocast():
                res = fm.heldout_loss(adapter, transformer, clips, val_timesteps,
                                      cfg.validation.seed, dataset=dataset)  # fmt: skip
        if main:
            logger.info("step %d held-out loss %.6f per bucket %s", step, res.mean, res.per_bucket)
            loggers.scalars({"heldout/mean": res.mean, **{f"heldout/f{b}": v for b, v in res.per_bucket.items()}}, step)
        acc.wait_for_everyone()
        return None if res is None else res.to_dict()

    def write_samples(step: int) -> None:
        # DDP: the main process renders, the others wait. FSDP: the sharded forward needs every process;
        # only the main one decodes and writes. The global RNG states are restored afterwards.
        if main or fsdp:
            samples(step, image_logger=loggers.image if main else None)
        acc.wait_for_everyone()

    logger.info(
        "training %s LoRA: steps %d, global batch %d (%d procs x %d micro x %d accum), buckets %s weights %s, "
        "pattern %s, precision %s on %s", family, t.steps, t.batch_size, world, micro, t.grad_accum, lengths,
        [weights[n] for n in lengths], cfg.radial.pattern, mixed, device,
    )  # fmt: skip
    bar = tqdm(total=t.steps, initial=start, disable=not main, desc="train", dynamic_ncols=True)
    heldout = None
    step = start
    console = ExitStack()
    if main:
        console.enter_context(logging_redirect_tqdm())  # console log lines go above the progress bar
    try:
        for step in range(start + 1, t.steps + 1):
            t0 = time.perf_counter()
            bucket, idx = sampler.draw(step, t.batch_size)
            records = [by_bucket[bucket][i] for i in idx]
            step_loss = torch.zeros((), device=device)
            cons_loss = torch.zeros((), device=device)
            with controller.training_mode():
                for a in range(t.grad_accum):
                    first = (a * world + rank) * micro
                    mine = records[first : first + micro]
                    latents, text = collate([dataset.load(r) for r in mine], f"{cfg.data.path} bucket f{bucket}")
                    gens = [sample_generator(t.seed, step, first + j) for j in range(micro)]
                    sigmas = torch.cat([
                        fm.sample_sigmas(1, scheme=t.timestep_sampling, shift=shift, logit_mean=t.logit_mean,
                                         logit_std=t.logit_std, generator=g, sigma_range=sigma_range) for g in gens
                    ])  # fmt: skip
                    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
                    text = {k: v.to(device) for k, v in text.items()}
                    sync = model.no_sync() if ddp and a < t.grad_accum - 1 else nullcontext()
                    with sync:
                        with acc.autocast():
                            fwd = fm.flow_step(adapter, model, latents.to(device), text, sigmas, noise.to(device))
                        loss = total = fwd.loss
                        if t.consistency_weight > 0 and bucket > cfg.data.base_length:
                            with _base_model(transformer, controller), acc.autocast():
                                base_pred = adapter.predict(transformer, fwd.noisy[:, :, :n_base], fwd.timesteps, text)
                            cons = torch.mean((fwd.prediction[:, :, :n_base].float() - base_pred.float()) ** 2)
                            total = loss + t.consistency_weight * cons
                            cons_loss += cons.detach()
                        # Unscaled: the gradients are summed over micro-steps and divided once below, so a step's
                        # gradient is the same sum of per-sample terms for any split over processes and micro-steps.
                        acc.backward(total)
                    step_loss += loss.detach()
            if t.grad_accum > 1:
                step_loss, cons_loss = step_loss / t.grad_accum, cons_loss / t.grad_accum
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(t.grad_accum)
            if world > 1:
                step_loss = acc.reduce(step_loss, reduction="mean")
                cons_loss = acc.reduce(cons_loss, reduction="mean")
            loss_value = float(step_loss)
            if not math.isfinite(loss_value):
                last = ckpt.list_checkpoints(out)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss is {loss_value} at step {step} (bucket {bucket} frames); stopping without an optimizer "
                    f"step. {where}; lower optimizer.lr or check the data, then --resume latest"
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            dt = time.perf_counter() - t0
            if main and (step % cfg.logging.every == 0 or step == t.steps):
                lr = scheduler.get_last_lr()[0]
                scalars = {"loss": loss_value, f"loss/f{bucket}": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                           "step_time_s": dt, "peak_memory_mb": _peak_memory_mb(device)}  # fmt: skip
                if t.consistency_weight > 0:
                    scalars["consistency_loss"] = float(cons_loss)
                loggers.scalars(scalars, step)
                logger.info("step %d/%d f%d loss %.6f lr %.3g grad %.3g %.2fs", step, t.steps, bucket, loss_value,
                            lr, float(grad_norm), dt)  # fmt: skip
            bar.set_postfix(loss=f"{loss_value:.4f}", f=bucket, s_per_step=f"{dt:.2f}")
            bar.update(1)
            if cfg.validation.every and step % cfg.validation.every == 0:
                heldout = validate(step)
            if samples is not None and ((samples_every and step % samples_every == 0) or step == t.steps):
                write_samples(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != t.steps:
                save(step)
        if start < t.steps:
            save(t.steps)
        lora_path = None
        final_state = lora_io.lora_state_dict(transformer) if main or fsdp else None  # collective under FSDP
        if main:
            meta = lora_metadata(cfg, family, controller, max(step, start), expert_meta, identity)
            lora_path = lora_io.save_lora(out, final_state, meta, lora_config=lora_cfg)
            tc = transformer.config
            mlp = int(tc.num_attention_heads * tc.attention_head_dim * tc.get("mlp_ratio", 4.0))
            lora_io.export_comfyui(lora_path, out / lora_io.COMFYUI_FILENAME, family, single_mlp_dim=mlp)
            (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
        acc.wait_for_everyone()
    finally:
        bar.close()
        console.close()
        loggers.close()
        if handler is not None:
            logging.getLogger("radial_lora").removeHandler(handler)
            handler.close()
    return TrainResult(output_dir=out, lora_path=lora_path, losses=losses, last_step=max(step, start), heldout=heldout)

