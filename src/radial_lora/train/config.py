"""The typed training config: one dataclass per section, loaded from JSON or TOML, validated up front.

Every mistake is reported with its dotted key (``train.batch_size``) and what is allowed, before any
model is loaded: a typo in a 2500-step run should cost seconds, not a GPU hour. ``--set a.b=value``
overrides parse ``value`` as JSON (``--set train.steps=10``, ``--set data.lengths=[17,33]``) and fall
back to a plain string (``--set model.id=/models/wan``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radial_lora.constants import (
    ARCHITECTURE,
    BACKENDS,
    BASE_QUANTIZATIONS,
    DEFAULT_TARGETS,
    EXPERTS,
    FAMILIES,
    PATTERNS,
    TIMESTEP_SCHEMES,
)

DTYPES = ("auto", "bfloat16", "float16", "float32")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("cosine", "constant")
DISTRIBUTED = ("ddp", "fsdp")
IF_MISSING = ("error", "sample")
# Pixels per latent token side: VAE spatial factor 8 x patch 2 for Wan2.1/2.2 and HunyuanVideo.
SPATIAL_FACTOR = 16


@dataclass
class ModelSection:
    """Base model: a diffusers pipeline id or local path; family auto-detected when omitted."""

    id: str = ""
    family: str | None = None
    dtype: str = "auto"  # weights: auto = bfloat16 on GPU, float32 on CPU
    flow_shift: float | None = None  # None: the pipeline scheduler's shift
    expert: str | None = None  # wan22 only: "high" (transformer, default) or "low" (transformer_2)
    # The frozen transformer blocks' Linear weights in 8 bits (torchao weight-only, computed in model.dtype);
    # "8bit" = int8, the format measured closest to the bf16 base (docs/TRAINING.md, "One card")
    base_quantization: str = "none"


@dataclass
class DataSection:
    """Prepared dataset (``radial-lora data prepare``) and which length buckets to draw from."""

    path: str = ""
    lengths: list[int] = field(default_factory=list)  # frame buckets to train on; [] = all in the dataset
    weights: list[float] = field(default_factory=list)  # sampling weight per length; [] = equal
    base_length: int = 81  # frames the base model was trained for (Wan 81, HunyuanVideo 125)
    holdout: float = 0.0  # fraction of source videos kept out for validation
    holdout_seed: int = 0
    # No prepared dataset at ``path``: "error" (say which command makes one) or "sample" (write synthetic
    # sample videos beside it and prepare them with the model: the quick-test config, not for real training)
    if_missing: str = "error"
    # Check every clip before the first step: its file's sha256 against the manifest, its latent frames against
    # its bucket. A damaged or swapped latent stops the run naming the clip (costs one read of the dataset).
    verify: bool = True


@dataclass
class ResolutionSection:
    height: int = 480
    width: int = 832


@dataclass
class LoraSection:
    rank: int = 128
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class RadialSection:
    pattern: str = "radial"  # "dense" trains the same LoRA with full attention (the baseline)
    decay: float | None = None  # None = family default (Wan2.1 0.2, Wan2.2 0.8, HunyuanVideo 0.95)
    dense_layers: int = 2
    block_size: int | None = None  # None = family default (128; Wan2.2 64, as the authors' Wan2.2 code)
    backend: str = "auto"


@dataclass
class OptimizerSection:
    name: str = "adamw"  # "adamw8bit" needs bitsandbytes
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    fused: bool = False  # torch's fused AdamW kernel (CUDA)


@dataclass
class ScheduleSection:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainSection:
    steps: int = 2500
    batch_size: int = 8  # global batch per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    consistency_weight: float = 0.0  # 0 = off
    # Fraction of samples trained on the empty caption (the prepared dataset's null_text), as the base was
    # for classifier-free guidance: without it the unconditional branch never learns the new length.
    caption_dropout: float = 0.0
    distributed: str = "ddp"  # "ddp": full base per process; "fsdp": base (and LoRA) sharded over processes
    # Processes sharing one sample's tokens (Ulysses): activations per process / N. Processes = data x this.
    sequence_parallel: int = 1
    # Keep the checkpointed block inputs in host memory until backward (needs gradient_checkpointing).
    offload_checkpoints: bool = False
    # Keep the last N transformer blocks' frozen weights in (pinned) host memory, each copied in on a side
    # stream just before it runs, forward and backward (needs gradient_checkpointing; not with FSDP or SP).
    blocks_to_swap: int = 0


@dataclass
class CheckpointSection:
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 3


@dataclass
class ValidationSection:
    every: int = 0  # steps; 0 = off
    timesteps: list[float] = field(default_factory=lambda: [100.0, 300.0, 500.0, 700.0, 900.0])
    max_clips: int = 8
    seed: int = 0
    # Sample videos with the stock pipeline and the LoRA as trained (radial attention); no prompts = off.
    # Written every sample_every steps (0: at every validation step) and at the last step; prompt i
    # uses seed sample_seed + i (as `radial-lora generate`); lengths [] = the longest training length.
    sample_prompts: list[str] = field(default_factory=list)
    sample_lengths: list[int] = field(default_factory=list)  # frame counts, 4k+1
    sample_every: int = 0
    sample_steps: int = 20  # denoising steps per sample
    sample_guidance: float = 5.0  # classifier-free guidance scale (the pipeline's guidance_scale)
    sample_seed: int = 0
    sample_dense_timesteps: int | None = None  # None: round(0.04 x sample_steps), the paper's 2 of 50


@dataclass
class LoggingSection:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "radial-lora"
    every: int = 1


@dataclass
class TrainConfig:
    """The whole run. ``output_dir`` receives the LoRA, checkpoints, logs and the resolved config."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    resolution: ResolutionSection = field(default_factory=ResolutionSection)
    lora: LoraSection = field(default_factory=LoraSection)
    radial: RadialSection = field(default_factory=RadialSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    output_dir: str = "runs/lora"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


# --- building from plain data ------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        bad = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown key(s) {bad}; allowed in {where}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def check_expert_family(expert: str | None, family: str) -> None:
    """``model.expert`` picks one of Wan2.2 A14B's two experts; other families have one transformer."""
    _check(
        expert is None or ARCHITECTURE.get(family) == "wan22",
        "model.expert",
        f"{expert!r} is only for model.family 'wan22' or 'wan22-i2v' (Wan2.2 A14B's high/low-noise experts); "
        f"the {family!r} model has one transformer - remove model.expert",
    )


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise :class:`ConfigError` naming the first impossible value (section by section); returns ``cfg``."""
    for check in (
        _validate_model,
        _validate_data,
        _validate_resolution,
        _validate_lora,
        _validate_radial,
        _validate_optimizer,
        _validate_schedule,
        _validate_train,
        _validate_outputs,
    ):
        check(cfg)
    return cfg


def _validate_model(cfg: TrainConfig) -> None:
    """The ``model`` checks of :func:`validate`."""
    m = cfg.model
    _check(bool(m.id), "model.id", "required: a diffusers pipeline id or local directory")
    if m.family is not None:
        _one_of(m.family, FAMILIES, "model.family")
    _one_of(m.dtype, DTYPES, "model.dtype")
    _check(m.flow_shift is None or m.flow_shift > 0, "model.flow_shift", "must be > 0")
    _one_of(m.base_quantization, BASE_QUANTIZATIONS, "model.base_quantization")
    if m.expert is not None:
        _one_of(m.expert, EXPERTS, "model.expert")
        if m.family is not None:
            check_expert_family(m.expert, m.family)


def _validate_data(cfg: TrainConfig) -> None:
    """The ``data`` checks of :func:`validate`."""
    d = cfg.data
    _check(bool(d.path), "data.path", "required: a folder written by `radial-lora data prepare`")
    for i, n in enumerate(d.lengths):
        _check(n >= 1 and (n - 1) % 4 == 0, f"data.lengths[{i}]", f"{n} frames is not 4k+1 (e.g. 81, 161, 321)")
    _check(len(set(d.lengths)) == len(d.lengths), "data.lengths", "contains duplicates")
    _check(
        d.base_length >= 1 and (d.base_length - 1) % 4 == 0, "data.base_length", f"{d.base_length} frames is not 4k+1"
    )
    if d.lengths:
        _check(
            max(d.lengths) > d.base_length,
            "data.lengths",
            f"no length is longer than data.base_length={d.base_length}: nothing to extend to",
        )
    if d.weights:
        _check(
            len(d.weights) == len(d.lengths),
            "data.weights",
            f"has {len(d.weights)} entries but data.lengths has {len(d.lengths)}",
        )
        for i, w in enumerate(d.weights):
            _check(w >= 0, f"data.weights[{i}]", f"{w} is negative")
        _check(sum(d.weights) > 0, "data.weights", "all zero")
    _check(0.0 <= d.holdout < 1.0, "data.holdout", f"{d.holdout} must be in [0, 1)")
    _one_of(d.if_missing, IF_MISSING, "data.if_missing")
    _check(d.if_missing != "sample" or bool(d.lengths), "data.lengths", "data.if_missing='sample' needs the lengths")


def _validate_resolution(cfg: TrainConfig) -> None:
    """The ``resolution`` checks of :func:`validate`."""
    r = cfg.resolution
    for key, px in (("resolution.height", r.height), ("resolution.width", r.width)):
        _check(
            px > 0 and px % SPATIAL_FACTOR == 0,
            key,
            f"{px} is not a positive multiple of {SPATIAL_FACTOR} (VAE 8 x patch 2)",
        )


def _validate_lora(cfg: TrainConfig) -> None:
    """The ``lora`` checks of :func:`validate`."""
    lo = cfg.lora
    _check(lo.rank >= 1, "lora.rank", f"{lo.rank} must be >= 1")
    _check(lo.alpha is None or lo.alpha > 0, "lora.alpha", "must be > 0 (or null for alpha = rank)")
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", f"{lo.dropout} must be in [0, 1)")
    _check(bool(lo.targets) and all(lo.targets), "lora.targets", "give module name suffixes, e.g. ['to_q','to_k']")


def _validate_radial(cfg: TrainConfig) -> None:
    """The ``radial`` checks of :func:`validate`."""
    ra = cfg.radial
    _one_of(ra.pattern, PATTERNS, "radial.pattern")
    _check(ra.decay is None or ra.decay > 0, "radial.decay", "must be > 0 (or null for the family default)")
    _check(ra.dense_layers >= 0, "radial.dense_layers", "must be >= 0")
    _check(ra.block_size is None or ra.block_size >= 1, "radial.block_size", "must be >= 1 (the kernels use 64 or 128)")
    _one_of(ra.backend, BACKENDS, "radial.backend")


def _validate_optimizer(cfg: TrainConfig) -> None:
    """The ``optimizer`` checks of :func:`validate`."""
    o = cfg.optimizer
    _one_of(o.name, OPTIMIZERS, "optimizer.name")
    if o.name == "adamw8bit":
        _check(
            importlib.util.find_spec("bitsandbytes") is not None,
            "optimizer.name",
            "'adamw8bit' needs bitsandbytes, which is not installed (pip install bitsandbytes, CUDA only) "
            "- or use 'adamw'",
        )
    _check(o.lr > 0, "optimizer.lr", f"{o.lr} must be > 0")
    _check(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        "optimizer.betas",
        f"{o.betas} must be two numbers in [0, 1)",
    )
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(o.eps > 0, "optimizer.eps", "must be > 0")


def _validate_schedule(cfg: TrainConfig) -> None:
    """The ``schedule`` checks of :func:`validate`."""
    s = cfg.schedule
    _one_of(s.name, SCHEDULES, "schedule.name")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", f"{s.warmup_steps} must be >= 0")
    _check(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")


def _validate_train(cfg: TrainConfig) -> None:
    """The ``train`` checks of :func:`validate`."""
    t, o = cfg.train, cfg.optimizer
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(
        t.batch_size % t.grad_accum == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
    )
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    _one_of(t.precision, PRECISIONS, "train.precision")
    _one_of(t.timestep_sampling, TIMESTEP_SCHEMES, "train.timestep_sampling")
    _check(t.logit_std > 0, "train.logit_std", "must be > 0")
    _check(t.consistency_weight >= 0, "train.consistency_weight", "must be >= 0 (0 = off)")
    _check(0 <= t.caption_dropout < 1, "train.caption_dropout", "must be in [0, 1) (0 = off; the base models use 0.1)")
    _one_of(t.distributed, DISTRIBUTED, "train.distributed")
    _check(t.sequence_parallel >= 1, "train.sequence_parallel", "must be >= 1 (1 = off)")
    _check(
        not t.offload_checkpoints or t.gradient_checkpointing,
        "train.offload_checkpoints",
        "offloads the inputs gradient checkpointing keeps: set train.gradient_checkpointing=true too",
    )
    _validate_block_swap(t)
    _check(
        t.distributed != "fsdp" or o.name == "adamw",
        "train.distributed",
        "'fsdp' needs optimizer.name 'adamw' (bitsandbytes' 8-bit AdamW does not take sharded parameters)",
    )


def _validate_block_swap(t: TrainSection) -> None:
    """``train.blocks_to_swap``: one GPU's feature (FSDP already shards the weights; SP is not tested with it)."""
    _check(t.blocks_to_swap >= 0, "train.blocks_to_swap", f"{t.blocks_to_swap} must be >= 0 (0 = off)")
    if not t.blocks_to_swap:
        return
    _check(
        t.gradient_checkpointing,
        "train.blocks_to_swap",
        "needs train.gradient_checkpointing=true (without it autograd keeps every block's weights for backward, "
        "so none would leave the GPU)",
    )
    _check(
        t.distributed != "fsdp",
        "train.blocks_to_swap",
        "does not combine with train.distributed='fsdp' (FSDP shards the weights already): use one of the two",
    )
    _check(
        t.sequence_parallel == 1,
        "train.blocks_to_swap",
        "does not combine with train.sequence_parallel > 1: set one of them (block swap is for one GPU)",
    )


def _validate_outputs(cfg: TrainConfig) -> None:
    """The ``checkpoint, validation, logging, output_dir`` checks of :func:`validate`."""
    c, v, lg = cfg.checkpoint, cfg.validation, cfg.logging
    _check(c.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(v.every >= 0, "validation.every", "must be >= 0 (0 = off)")
    _check(
        bool(v.timesteps) and all(0 < x <= 1000 for x in v.timesteps),
        "validation.timesteps",
        "must be a non-empty list of values in (0, 1000]",
    )
    _check(v.max_clips >= 1, "validation.max_clips", "must be >= 1")
    for i, prompt in enumerate(v.sample_prompts):
        _check(bool(prompt.strip()), f"validation.sample_prompts[{i}]", "is empty; write a prompt or drop it")
    for i, n in enumerate(v.sample_lengths):
        _check(
            n >= 1 and (n - 1) % 4 == 0,
            f"validation.sample_lengths[{i}]",
            f"{n} frames is not 4k+1 (e.g. 81, 161, 321)",
        )
    _check(len(set(v.sample_lengths)) == len(v.sample_lengths), "validation.sample_lengths", "has duplicates")
    _check(v.sample_every >= 0, "validation.sample_every", "must be >= 0 (0 = at every validation step)")
    _check(v.sample_steps >= 1, "validation.sample_steps", f"{v.sample_steps} must be >= 1")
    _check(v.sample_guidance >= 0, "validation.sample_guidance", f"{v.sample_guidance} must be >= 0")
    if v.sample_dense_timesteps is not None:
        _check(
            0 <= v.sample_dense_timesteps <= v.sample_steps,
            "validation.sample_dense_timesteps",
            f"{v.sample_dense_timesteps} must be in [0, validation.sample_steps={v.sample_steps}] "
            "(or null for the paper's rule)",
        )
    _check(lg.every >= 1, "logging.every", "must be >= 1")
    if lg.wandb:
        _check(
            importlib.util.find_spec("wandb") is not None,
            "logging.wandb",
            "wandb is not installed (pip install wandb) - or set it to false",
        )
    _check(bool(cfg.output_dir), "output_dir", "required")


def sample_dense_timesteps(v: ValidationSection) -> int:
    """Dense denoising steps of a validation sample: the configured number, else the paper's rule for an
    extended length with its LoRA (2 of 50 steps) scaled to ``sample_steps``."""
    if v.sample_dense_timesteps is not None:
        return v.sample_dense_timesteps
    return round(0.04 * v.sample_steps)


def sample_every(v: ValidationSection) -> int:
    """Steps between validation samples (0: only at the last step); sampling is off without prompts."""
    return v.sample_every or v.every


# --- files and overrides ------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as JSON, else the raw string)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in the raw config dict (sections are created as needed; validation follows)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse ({exc})") from exc


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate (no file I/O); keys starting with '_' (comments) are ignored."""
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return validate(_build(TrainConfig, data, ""))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read JSON or TOML, apply ``--set`` overrides, build and validate. Relative paths stay as written."""
    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
