"""Per-GPU memory of a LoRA training step, before renting the GPUs (``radial-lora plan``).

Why: the paper's flagship runs do not fit one GPU's memory without sequence parallelism, and finding that
out on a rented 8-GPU node costs an hour. Every term is per process: weights and LoRA state divide by the
FSDP processes, every per-token activation term by the sequence-parallel degree (each process holds 1/N of
the tokens; inside attention it holds all tokens of 1/N of the heads, the same bytes).

The activation model is linear in tokens, width, FFN width, heads and LoRA rank. Its coefficients were fitted
to the bytes autograd keeps for backward in the real diffusers blocks (bf16 base, fp32 LoRA on q/k/v/out,
counted exactly by :func:`saved_activation_bytes` at small widths: ``benchmarks/memory_model.py`` refits them);
``tests/test_memory_plan.py`` checks the model against the same count at four configs the fit did not see.
The transient gradients of the block being back-propagated are the one estimated term (not measured here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from radial_lora.models.published import build_transformer, describe_model, patch_of
from radial_lora.models.quantize import DEFAULT_8BIT, WeightShape, block_weight_shapes, resolve_scheme
from radial_lora.models.registry import get_adapter

GIB = 2**30
BF16 = 2  # bytes per element of the frozen base, its activations and its checkpointed block inputs
LORA_STATE = 16  # fp32 LoRA weight + gradient + AdamW's two moments, bytes per LoRA parameter
CUDA_RESERVE = 1.5 * GIB  # CUDA context, NCCL buffers, cuBLAS workspace
FRAGMENTATION = 1.10  # caching-allocator slack over the live bytes

# Fitted coefficients (bytes), ``benchmarks/memory_model.py`` (worst residual 0.3% over 13 configs), of the
# :func:`features` below. Keys: the block kind, and "outside" (everything kept outside the blocks, the loss
# included) with and without gradient checkpointing.
COEFFICIENTS: dict[str, dict[str, float]] = {
    "wan": {"T*h": 40.046, "T*f": 2.007, "T*r": 12.843, "T*H": 10.9, "X*h": 8.245, "X*r": 2.844, "X*f": -0.026},
    "wan-outside": {"T*h": -0.002, "T*C": 15.999, "T*D": 4.002, "X*h": 1.999, "X*r": -0.082, "X*X*H": 0.001},
    "wan-outside-checkpointing": {
        "T*h": 4.026, "T*C": 16.151, "T*D": -0.003, "X*h": 1.964, "X*r": 2.611, "X*X*H": -0.015,
    },
    "double": {"T*h": 26.037, "T*f": 2.001, "T*r": 7.932, "T*H": 13.848, "X*h": 24.099, "X*r": 2.926, "X*f": 1.995},
    "single": {"T*h": 24.001, "T*f": 2.002, "T*r": 5.852, "T*H": 13.755, "X*h": 24.123, "X*r": 8.681, "X*f": 1.985},
    "hunyuan-outside": {"T*h": 0.008, "T*C": 16.061, "T*D": 7.971, "X*h": 22.016, "X*r": 8.749, "X*X*H": 2.002},
    "hunyuan-outside-checkpointing": {
        "T*h": 2.019, "T*C": 16.157, "T*D": -0.028, "X*h": 21.993, "X*r": 10.212, "X*X*H": 1.994,
    },
}  # fmt: skip
BLOCK_FEATURES = ("T*h", "T*f", "T*r", "T*H", "X*h", "X*r", "X*f")
OUTSIDE_FEATURES = ("T*h", "T*C", "T*D", "X*h", "X*r", "X*X*H")  # X*X*H: HunyuanVideo's text refiner attention


def features(
    tokens: float, text: float, *, hidden: int, ffn: int, rank: int, heads: int, head_dim: int, channels: int
) -> dict[str, float]:
    """The model's variables: per video token T and per text token X, times width h, FFN width f, LoRA rank r,
    heads H, head dim D, latent channels C."""
    t, x = tokens, text
    return {
        "T*h": t * hidden, "T*f": t * ffn, "T*r": t * rank, "T*H": t * heads, "T*D": t * head_dim,
        "T*C": t * channels, "X*h": x * hidden, "X*r": x * rank, "X*f": x * ffn, "X*X*H": x * x * heads,
    }  # fmt: skip


@dataclass(frozen=True)
class Dims:
    """What the memory of a transformer depends on, read from its diffusers config."""

    family: str  # the memory model's kind: "wan" (Wan2.1 and Wan2.2) or "hunyuan" (HunyuanVideo and 1.5)
    blocks: int  # Wan blocks, or HunyuanVideo double-stream blocks
    single_blocks: int  # HunyuanVideo single-stream blocks (0 for Wan and HunyuanVideo 1.5)
    heads: int
    head_dim: int
    ffn: int
    in_channels: int
    patch: tuple[int, int, int]
    text_tokens: int  # the pipeline's text length (Wan pads to 512; HunyuanVideo's Llama prompt is 256)
    params: int  # parameters of one transformer
    block_params: int  # parameters of the largest block (what FSDP gathers at once)
    lora_width: int  # sum of (in + out) features over the LoRA's target projections: LoRA params = rank x this
    experts: int = 1  # Wan2.2 A14B: two transformers (one trained per run; both loaded to sample)
    block_shapes: tuple[WeightShape, ...] = ()  # per block in execution order: the 8-bit and block-swap terms

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def kept_bytes(kind: str, tokens: float, text: float, d: Dims, rank: int) -> float:
    """Bytes kept for backward by one block of ``kind`` ("wan", "double", "single"; what its recompute holds
    under gradient checkpointing) or outside the blocks ("wan-outside", "hunyuan-outside-checkpointing", ...)."""
    v = features(
        tokens, text, hidden=d.hidden, ffn=d.ffn, rank=rank, heads=d.heads, head_dim=d.head_dim, channels=d.in_channels
    )
    return sum(c * v[k] for k, c in COEFFICIENTS[kind].items())


# -- the plan --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The per-GPU estimate of one training step, by part (bytes), and whether it fits."""

    model: str
    tokens: int  # video tokens of one sample
    gpus: int
    sequence_parallel: int
    fsdp: bool
    checkpointing: bool
    offload: bool
    gpu_memory_bytes: float
    parts: dict[str, float]
    peak_bytes_per_gpu: float
    fits: bool
    host_bytes: float = 0.0  # offloaded block inputs and swapped blocks' weights, per process
    quantization: str | None = None  # "int8" / "float8": the blocks' Linear weights in 8 bits
    blocks_to_swap: int = 0
    blocks: int = 0  # transformer blocks (what block swap may move)
    frames: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """The training-config keys of this plan's memory settings."""
        return {
            "train.gradient_checkpointing": self.checkpointing,
            "train.offload_checkpoints": self.offload,
            "model.base_quantization": self.quantization or "none",
            "train.blocks_to_swap": self.blocks_to_swap,
        }


