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
``config``/``dtype`` from the model inside (``models.adapter.unwrap``). ``train.distributed="fsdp"``
instead shards the base and the LoRA with torch's FSDP2 ``fully_shard`` (called directly: accelerate 1.15
ignores its FSDP plugin on CPU and wraps in DDP, so this is the one path that also runs, and is tested, with
gloo); FSDP averages the LoRA gradients itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radial_lora import locks
from radial_lora import lora as lora_io
from radial_lora.files import set_aside
from radial_lora.memory import process_peak_mb
from radial_lora.models.sequence_parallel import enable_sequence_parallel
from radial_lora.parallel import ParallelLayout, make_layout
from radial_lora.train import checkpoint as ckpt
from radial_lora.train import flow_matching as fm
from radial_lora.train.components import LOG_FILE, Checkpointer, Loggers, SampleRenderer, Validator
from radial_lora.train.config import ConfigError, TrainConfig, check_expert_family
from radial_lora.train.distributed import load_optimizer_state, shard_model
from radial_lora.train.offload import checkpoint_offloading

logger = logging.getLogger(__name__)


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


def caption_dropped(seed: int, step: int, index: int, p: float) -> bool:
    """Whether global sample ``index`` of step ``step`` trains on the empty caption: its own stream, so the
    noise and timesteps of a run do not change with the dropout rate, nor with the process count."""
    digest = hashlib.sha256(f"caption|{seed}|{step}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < p


def drop_captions(
    text: dict[str, torch.Tensor], null: dict[str, torch.Tensor] | None, drop: list[bool]
) -> dict[str, torch.Tensor]:
    """``text`` with the samples marked in ``drop`` replaced by the empty caption's tensors (the text keys
    only: image conditioning stays)."""
    if not any(drop):
        return text
    if null is None or not set(null) <= set(text):
        raise ValueError("the dataset's null_text does not match its clips' text tensors; re-run `data prepare`")
    out = dict(text)  # an image-to-video clip keeps its image: guidance's unconditional branch has it too
    for key in null:
        value = text[key].clone()
        for j, d in enumerate(drop):
            if d:
                value[j] = null[key].to(value.dtype)
        out[key] = value
    return out


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


# Settings whose change makes a resumed run differ from the run it continues (dotted config keys).
RESULT_KEYS = (
    "model.id",
    "model.expert",
    "data.path",
    "data.lengths",
    "data.weights",
    "data.base_length",
    "resolution",
    "lora",
    "radial",
    "optimizer",
    "schedule",
    "train.steps",
    "train.batch_size",
    "train.grad_accum",
    "train.seed",
    "train.timestep_sampling",
    "train.consistency_weight",
    "train.caption_dropout",
)


# What a run writes into output_dir: the entries --overwrite moves aside (anything else there stays put).
RUN_OUTPUTS = (
    ckpt.CHECKPOINT_DIR,
    lora_io.LORA_FILENAME,
    lora_io.COMFYUI_FILENAME,
    "config.json",
    "config.previous.json",
    "losses.json",
    LOG_FILE,
    "tensorboard",
    "samples",
    "wandb",
)


def claim_output(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Before a run writes anything into ``out``: a fresh run (no ``resume``) into a folder that holds a run
    (a checkpoint or a final LoRA) stops with one line naming the ways on, unless ``overwrite``, which moves the
    old run's files into ``out/previous/<time>/`` (returned). Leftovers of a run that died before its first
    checkpoint are no run: they are replaced, as before."""
    if resume is not None:
        return None
    checkpoints = ckpt.list_checkpoints(out)
    final = (out / lora_io.LORA_FILENAME).is_file()
    if not (checkpoints or final or overwrite):
        return None
    parts = [f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1][1].name}"] if checkpoints else []
    parts += ["a final LoRA"] if final else []
    return set_aside(
        out,
        RUN_OUTPUTS,
        overwrite=overwrite,
        holds=f"a training run ({' and '.join(parts)})",
        ways="continue it with --resume latest, train into another output_dir (--set output_dir=...)",
    )


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
            logger.warning(
                "resuming with %s = %s; the run being resumed used %s (results will differ from an uninterrupted run)",
                k,
                json.dumps(get(new, k)),
                json.dumps(get(old, k)),
            )
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
    logger.info(
        "data.path %s has no prepared dataset: writing %d sample videos to %s and preparing them at %s "
        "frames (data.if_missing='sample')",
        path,
        num_videos,
        videos,
        lengths,
    )
    write_sample_dataset(videos, num_videos=num_videos, num_frames=max(d.lengths) + 3, size=(r.height, r.width))
    summary = prepare_dataset(
        PrepareOptions(
            input=videos,
            out=path,
            model=cfg.model.id,
            family=family,
            lengths=tuple(d.lengths),
            height=r.height,
            width=r.width,
            dtype="float32" if cfg.model.dtype == "auto" else cfg.model.dtype,
        )
    )
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


# --- the recipe: setup as named steps, then the loop -------------------------------------------------


@dataclass
class Runtime:
    """Where the run executes: processes, device, precision, and each process's share of a batch."""

    acc: Any  # accelerate.Accelerator: process group, autocast, backward
    device: torch.device
    layout: ParallelLayout  # processes = data x sequence
    main: bool
    mixed: str  # accelerate mixed_precision
    weight_dtype: torch.dtype  # the frozen base's weights
    micro: int  # samples per forward on this process (and on each of its sequence group)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def rank(self) -> int:
        return self.layout.rank


@dataclass
class TrainData:
    """The prepared dataset split into training buckets and held-out clips, and the bucket sampler."""

    dataset: Any  # PreparedDataset
    by_bucket: dict[int, list[Any]]
    holdout: list[Any]
    lengths: list[int]
    weights: dict[int, float]
    sampler: BucketSampler
    null_text: dict[str, torch.Tensor] | None = None  # the empty caption's tensors (train.caption_dropout)


@dataclass
class TrainModel:
    """The transformer being adapted (``model`` is what the step calls: the DDP wrapper or the same module)."""

    family: str
    adapter: Any  # ModelAdapter
    transformer: torch.nn.Module
    model: torch.nn.Module
    controller: Any  # RadialController
    params: list[torch.nn.Parameter]  # the LoRA weights (sharded DTensors under FSDP)
    lora_config: dict[str, Any]
    identity: dict[str, str]
    shift: float
    sigma_range: tuple[float, float] | None  # a Wan2.2 expert's noise levels
    expert_meta: tuple[str, list[float]] | None
    sample_pipe: Any | None  # the whole pipeline, kept only for validation samples
    fsdp: bool
    ddp: bool


def setup_runtime(cfg: TrainConfig) -> Runtime:
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    mixed, weight_dtype = _resolve_precision(cfg, torch.device("cpu" if cpu else "cuda"))
    acc = Accelerator(mixed_precision=mixed, cpu=cpu)
    device = acc.device
    if device.type == "cpu":
        device = torch.device("cpu")  # distributed accelerate says "cpu:0": to() would copy every weight
    t = cfg.train
    try:
        layout = make_layout(t.sequence_parallel, device)
    except ValueError as exc:
        raise ConfigError(f"train.sequence_parallel: {exc}") from None
    micro_total, data = t.batch_size // t.grad_accum, layout.data
    if micro_total % data:
        raise ValueError(
            f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro_total} samples per "
            f"micro-step cannot be split over {data} data-parallel ranks ({layout.describe()}); make it a "
            f"multiple of {data}"
        )
    return Runtime(acc, device, layout, acc.is_main_process, mixed, weight_dtype, micro_total // data)


def setup_data(cfg: TrainConfig, rt: Runtime) -> TrainData:
    """The prepared dataset (made first when ``data.if_missing="sample"``), its buckets, the holdout split."""
    from radial_lora.data.dataset import PreparedDataset

    if rt.main:
        writer = locks.holder(cfg.data.path)
        if writer is not None:
            raise locks.FolderBusy(f"data.path {cfg.data.path} is being written by {writer}; train once it has ended")
        ensure_dataset(cfg)
    rt.acc.wait_for_everyone()
    dataset = PreparedDataset(cfg.data.path)
    info = dataset.info
    if (info.get("height"), info.get("width")) != (cfg.resolution.height, cfg.resolution.width):
        raise ValueError(
            f"resolution {cfg.resolution.height}x{cfg.resolution.width} differs from the dataset's "
            f"{info.get('height')}x{info.get('width')} ({cfg.data.path}/dataset.json); set resolution.* to match"
        )
    if rt.main:  # clips listed twice always; each file against its checksum with data.verify
        dataset.verify(dataset.records, int(info.get("vae_temporal_factor") or 4), files=cfg.data.verify)
    rt.acc.wait_for_everyone()
    train_records, holdout = dataset.split(cfg.data.holdout, seed=cfg.data.holdout_seed)
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
    if cfg.validation.every and not holdout:
        logger.warning(
            "validation.every=%d but the holdout split is empty (data.holdout=%g): no validation",
            cfg.validation.every,
            cfg.data.holdout,
        )
    weights = dict(zip(lengths, cfg.data.weights or [1.0] * len(lengths)))
    sampler = BucketSampler({n: len(by_bucket[n]) for n in lengths}, weights, cfg.train.seed)
    null_text = dataset.null_text() if cfg.train.caption_dropout > 0 else None
    return TrainData(dataset, by_bucket, holdout, lengths, weights, sampler, null_text)


def _pick_transformer(cfg: TrainConfig, adapter: Any, family: str, pipe: Any) -> tuple[torch.nn.Module, Any, Any]:
    """The transformer to adapt; for a Wan2.2 expert also its noise range and ``(expert, timestep range)``."""
    if adapter.architecture != "wan22" or (getattr(pipe, "transformer_2", None) is None and not cfg.model.expert):
        return adapter.transformers(pipe)[0], None, None  # Wan2.2 TI2V-5B: one transformer, every noise level
    expert = cfg.model.expert or "high"
    try:
        transformer = adapter.expert_transformer(pipe, expert)
    except ValueError as exc:
        raise ConfigError(f"model.expert: {exc}") from None
    sigma_range = adapter.expert_sigma_range(pipe, expert)
    t_range = [round(x * fm.NUM_TRAIN_TIMESTEPS, 3) for x in sigma_range]
    logger.info("Wan2.2 A14B: training the %s-noise expert, timesteps in [%.1f, %.1f]", expert, *t_range)
    # no boundary: the high expert sees every noise level
    return transformer, (None if sigma_range == (0.0, 1.0) else sigma_range), (expert, t_range)


def _check_consistency_target(cfg: TrainConfig, adapter: Any, transformer: Any) -> None:
    """The consistency term compares a clip's base-length prefix with the base model's prediction for it, so the
    prefix must be a base-length clip: not so for a first-last-frame model, whose last frame moves with the length."""
    if cfg.train.consistency_weight > 0 and adapter.conditions_on_last_frame(transformer.config):
        raise ValueError(
            "train.consistency_weight: a first-last-frame model (Wan2.1-FLF2V) has no shorter clip inside a longer "
            "one (its last frame moves with the length), so the term has no base-length target; set it to 0"
        )


def setup_model(cfg: TrainConfig, rt: Runtime, data: TrainData, pipe: Any, state: dict | None) -> TrainModel:
    """Load the base through its family adapter, attach the LoRA (resumed weights before any sharding),
    install radial attention, then shard (FSDP) or wrap (DDP) for several processes."""
    from diffusers.training_utils import cast_training_params

    from radial_lora.models.builtin import model_identity
    from radial_lora.models.radial import apply_radial_attention
    from radial_lora.models.registry import detect_family, get_adapter

    family = cfg.model.family or detect_family(pipe if pipe is not None else cfg.model.id)
    check_expert_family(cfg.model.expert, family)  # the family may only be known now (auto-detected)
    if data.dataset.info.get("family") not in (None, family):
        raise ValueError(
            f"dataset {cfg.data.path} was prepared for family {data.dataset.info.get('family')!r}, model is {family!r}"
        )
    adapter = get_adapter(family)
    if pipe is None:  # training reads prepared latents: no text encoder or VAE unless samples are rendered
        skip = () if cfg.validation.sample_prompts else adapter.encoder_components
        logger.info("loading %s from %s%s", family, cfg.model.id, f" without {', '.join(skip)}" if skip else "")
        pipe = adapter.load_pipeline(cfg.model.id, torch_dtype=rt.weight_dtype, skip=skip)
    transformer, sigma_range, expert_meta = _pick_transformer(cfg, adapter, family, pipe)
    _check_consistency_target(cfg, adapter, transformer)
    sched_cfg = pipe.scheduler.config
    shift = cfg.model.flow_shift or float(sched_cfg.get("flow_shift") or sched_cfg.get("shift") or 1.0)
    sample_pipe = pipe if cfg.validation.sample_prompts else None  # its transformer is the one trained
    identity = model_identity(cfg.model.id, transformer.config)
    transformer.to(dtype=rt.weight_dtype)  # still on the host: placed on the device once the LoRA is on
    if rt.device.type == "cpu":
        _own_aligned_weights(transformer)
    lo = cfg.lora
    # The LoRA's random A matrices come from train.seed alone: before, they took whatever the global RNG held
    # after loading, so loading one component less (the text encoder's random init draws) changed the run.
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        params = lora_io.add_lora(
            transformer, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.targets
        )
    if state is not None:
        _load_lora_state(transformer, state)
    cast_training_params(transformer, dtype=torch.float32)  # the LoRA in fp32 even when the base is bf16
    place_base(cfg, rt, transformer)
    r = cfg.radial
    controller = apply_radial_attention(
        transformer,
        pattern=r.pattern,
        dense_layers=r.dense_layers,
        decay_factor=r.decay,
        block_size=r.block_size,
        backend=r.backend,
    )
    if rt.layout.sequence > 1:
        enable_sequence_parallel(transformer, rt.layout.sequence_group)
        logger.info(
            "sequence parallel: %s, each sample's tokens split %d ways", rt.layout.describe(), rt.layout.sequence
        )
    if cfg.train.gradient_checkpointing:
        offload = checkpoint_offloading() if cfg.train.offload_checkpoints else {}
        transformer.enable_gradient_checkpointing(**offload)
    transformer.train()
    lora_config = lora_io.adapter_config(transformer)
    fsdp = cfg.train.distributed == "fsdp" and rt.world > 1
    if fsdp:
        shard_model(transformer)
        params = [p for p in transformer.parameters() if p.requires_grad]  # now sharded DTensors
        here = sum(p.to_local().numel() for p in transformer.parameters())
        logger.info(
            "FSDP: transformer sharded over %d processes, %d of %d parameters held per process",
            rt.world,
            here,
            sum(p.numel() for p in transformer.parameters()),
        )
    elif cfg.train.distributed == "fsdp":
        logger.info("train.distributed='fsdp' with one process: nothing to shard")
    # DDP: torch's DistributedDataParallel averages the gradients while backward runs (the LoRA's only;
    # the frozen base has none); accumulation steps skip the sync (no_sync) until the last one.
    ddp = rt.world > 1 and not fsdp
    model = torch.nn.parallel.DistributedDataParallel(transformer, broadcast_buffers=False) if ddp else transformer
    return TrainModel(
        family,
        adapter,
        transformer,
        model,
        controller,
        params,
        lora_config,
        identity,
        shift,
        sigma_range,
        expert_meta,
        sample_pipe,
        fsdp,
        ddp,
    )


def place_base(cfg: TrainConfig, rt: Runtime, transformer: torch.nn.Module) -> None:
    """The frozen base in 8 bits (``model.base_quantization``), then on the device, but for the blocks swapped
    in from host memory (``train.blocks_to_swap``): both before the device sees the whole bf16 model."""
    from radial_lora.models.quantize import quantize_base, resolve_scheme
    from radial_lora.train.block_swap import enable_block_swap

    scheme = resolve_scheme(cfg.model.base_quantization)
    if scheme is not None:
        layers = quantize_base(transformer, scheme)
        logger.info("base weights: %d Linear layers of the blocks stored in %s (torchao weight-only)", layers, scheme)
    swap = cfg.train.blocks_to_swap
    if not swap:
        transformer.to(device=rt.device)
        return
    if rt.world > 1:
        raise ConfigError(
            f"train.blocks_to_swap={swap} is for one process (this job has {rt.world}): across GPUs use "
            "train.distributed='fsdp' instead"
        )
    try:
        enable_block_swap(transformer, swap, rt.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    logger.info("block swap: the last %d blocks' base weights in host memory, one at a time on %s", swap, rt.device)


def _load_lora_state(transformer: torch.nn.Module, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    sd = {k[len(lora_io.PREFIX) :]: v for k, v in state["lora_state"].items()}
    result = set_peft_model_state_dict(transformer, sd)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(
            f"checkpoint {state['path']} does not match this LoRA config: unexpected {result.unexpected_keys[:3]}"
        )


def setup_optimizer(cfg: TrainConfig, m: TrainModel) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = build_optimizer(cfg, m.params)
    s = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda k: lr_factor(k, total=cfg.train.steps, warmup=s.warmup_steps, name=s.name, min_ratio=s.min_lr_ratio),
    )
    return optimizer, scheduler


def restore(
    state: dict | None, rt: Runtime, data: TrainData, m: TrainModel, optimizer: Any, scheduler: Any, steps: int
) -> tuple[int, list[float]]:
    """Resume, part 2: optimizer (a full, name-keyed dict in the file, sharded under FSDP), schedule, sampler, RNG;
    returns the step reached and the losses so far."""
    if state is None:
        return 0, []
    load_optimizer_state(m.transformer, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data.sampler.load_state_dict(state["state"]["sampler"])
    rngs = state["rng"]
    ckpt.restore_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
    start = int(state["state"]["step"])
    logger.info("resumed from %s at step %d", state["path"], start)
    if start >= steps:
        logger.info("checkpoint step %d >= train.steps %d: nothing to train", start, steps)
    return start, list(state["state"]["losses"])


@dataclass
class StepStats:
    bucket: int
    loss: float
    consistency: float
    grad_norm: float
    clips: tuple[str, ...] = ()  # the ids of the step's clips (a NaN stop names them)


def train_step(cfg: TrainConfig, rt: Runtime, data: TrainData, m: TrainModel, step: int) -> StepStats:
    """Gradients of one optimizer step: the step's bucket and global batch, this process's clips in
    ``grad_accum`` micro-steps (per-sample noise from ``(seed, step, sample)``), the flow-matching loss plus
    the optional consistency term, then gradient averaging and clipping. The optimizer step is the caller's."""
    t = cfg.train
    bucket, idx = data.sampler.draw(step, t.batch_size)
    records = [data.by_bucket[bucket][i] for i in idx]
    n_base = 1 + (cfg.data.base_length - 1) // 4  # latent frames of the base length
    step_loss = torch.zeros((), device=rt.device)
    cons_loss = torch.zeros((), device=rt.device)
    with m.controller.training_mode():
        for a in range(t.grad_accum):
            # this data rank's samples (a sequence group's processes share them, token-split)
            first = (a * rt.layout.data + rt.layout.data_rank) * rt.micro
            mine = records[first : first + rt.micro]
            latents, text = collate([data.dataset.load(r) for r in mine], f"{cfg.data.path} bucket f{bucket}")
            gens = [sample_generator(t.seed, step, first + j) for j in range(rt.micro)]
            sigmas = torch.cat(
                [
                    fm.sample_sigmas(
                        1,
                        scheme=t.timestep_sampling,
                        shift=m.shift,
                        logit_mean=t.logit_mean,
                        logit_std=t.logit_std,
                        generator=g,
                        sigma_range=m.sigma_range,
                    )
                    for g in gens
                ]
            )
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
            if t.caption_dropout > 0:
                drop = [caption_dropped(t.seed, step, first + j, t.caption_dropout) for j in range(rt.micro)]
                text = drop_captions(text, data.null_text, drop)
            text = {k: v.to(rt.device) for k, v in text.items()}
            with m.model.no_sync() if m.ddp and a < t.grad_accum - 1 else nullcontext():
                with rt.acc.autocast():
                    fwd = fm.flow_step(m.adapter, m.model, latents.to(rt.device), text, sigmas, noise.to(rt.device))
                total = fwd.loss
                if t.consistency_weight > 0:  # a base-length clip is its own prefix: the base's prediction
                    with _base_model(m.transformer, m.controller), rt.acc.autocast():
                        prefix = m.adapter.prefix(text, n_base)  # an image's latents of the prefix alone
                        base = m.adapter.predict(m.transformer, fwd.noisy[:, :, :n_base], fwd.timesteps, prefix)
                    cons = torch.mean((fwd.prediction[:, :, :n_base].float() - base.float()) ** 2)
                    total = fwd.loss + t.consistency_weight * cons
                    cons_loss += cons.detach()
                # Unscaled: the gradients are summed over micro-steps and divided once below, so a step's
                # gradient is the same sum of per-sample terms for any split over processes and micro-steps.
                rt.acc.backward(total)
            step_loss += fwd.loss.detach()
    if t.grad_accum > 1:
        step_loss, cons_loss = step_loss / t.grad_accum, cons_loss / t.grad_accum
        for p in m.params:
            if p.grad is not None:
                p.grad.div_(t.grad_accum)
    if rt.world > 1:
        step_loss = rt.acc.reduce(step_loss, reduction="mean")
        cons_loss = rt.acc.reduce(cons_loss, reduction="mean")
    loss = float(step_loss)
    grad_norm = float("nan")
    if math.isfinite(loss):
        grad_norm = float(torch.nn.utils.clip_grad_norm_(m.params, t.grad_clip if t.grad_clip > 0 else float("inf")))
    return StepStats(bucket, loss, float(cons_loss), grad_norm, tuple(r.id for r in records))


def train(
    cfg: TrainConfig, resume: str | None = None, *, pipe: Any | None = None, overwrite: bool = False
) -> TrainResult:
    """Run (or continue) a training job described by ``cfg``; see the module docstring.

    ``pipe`` may be an already loaded pipeline (tests, demo); otherwise ``cfg.model.id`` is loaded. The job holds
    ``output_dir``'s lock (:func:`radial_lora.locks.job_lock`) from start to end: a second run into it stops at
    once. Without ``resume`` a run already there is kept: an error, or with ``overwrite`` moved aside first
    (:func:`claim_output`).
    """
    if resume is not None and overwrite:
        raise ValueError("--resume continues the run in output_dir and --overwrite moves it aside: give one of them")
    out = Path(cfg.output_dir)
    rt = setup_runtime(cfg)
    moved: list[Path | None] = []
    with locks.job_lock(out, "radial-lora train", setup=lambda: moved.append(claim_output(out, resume, overwrite))):
        return _run(cfg, rt, resume, pipe, moved[0] if moved else None)


def _run(cfg: TrainConfig, rt: Runtime, resume: str | None, pipe: Any | None, moved: Path | None) -> TrainResult:
    """The job, once it holds its output folder: setup, the loop, the export."""
    from accelerate.utils import set_seed

    out, t = Path(cfg.output_dir), cfg.train
    loggers = Loggers(cfg, out, rt.main)
    try:
        if moved is not None:
            logger.info("--overwrite: the earlier run in %s moved to %s", out, moved)
        if rt.main:
            record_config(out, cfg, resumed=resume is not None)
        set_seed(t.seed)
        data = setup_data(cfg, rt)
        state = None
        if resume:
            state, skipped = ckpt.find_resume(out, resume)
            if skipped and rt.main:
                logger.warning(
                    "--resume latest: resuming from %s; skipped the newer %s", state["path"].name, "; ".join(skipped)
                )
        m = setup_model(cfg, rt, data, pipe, state)
        del pipe
        optimizer, scheduler = setup_optimizer(cfg, m)
        start, losses = restore(state, rt, data, m, optimizer, scheduler, t.steps)
        checkpointer = Checkpointer(cfg, rt, data, m, optimizer, scheduler, losses)
        validator = Validator(cfg, rt, data, m, loggers)
        samples = SampleRenderer.maybe(cfg, rt, data, m, loggers)
        logger.info(
            "training %s LoRA: steps %d, global batch %d (%s; %d micro x %d accum), buckets %s weights %s, "
            "pattern %s, precision %s on %s",
            m.family,
            t.steps,
            t.batch_size,
            rt.layout.describe(),
            rt.micro,
            t.grad_accum,
            data.lengths,
            [data.weights[n] for n in data.lengths],
            cfg.radial.pattern,
            rt.mixed,
            rt.device,
        )
        heldout = None
        loggers.progress(t.steps, start)
        for step in range(start + 1, t.steps + 1):
            t0 = time.perf_counter()
            stats = train_step(cfg, rt, data, m, step)
            if not math.isfinite(stats.loss):
                raise TrainingDiverged(checkpointer.diverged_message(stats.loss, step, stats.bucket, stats.clips))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(stats.loss)
            loggers.step(
                step,
                stats,
                lr=scheduler.get_last_lr()[0],
                seconds=time.perf_counter() - t0,
                peak_memory_mb=process_peak_mb(rt.device),
            )
            if cfg.validation.every and step % cfg.validation.every == 0:
                heldout = validator(step)
            if samples is not None:
                samples.maybe_render(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != t.steps:
                checkpointer.save(step)
        if start < t.steps:
            checkpointer.save(t.steps)
        last = max(start, t.steps)
        lora_path = checkpointer.export(last)
    finally:
        loggers.close()
    return TrainResult(output_dir=out, lora_path=lora_path, losses=losses, last_step=last, heldout=heldout)