def estimate(
    d: Dims,
    *,
    model: str,
    frames: int,
    height: int,
    width: int,
    gpus: int,
    gpu_memory_gb: float,
    sequence_parallel: int = 1,
    rank: int = 128,
    fsdp: bool | None = None,
    checkpointing: bool = True,
    offload: bool = False,
    micro_batch: int = 1,
    vae: tuple[int, int] = (4, 8),
    quantization: str | None = None,
    blocks_to_swap: int = 0,
) -> Plan:
    """The per-GPU peak of a step with ``micro_batch`` samples per data-parallel rank."""
    if blocks_to_swap and (gpus > 1 or sequence_parallel > 1):
        raise ValueError("train.blocks_to_swap is for one GPU: not with several processes (FSDP, DDP) or SP")
    if blocks_to_swap and not checkpointing:
        raise ValueError("train.blocks_to_swap needs gradient checkpointing")
    tokens = video_tokens(d, frames, height, width, vae)
    n = sequence_parallel
    fsdp = gpus > 1 if fsdp is None else fsdp
    shards = gpus if fsdp else 1
    t = micro_batch * tokens / n  # video tokens held per process
    x = micro_batch * d.text_tokens  # text: whole on every process
    lora_params = lora_parameters(d, rank)
    kinds = ["wan"] if d.family == "wan" else ["double", "single"]
    counts = [d.blocks] if d.family == "wan" else [d.blocks, d.single_blocks]
    per_block = {k: kept_bytes(k, t, x, d, rank) for k in kinds}
    stream = (t + (x if d.family == "hunyuan" else 0)) * d.hidden * BF16  # one block's checkpointed input
    outside_kind = f"{d.family}-outside" + ("-checkpointing" if checkpointing else "")
    weights_here, weights_host = weight_bytes(d, quantization, blocks_to_swap)
    parts = {
        "weights": weights_here / shards + (2 * d.block_params * BF16 if fsdp else 0),
        "lora_and_optimizer": lora_params * LORA_STATE / shards,
        "checkpointed_inputs": (0.0 if offload else sum(counts) * stream) if checkpointing else 0.0,
        "block_activations": max(per_block.values())
        if checkpointing
        else sum(c * per_block[k] for k, c in zip(kinds, counts)),
        "attention_exchange": (4 * t * d.hidden * BF16) if n > 1 else 0.0,
        "backward_transient": t * (8 * d.hidden + 2 * d.ffn),
        "outside_blocks": kept_bytes(outside_kind, t, x, d, rank),
    }
    peak = sum(parts.values())
    memory = gpu_memory_gb * 1e9
    notes = []
    if d.experts > 1:
        notes.append("two experts: one is trained per run (model.expert); the other is not loaded")
    return Plan(
        model=model,
        tokens=tokens,
        gpus=gpus,
        sequence_parallel=n,
        fsdp=fsdp,
        checkpointing=checkpointing,
        offload=offload,
        gpu_memory_bytes=memory,
        parts=parts,
        peak_bytes_per_gpu=peak,
        fits=peak * FRAGMENTATION + CUDA_RESERVE <= memory,
        host_bytes=(sum(counts) * stream if (checkpointing and offload) else 0.0) + weights_host,
        notes=notes,
        quantization=quantization,
        blocks_to_swap=blocks_to_swap,
        blocks=sum(counts),
        frames=frames,
    )


SWAP_BUFFERS = 2  # swapped blocks on the GPU at once: the one running and the one being prefetched


def weight_bytes(d: Dims, quantization: str | None = None, blocks_to_swap: int = 0) -> tuple[int, int]:
    """``(on the GPU, in host memory)`` bytes of the frozen base: bf16, or the blocks' Linear weights in 8 bits
    with their per-row scales (``models/quantize.py``); the last ``blocks_to_swap`` blocks in host memory but
    for the two a step holds at once (the LoRA is counted apart)."""
    shapes = d.block_shapes or (WeightShape(d.params, 0, 0),)
    outside = (d.params - sum(s.params for s in shapes)) * BF16
    per_block = [s.bytes(quantization, BF16) for s in shapes]
    swapped = per_block[len(per_block) - blocks_to_swap :] if blocks_to_swap else []
    resident = outside + sum(per_block) - sum(swapped)
    return resident + min(SWAP_BUFFERS, len(swapped)) * max(swapped, default=0), sum(swapped)


def video_tokens(d: Dims, frames: int, height: int, width: int, vae: tuple[int, int]) -> int:
    """Video tokens of one ``frames x height x width`` clip (latent frames ``1 + (frames-1)/t``)."""
    t, s = vae
    pt, ph, pw = d.patch
    return (1 + (frames - 1) // t) // pt * (height // s // ph) * (width // s // pw)


def lora_parameters(d: Dims, rank: int) -> int:
    return rank * d.lora_width


def sequence_degrees(d: Dims, gpus: int, tokens: int) -> list[int]:
    """Sequence-parallel degrees that divide the GPUs, the heads and the tokens."""
    return [n for n in range(1, gpus + 1) if gpus % n == 0 and d.heads % n == 0 and tokens % n == 0]


def smallest_fitting_degree(d: Dims, base: Plan, make: Callable[..., Plan]) -> int | None:
    """The smallest sequence-parallel degree the GPUs, heads and tokens allow whose plan fits (``make`` is
    :func:`estimate` with the base inputs and the given changes)."""
    return next((n for n in sequence_degrees(d, base.gpus, base.tokens) if make(sequence_parallel=n).fits), None)


def advise(base: Plan, make: Callable[..., Plan], smallest: int | None) -> list[str]:
    """The smallest switches that make a plan that does not fit, fit (``smallest``: the smallest fitting
    sequence-parallel degree)."""
    if base.fits:
        return []
    tips = []
    if smallest is not None and smallest > base.sequence_parallel:
        peak = make(sequence_parallel=smallest).peak_bytes_per_gpu
        tips.append(f"train.sequence_parallel={smallest} fits ({peak / GIB:.1f} GiB)")
    if not base.checkpointing and make(checkpointing=True).fits:
        tips.append("train.gradient_checkpointing=true fits")
    if base.checkpointing and not base.offload and make(offload=True).fits:
        tips.append("train.offload_checkpoints=true fits")
    if base.gpus == 1 and base.quantization is None and make(quantization=DEFAULT_8BIT).fits:
        tips.append("model.base_quantization=8bit fits")
    swap = smallest_fitting_swap(base, make) if base.gpus == 1 and base.checkpointing else None
    if swap:
        tips.append(f"train.blocks_to_swap={swap} fits")
    together = cheapest_fitting(make, base.blocks) if not tips and base.gpus == 1 else None
    if together is not None:
        keys = " ".join(
            f"{k}={v}".replace("True", "true").replace("False", "false") for k, v in together.settings().items()
        )
        tips.append(f"{keys} fits ({together.peak_bytes_per_gpu / GIB:.1f} GiB)")
    if not tips:
        tips.append("does not fit with any sequence-parallel degree the GPUs and heads allow: more GPUs, fewer frames")
    return tips


def smallest_fitting_swap(base: Plan, make: Callable[..., Plan]) -> int | None:
    """The fewest swapped blocks whose plan fits (one GPU, checkpointing), or None."""
    return next((n for n in range(1, base.blocks) if make(blocks_to_swap=n).fits), None)


# The single-card ladder of --max-frames, least intrusive first: each step costs time (offload, swap) or
# a little accuracy (8 bits, int8: benchmarks/RESULTS.md); swapping goes last as it moves the most bytes.
LADDER: tuple[dict[str, Any], ...] = (
    {"checkpointing": True},
    {"checkpointing": True, "offload": True},
    {"checkpointing": True, "offload": True, "quantization": DEFAULT_8BIT},
)


def cheapest_fitting(make: Callable[..., Plan], blocks: int) -> Plan | None:
    """The first plan of :data:`LADDER` that fits, then the last rung with the fewest swapped blocks that fits."""
    for settings in LADDER:
        plan = make(**settings)
        if plan.fits:
            return plan
    last = LADDER[-1]
    return next((p for n in range(1, blocks) if (p := make(**last, blocks_to_swap=n)).fits), None)


def max_frames(make: Callable[..., Plan], blocks: int, temporal: int = 4, limit: int = 2001) -> Plan | None:
    """The longest clip (``temporal k + 1`` frames, up to ``limit``) one GPU trains, with the cheapest settings
    that fit it (``make(frames=..., **settings)`` is :func:`estimate`); None when not even the shortest fits."""
    most = {**LADDER[-1], "blocks_to_swap": max(blocks - 1, 0)}
    fits = lambda k: make(frames=temporal * k + 1, **most).fits  # noqa: E731
    if not fits(0):
        return None
    low, high = 0, (limit - 1) // temporal
    while low < high:  # the peak grows with the frames: the largest k that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    frames = temporal * low + 1
    return cheapest_fitting(lambda **kw: make(frames=frames, **kw), blocks)


# -- the models ----------------------------------------------------------------------------------------
def _lora_width(model: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """``in + out`` features summed over the Linear layers PEFT would target (names ending in a target)."""
    return sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def dims_of(family: str, config: dict[str, Any], experts: int = 1, targets: tuple[str, ...] | None = None) -> Dims:
    """:class:`Dims` of a transformer config of ``family``; parameter counts from the real class built on the
    meta device. HunyuanVideo 1.5's double-stream blocks are HunyuanVideo's (joint attention, GELU MLPs): it
    takes the fitted "double" and "hunyuan-outside" terms, with its 1985 joint text tokens."""
    from radial_lora.constants import DEFAULT_TARGETS

    model = build_transformer(family, config)
    blocks = [m for name, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]
    block_params = max(sum(p.numel() for p in b.parameters()) for mods in blocks for b in mods)
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    kind = "wan" if get_adapter(family).architecture in ("wan", "wan22") else "hunyuan"
    if kind == "wan":
        ffn, single = int(config["ffn_dim"]), 0
    else:
        ffn, single = int(heads * head_dim * config.get("mlp_ratio", 4.0)), int(config.get("num_single_layers", 0))
    return Dims(
        family=kind,
        blocks=int(config["num_layers"]),
        single_blocks=single,
        heads=heads,
        head_dim=head_dim,
        ffn=ffn,
        in_channels=int(config["in_channels"]),
        patch=patch_of(config),
        text_tokens=get_adapter(family).max_sequence_length,
        params=sum(p.numel() for p in model.parameters()),
        block_params=block_params,
        lora_width=_lora_width(model, tuple(targets or DEFAULT_TARGETS)),
        experts=experts,
        block_shapes=tuple(block_weight_shapes(model)),
    )


def resolve_model(model: str, targets: tuple[str, ...] | None = None) -> tuple[Dims, tuple[int, int]]:
    """A published hub id (no download) or a local pipeline / transformer folder -> dims and VAE factors."""
    found = describe_model(model)
    return dims_of(found.family, found.transformer, found.experts, targets), found.vae


def plan_for_config(cfg: Any, gpus: int, gpu_memory_gb: float) -> Plan:
    """The plan of a training config (its model, longest length, resolution, LoRA, parallel and memory
    switches) on ``gpus`` GPUs of ``gpu_memory_gb``."""
    dims, kwargs = config_plan_inputs(cfg, gpus, gpu_memory_gb)
    return estimate(dims, **kwargs)


def config_plan_inputs(cfg: Any, gpus: int, gpu_memory_gb: float) -> tuple[Dims, dict[str, Any]]:
    """:func:`estimate`'s inputs for a training config."""
    from radial_lora.parallel import check_layout

    t = cfg.train
    check_layout(gpus, t.sequence_parallel)
    dims, vae = resolve_model(cfg.model.id, tuple(cfg.lora.targets))
    data = gpus // t.sequence_parallel
    micro = max(1, t.batch_size // t.grad_accum // data)
    return dims, dict(
        model=cfg.model.id,
        frames=max(cfg.data.lengths),
        height=cfg.resolution.height,
        width=cfg.resolution.width,
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        sequence_parallel=t.sequence_parallel,
        rank=cfg.lora.rank,
        fsdp=t.distributed == "fsdp" and gpus > 1,
        checkpointing=t.gradient_checkpointing,
        offload=t.offload_checkpoints,
        micro_batch=micro,
        vae=vae,
        quantization=resolve_scheme(cfg.model.base_quantization),
        blocks_to_swap=t.blocks_to_swap,
    )


# -- measuring what the model predicts ---------------------------------------------------------------------
def saved_activation_bytes(model: torch.nn.Module, step: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``step()`` runs (parameters excluded):
    exact, unlike a process's resident set, so the fitted model can be checked to the byte."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def measure_step(
    family: str, config: dict[str, Any], *, frames: int, side: int, rank: int, text: int, checkpointing: bool
) -> tuple[int, int]:
    """``(saved bytes, video tokens)`` of a real training forward (bf16 base, fp32 LoRA rank ``rank`` on
    q/k/v/out, radial attention, flow-matching loss) at ``frames`` latent frames of ``side x side``."""
    from radial_lora import lora
    from radial_lora.models.radial import apply_radial_attention
    from radial_lora.train.flow_matching import flow_step

    torch.manual_seed(0)
    model = build_transformer(family, config, "cpu").to(torch.bfloat16)
    model.requires_grad_(False)
    lora.add_lora(model, rank=rank)
    apply_radial_attention(model, block_size=128)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    latent = config["out_channels"] if family == "hunyuan15" else config["in_channels"]  # 1.5: 32 of its 65 in
    x0 = torch.randn(1, int(latent), frames, side, side)
    width = config.get("text_dim") or config.get("text_embed_dim")
    cond = {"encoder_hidden_states": torch.randn(1, text, width, dtype=torch.bfloat16)}
    if family == "hunyuan":
        cond["encoder_attention_mask"] = torch.ones(1, text, dtype=torch.long)
        cond["pooled_projections"] = torch.randn(1, config["pooled_projection_dim"], dtype=torch.bfloat16)
    if family == "hunyuan15":  # ``text`` counts all three parts; predict adds the 729 (zero) image tokens
        qwen, byt5 = text - 256 - 729, 256
        cond["encoder_hidden_states"] = cond["encoder_hidden_states"][:, :qwen]
        cond["encoder_attention_mask"] = torch.ones(1, qwen)
        cond["encoder_hidden_states_2"] = torch.randn(1, byt5, config["text_embed_2_dim"], dtype=torch.bfloat16)
        cond["encoder_attention_mask_2"] = torch.ones(1, byt5)
    adapter = get_adapter(family)
    sigmas, noise = torch.tensor([0.5]), torch.randn_like(x0)
    saved = saved_activation_bytes(model, lambda: flow_step(adapter, model, x0, cond, sigmas, noise).loss)
    pt, ph, pw = adapter.patch_size(model)
    return saved, (frames // pt) * (side // ph) * (side // pw)
