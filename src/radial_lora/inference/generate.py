"""Generate videos with the stock diffusers pipeline under radial (or dense) attention, plus LoRAs.

One call loads (or reuses) a pipeline, loads LoRAs with the stock ``pipe.load_lora_weights`` and
``set_adapters``, patches attention with :func:`radial_lora.models.apply_radial_attention`, runs the
stock ``pipe(...)`` with a seeded CPU generator (same noise on every device) and writes, per prompt,
``NAME.mp4`` and a ``NAME.json`` sidecar holding every setting, the wall time, the peak memory and
the attention density and FLOPs. A LoRA trained by radial-lora carries its attention settings in its
header (:func:`radial_lora.lora.read_lora_metadata`); they become the defaults unless overridden.

A call holds its output folder's lock (:mod:`radial_lora.locks`) and never replaces a video made with other
settings unasked: that is an error naming the file and the first difference, or with ``overwrite`` the old
files move to ``previous/<time>/`` (:func:`radial_lora.files.set_aside`). Every LoRA is read whole first, so a
truncated or damaged file is one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radial_lora.files import atomic_path, jsonable, set_aside, write_json_atomic
from radial_lora.locks import job_lock
from radial_lora.lora import check_lora, lora_attention_settings, lora_digest, lora_expert, read_lora_metadata
from radial_lora.mask import attention_cost, radial_block_mask
from radial_lora.memory import peak_memory

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "radial-lora-generation/1"
ATTENTION_KEYS = ("pattern", "decay_factor", "block_size", "dense_layers", "dense_timesteps")
# Used when neither the user nor a LoRA's metadata says otherwise (decay: the family default).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "pattern": "radial",
    "decay_factor": None,
    "block_size": None,  # the family's (128; Wan2.2 64)
    "dense_layers": 0,
    "dense_timesteps": 0,
}


@dataclass
class GenerationResult:
    """One generated video: where it is, its uint8 ``[F, H, W, 3]`` frames and the sidecar content."""

    prompt: str
    index: int
    video_path: Path
    sidecar_path: Path
    frames: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


# -- LoRA specs and their metadata ----------------------------------------------------------------


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> ``(path, scale)``; a trailing ``:number`` is the scale, anything else is the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    if not spec:
        raise ValueError("empty --lora value; expected PATH or PATH:SCALE (e.g. out/lora:0.8)")
    return spec, 1.0


def resolve_attention_settings(
    overrides: dict[str, Any], loras: Sequence[tuple[str, float]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Final attention settings and where each came from: ``"user"`` > ``"lora"`` > ``"default"``.

    The first LoRA with metadata gives the LoRA defaults; a later LoRA that disagrees is logged.
    """
    from_lora: dict[str, Any] = {}
    for path, _ in loras:
        for key, value in lora_attention_settings(path).items():
            if key not in from_lora:
                from_lora[key] = value
            elif from_lora[key] != value:
                logger.warning(
                    "LoRA %s was trained with %s=%r; keeping %r from the first LoRA", path, key, value, from_lora[key]
                )
    settings, source = {}, {}
    for key in ATTENTION_KEYS:
        if overrides.get(key) is not None:
            settings[key], source[key] = overrides[key], "user"
        elif key in from_lora:
            settings[key], source[key] = from_lora[key], "lora"
        else:
            settings[key], source[key] = BUILTIN_DEFAULTS[key], "default"
    for key in ("block_size", "dense_layers", "dense_timesteps"):
        if settings[key] is not None:
            settings[key] = int(settings[key])
    if settings["decay_factor"] is not None:
        settings["decay_factor"] = float(settings["decay_factor"])
    return settings, source


# -- pipeline, LoRAs -----------------------------------------------------------------------------

_LOADED_ATTR = "_radial_lora_loaded_loras"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    model: Any,
    family: str | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    offload: bool = False,
    vae_tiling: bool = False,
) -> tuple[Any, str]:
    """A pipeline (given, or loaded with the family adapter) and its family, on ``device``.

    ``offload`` keeps weights on the CPU and moves each model to the GPU while it runs (diffusers'
    ``enable_model_cpu_offload``); ``vae_tiling`` decodes long videos in tiles. Both trade speed for memory.
    """
    from radial_lora.models import detect_family, get_adapter

    if not isinstance(model, str | os.PathLike):
        return model, family or detect_family(model)
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    family = family or detect_family(model)  # the folder's or hub id's model_index.json
    logger.info("loading %s pipeline from %s (%s on %s)", family, model, dtype, device)
    pipe = get_adapter(family).load_pipeline(model, torch_dtype=dtype)
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


def check_lora_family(loras: Sequence[tuple[str, float]], family: str) -> None:
    """A LoRA trained on another family (or task: a text-to-video LoRA on an image-to-video model, whose blocks
    have the same names) is one line, before anything loads; a LoRA without our metadata is let through."""
    from radial_lora.constants import FAMILY_TASK

    for path, _ in loras:
        trained = read_lora_metadata(path).get("family")
        if trained is not None and trained != family:
            task, here = FAMILY_TASK.get(trained, "?"), FAMILY_TASK.get(family, "?")
            raise ValueError(
                f"LoRA {path} was trained for the {trained} family ({task}), this model is {family} ({here}); "
                "use a LoRA trained on this model"
            )


def set_loras(pipe: Any, loras: Sequence[tuple[str, float]]) -> list[str]:
    """Activate exactly these LoRAs; none -> LoRA layers disabled.

    A LoRA whose metadata says ``"expert": "low"`` (Wan2.2 A14B) loads into ``transformer_2``;
    every other LoRA into ``transformer``.

    Each file loads once per pipeline; a file that changed since (same path, new sha256, e.g. a
    newer checkpoint) replaces its old adapter.
    """
    loaded: dict[str, tuple[str, str]] = getattr(pipe, _LOADED_ATTR, None) or {}
    setattr(pipe, _LOADED_ATTR, loaded)
    host = pipe if hasattr(pipe, "load_lora_weights") else TransformerLoras(pipe.transformer)
    names = []
    for path, _ in loras:
        key, digest = str(Path(path).resolve()), lora_digest(path)
        if key in loaded and loaded[key][1] != digest:
            host.delete_adapters(loaded.pop(key)[0])
        if key not in loaded:
            name = f"lora_{digest[:12]}"
            kwargs = {}
            if lora_expert(path) == "low":  # the low-noise expert of Wan2.2 A14B lives in transformer_2
                if getattr(pipe, "transformer_2", None) is None:
                    raise ValueError(
                        f"LoRA {path} was trained for Wan2.2 A14B's low-noise expert (transformer_2), "
                        f"but this {type(pipe).__name__} has no transformer_2"
                    )
                kwargs["load_into_transformer_2"] = True
            try:
                host.load_lora_weights(str(path), adapter_name=name, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"cannot load LoRA {path} into this {type(pipe).__name__}: {exc}") from exc
            loaded[key] = (name, digest)
        names.append(loaded[key][0])
    if names:
        host.enable_lora()
        host.set_adapters(names, adapter_weights=[float(s) for _, s in loras])
    elif loaded:
        host.disable_lora()
    return names


class TransformerLoras:
    """The pipeline LoRA calls ``set_loras`` makes, for a pipeline without diffusers' LoRA loader mixin
    (diffusers 0.42's ``HunyuanVideo15Pipeline`` has no ``load_lora_weights``): the same diffusers-format file
    loads into the transformer with ``transformer.load_lora_adapter(folder, prefix="transformer")``."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer

    def load_lora_weights(self, path: str, adapter_name: str) -> None:
        from radial_lora.lora import _lora_file

        file = _lora_file(path)
        self.transformer.load_lora_adapter(
            str(file.parent), weight_name=file.name, prefix="transformer", adapter_name=adapter_name
        )

    def delete_adapters(self, name: str) -> None:
        self.transformer.delete_adapters(name)

    def enable_lora(self) -> None:
        self.transformer.enable_adapters()

    def disable_lora(self) -> None:
        self.transformer.disable_adapters()

    def set_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        self.transformer.set_adapters(names, weights=adapter_weights)


# -- measurements --------------------------------------------------------------------------------


def attention_budget(
    pipe: Any,
    family: str,
    settings: dict[str, Any],
    *,
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
) -> dict[str, Any]:
    """Self-attention density and FLOPs of a whole generation (video tokens; text tokens not counted).

    Per transformer call every self-attention layer costs the dense FLOPs when it is dense (pattern
    dense, layer ``< dense_layers``, step ``< dense_timesteps``) and ``density`` times that otherwise.
    Wan runs two transformer calls per step under classifier-free guidance (``guidance > 1``).
    """
    from radial_lora.models import get_adapter
    from radial_lora.models.radial import dense_call

    adapter = get_adapter(family)
    transformer = adapter.transformers(pipe)[0]
    geo = adapter.geometry(pipe, num_frames, height, width)
    decay = adapter.default_decay if settings["decay_factor"] is None else settings["decay_factor"]
    mask = radial_block_mask(
        geo.latent_frames,
        geo.tokens_per_frame,
        block_size=settings["block_size"],
        decay_factor=decay,
        model_type=adapter.mask_model_type,
    )
    cfg = transformer.config
    cost = attention_cost(
        mask,
        geo.video_tokens,
        head_dim=int(cfg.attention_head_dim),
        num_heads=int(cfg.num_attention_heads),
        block_size=settings["block_size"],
    )
    layers = len(adapter.self_attention_modules(transformer))
    passes = adapter.guidance_passes(guidance, transformer)
    total = dense_total = 0.0
    for step in range(steps):
        for layer in range(layers):
            dense = dense_call(settings["pattern"], layer, step, settings["dense_layers"], settings["dense_timesteps"])
            total += passes * (cost.dense_flops if dense else cost.radial_flops)
            dense_total += passes * cost.dense_flops
    return {
        "latent_frames": geo.latent_frames,
        "tokens_per_frame": geo.tokens_per_frame,
        "video_tokens": geo.video_tokens,
        "mask_blocks": int(mask.shape[0]),
        "mask_density": cost.density,
        "decay_factor": float(decay),
        "self_attention_layers": layers,
        "transformer_calls": passes * steps,
        "attention_flops": total,
        "attention_flops_dense": dense_total,
        "effective_density": total / dense_total if dense_total else 1.0,
        "ideal_speedup": dense_total / total if total else 1.0,
    }


# -- files ---------------------------------------------------------------------------------------


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "video"


def _save_frames(path: Path, frames: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, frames=frames)


def _load_existing(video: Path, sidecar: Path, frames_file: Path | None, settings: dict[str, Any]) -> Any:
    """The saved sidecar and frames when a finished result with the same settings exists, else None."""
    if not (video.is_file() and sidecar.is_file()) or (frames_file is not None and not frames_file.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("format") != SIDECAR_FORMAT or info.get("settings") != jsonable(settings):
        return None
    if frames_file is not None:
        with np.load(frames_file) as z:
            return info, z["frames"]
    from radial_lora.data.video_io import read_video

    return info, read_video(video)[0]


def _versions() -> dict[str, str]:
    import diffusers

    from radial_lora import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "radial_lora": __version__}


@dataclass
class Rendered:
    """What :func:`render_video` made: uint8 ``[F, H, W, 3]`` frames (None when not decoded), the wall time of
    the pipeline call, its peak memory (empty when not measured) and the controller's attention call counts."""

    frames: np.ndarray | None
    wall_time_s: float
    peak_memory: dict[str, Any]
    calls: dict[str, int]


def frames_to_uint8(video: Any) -> np.ndarray:
    """A pipeline's ``output_type="np"`` video (floats in [0, 1]) as uint8 frames."""
    video = np.asarray(video, dtype=np.float32)
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def render_video(pipe: Any, controller: Any, video_path: Path | None, *, prompt: str, seed: int, **kw: Any) -> Rendered:
    """One video: :func:`render_batch` of one prompt (``generate`` and the trainer's validation samples)."""
    return render_batch(pipe, controller, [video_path], prompts=[prompt], seeds=[seed], **kw)[0]


def render_batch(
    pipe: Any,
    controller: Any,
    video_paths: Sequence[Path | None],
    *,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    fps: float,
    negative_prompt: str | None = None,
    device: torch.device | None = None,
    measure_memory: bool = True,
    images: Sequence[np.ndarray] | None = None,
) -> list[Rendered]:
    """One stock ``pipe(...)`` call for a batch of prompts, prompt ``i`` with a CPU generator seeded
    ``seeds[i]`` (diffusers draws each item's noise from its own generator: the same noise as alone), each
    written to ``video_paths[i]`` as mp4. The wall time is shared out evenly; memory is the batch's peak.

    ``controller`` (the pipeline's :class:`~radial_lora.models.radial.RadialController`, or None) starts a
    new denoising run, so ``dense_timesteps`` counts from this call's first step. A ``None`` path runs the
    denoising only (``output_type="latent"``: no decode, nothing written; a process that must take part in
    a sharded forward but writes nothing). ``images``: the first frame of each video, uint8 ``[H, W, 3]`` of
    the video's size (image-to-video pipelines; the stock call's ``image``, as PIL pictures), or its first and
    last frames ``[2, H, W, 3]`` (a first-last-frame model: ``image`` and ``last_image``).
    """
    from radial_lora.data.video_io import write_video
    from radial_lora.models import detect_family, get_adapter

    adapter = get_adapter(detect_family(pipe))
    decode = any(p is not None for p in video_paths)
    exec_device = device or torch.device(getattr(pipe, "_execution_device", None) or pipe.device)
    if controller is not None:
        controller.reset_stats()
        controller.new_run()
    call: dict[str, Any] = dict(
        prompt=list(prompts) if len(prompts) > 1 else prompts[0],
        num_frames=num_frames,
        num_inference_steps=steps,
        **adapter.size_arguments(pipe, height, width),
        **adapter.guidance_arguments(pipe, guidance),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np" if decode else "latent",
    )
    if images is not None:
        from PIL import Image

        if len(images) != 1 or len(prompts) != 1:  # diffusers 0.42's I2V pipelines repeat a batch's image latents
            raise ValueError("image-to-video renders one video per pipeline call (batch_size 1)")
        frames = images[0] if images[0].ndim == 4 else images[0][None]
        call["image"] = Image.fromarray(np.ascontiguousarray(frames[0]))
        if len(frames) == 2:
            call["last_image"] = Image.fromarray(np.ascontiguousarray(frames[1]))
    if len(prompts) == 1:
        call["generator"] = call["generator"][0]
    if negative_prompt is not None:
        call["negative_prompt"] = [negative_prompt] * len(prompts) if len(prompts) > 1 else negative_prompt
    mem: dict[str, Any] = {}
    with peak_memory(exec_device) if measure_memory else nullcontext(mem) as mem:
        start = time.perf_counter()
        output = pipe(**call)
        if exec_device.type == "cuda":
            torch.cuda.synchronize(exec_device)
        wall = time.perf_counter() - start
    calls = dict(controller.calls) if controller is not None else {}
    out = []
    for i, path in enumerate(video_paths):
        frames = None
        if path is not None:
            frames = frames_to_uint8(output.frames[i])
            write_video(path, frames, fps)
        out.append(Rendered(frames, wall / len(prompts), mem, calls))
    return out


# -- the entry point -----------------------------------------------------------------------------


def generate(
    model: Any,
    prompts: Sequence[str],
    *,
    num_frames: int,
    height: int,
    width: int,
    out_dir: str | os.PathLike,
    pattern: str | None = None,
    dense_layers: int | None = None,
    dense_timesteps: int | None = None,
    decay_factor: float | None = None,
    block_size: int | None = None,
    backend: str = "auto",
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    seed: int = 0,
    steps: int = 50,
    guidance: float = 5.0,
    fps: float = 16.0,
    family: str | None = None,
    negative_prompt: str | None = None,
    names: Sequence[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    save_frames: bool = False,
    skip_existing: bool = False,
    offload: bool = False,
    vae_tiling: bool = False,
    riflex_base_frames: int | None = None,
    riflex_k: int | None = None,
    batch_size: int = 1,
    sequence_parallel: int = 1,
    overwrite: bool = False,
    results_root: str | os.PathLike | None = None,
    images: Sequence[str | os.PathLike | np.ndarray] | None = None,
) -> list[GenerationResult]:
    """Generate one video per prompt; prompt ``i`` uses seed ``seed + i`` (same noise for every variant).

    ``model``: a pipeline folder / hub id (``family`` read from its ``model_index.json`` when None) or a loaded
    pipeline (reused as is: evaluation loads once). Attention settings left ``None`` come from the first LoRA's
    training metadata, else the built-in defaults (radial, family decay, block 128, no dense layers
    or steps). ``loras``: ``[(path, scale)]``. ``names``: output file stems (default ``000_prompt-slug``).
    ``save_frames`` also writes the exact uint8 frames (``NAME.npz``, lossless, for metrics);
    ``skip_existing`` reuses a finished result (mp4 + sidecar with identical settings).
    ``offload``/``vae_tiling``: memory savers (:func:`load_model`). ``riflex_base_frames``: RIFLEx
    (:mod:`radial_lora.models.riflex`) for a model trained at that many frames; ``riflex_k`` picks its component
    (and turns it on). ``batch_size``: prompts per pipeline call (same noise per prompt; more memory).
    ``sequence_parallel``: split each video's tokens over that many processes of a ``torchrun`` job (Ulysses,
    :mod:`radial_lora.models.sequence_parallel`); more processes than that split the prompts between their
    groups, and each group's first process writes. The result lists the videos this process's group made.
    ``overwrite``: an earlier video of the same name made with other settings moves to ``previous/<time>/`` of
    ``results_root`` (default ``out_dir``; ``evaluate`` passes its own folder) instead of stopping the call.
    ``images``: image-to-video only, prompt ``i``'s first frame (a picture file or uint8 ``[H, W, 3]``); for a
    first-last-frame model (Wan2.1-FLF2V) its first and last frames (two files, or uint8 ``[2, H, W, 3]``).
    """
    prompts, lora_list = _checked_inputs(prompts, names, steps, fps, loras, batch_size)
    family, conditions, batch = _model_inputs(model, family, lora_list, images, len(prompts), height, width, batch_size)
    user = dict(pattern=pattern, decay_factor=decay_factor, block_size=block_size, dense_layers=dense_layers)
    attn, source = resolve_attention_settings(user | {"dense_timesteps": dense_timesteps}, lora_list)
    layout = None
    if sequence_parallel > 1:
        from radial_lora.parallel import init_distributed

        layout, device = init_distributed(sequence_parallel, device)
    out = Path(out_dir)
    with job_lock(out, "radial-lora generate"):  # the processes of a torchrun job share it
        run = _setup_run(
            model,
            family,
            attn,
            device=device,
            dtype=dtype,
            offload=offload,
            vae_tiling=vae_tiling,
            riflex_base_frames=riflex_base_frames,
            riflex_k=riflex_k,
            call=dict(num_frames=num_frames, height=height, width=width, steps=steps, guidance=guidance, fps=fps),
            negative_prompt=negative_prompt,
        )
        base_settings = _base_settings(model, run.pipe, run.family, attn, backend, lora_list, run.call)
        base_settings["batch_size"] = batch
        results, todo = _plan_outputs(prompts, names, out, save_frames, skip_existing, base_settings, seed, conditions)
        _keep_earlier(todo, Path(results_root or out), overwrite, mover=layout is None or layout.rank == 0)
        writer = True
        if layout is not None:
            torch.distributed.barrier()  # every process has planned (and old files moved) before any writes
            logger.info("sequence parallel: %s", layout.describe())
            todo, writer = todo[layout.data_rank :: layout.data], layout.sequence_rank == 0
            results = {i: r for i, r in results.items() if i % layout.data == layout.data_rank}
        controller = _patch(run, lora_list, attn, backend, layout) if todo else None  # once, before the first
        for chunk in (todo[k : k + batch] for k in range(0, len(todo), batch)):
            for t, frames, info in _render_chunk(run, controller, chunk, attn, writer):
                info["settings_source"] = source
                info["processes"] = layout.describe() if layout is not None else "1 process"
                write_json_atomic(t.sidecar, info)
                results[t.index] = GenerationResult(t.prompt, t.index, t.video, t.sidecar, frames, jsonable(info))
        if layout is not None:
            torch.distributed.barrier()
    return [results[i] for i in range(len(prompts)) if i in results]


@dataclass
class _Run:
    """A loaded pipeline and what every video of one generate() call shares."""

    pipe: Any
    family: str
    adapter: Any
    ropes: list[Any]
    call: dict[str, Any]  # the pipeline-call arguments of render_batch (frames, size, steps, ... device)
    budget: dict[str, Any]  # attention density and FLOPs of one video


def _setup_run(
    model: Any,
    family: str | None,
    attn: dict[str, Any],
    *,
    device: str | None,
    dtype: Any,
    offload: bool,
    vae_tiling: bool,
    riflex_base_frames: int | None,
    riflex_k: int | None,
    call: dict[str, Any],
    negative_prompt: str | None,
) -> _Run:
    """Load (or reuse) the pipeline; fill in the family's block size and the RIFLEx component in ``attn``."""
    from radial_lora.models import get_adapter
    from radial_lora.models.riflex import pipeline_ropes, resolve_component

    pipe, family = load_model(model, family, device=device, dtype=dtype, offload=offload, vae_tiling=vae_tiling)
    adapter = get_adapter(family)
    if attn["block_size"] is None:
        attn["block_size"] = adapter.default_block_size
    ropes = pipeline_ropes(adapter, pipe) if riflex_base_frames or riflex_k else []
    attn["riflex_k"] = resolve_component(ropes, riflex_base_frames, riflex_k, adapter.vae_factors(pipe)[0])
    exec_device = torch.device(getattr(pipe, "_execution_device", None) or pipe.device)
    call = call | dict(negative_prompt=negative_prompt, device=exec_device)
    sizes = {k: call[k] for k in ("num_frames", "height", "width", "steps", "guidance")}
    return _Run(pipe, family, adapter, ropes, call, attention_budget(pipe, family, attn, **sizes))


def _patch(run: _Run, loras: list[tuple[str, float]], attn: dict[str, Any], backend: str, layout: Any) -> Any:
    """LoRAs, radial attention and (under torchrun) the sequence-parallel hooks into the pipeline."""
    from radial_lora.models import apply_radial_attention

    set_loras(run.pipe, loras)
    controller = apply_radial_attention(run.pipe, **{k: attn[k] for k in ATTENTION_KEYS}, backend=backend)
    if layout is not None:
        from radial_lora.models.sequence_parallel import enable_sequence_parallel

        for transformer in run.adapter.transformers(run.pipe):
            enable_sequence_parallel(transformer, layout.sequence_group)
    return controller


def _render_chunk(
    run: _Run, controller: Any, chunk: list[_Pending], attn: dict[str, Any], writer: bool
) -> list[tuple[_Pending, np.ndarray | None, dict[str, Any]]]:
    """One pipeline call for a chunk of prompts; per video (only on the writing process) its lossless frames
    written when asked for, and its sidecar (without ``settings_source``/``processes``, which the caller adds)."""
    from radial_lora.models.riflex import riflex

    logger.info(
        "generating %s: %d frames %dx%d, %d steps, %s",
        ", ".join(t.video.stem for t in chunk),
        run.call["num_frames"],
        run.call["width"],
        run.call["height"],
        run.call["steps"],
        attn["pattern"],
    )
    images = [t.image for t in chunk] if chunk[0].image is not None else None
    with riflex(run.ropes, attn["riflex_k"]):
        rendered = render_batch(
            run.pipe,
            controller,
            [t.video if writer else None for t in chunk],
            prompts=[t.prompt for t in chunk],
            seeds=[t.settings["seed"] for t in chunk],
            images=images,
            **run.call,
        )
    if not writer:
        return []
    out = []
    for t, r in zip(chunk, rendered):
        if t.frames_file is not None:
            _save_frames(t.frames_file, r.frames)
        out.append((t, r.frames, _sidecar(t.prompt, t.index, t.video, t.frames_file, t.settings, r, run.budget)))
    return out


@dataclass
class _Pending:
    """A video still to render: its prompt, index, output files and sidecar settings."""

    prompt: str
    index: int
    video: Path
    sidecar: Path
    frames_file: Path | None
    settings: dict[str, Any]
    image: np.ndarray | None = None  # the first frame [H, W, 3] (image-to-video), or first and last [2, H, W, 3]


def _model_inputs(
    model: Any, family: str | None, loras: list, images: Any, count: int, height: int, width: int, batch_size: int
) -> tuple[str, list[tuple[np.ndarray, dict[str, str]]] | None, int]:
    """Before anything loads: the family (a folder's or hub id's ``model_index.json``), a LoRA of another
    family refused, the images an image-to-video model starts from, and its batch size (one per call)."""
    from radial_lora.models import detect_family, get_adapter

    family = family or detect_family(model)
    check_lora_family(loras, family)
    adapter = get_adapter(family)
    first_last = adapter.task == "i2v" and adapter.conditions_on_last_frame(_transformer_config(model, adapter))
    conditions = _image_conditions(adapter, first_last, images, count, height, width)
    if (conditions is not None or adapter.one_video_per_call) and batch_size > 1:
        logger.info("%s: one video per pipeline call (batch_size %d -> 1)", family, batch_size)
        batch_size = 1
    return family, conditions, batch_size


def _transformer_config(model: Any, adapter: Any) -> dict[str, Any]:
    """The transformer config of a loaded pipeline, a folder or a hub id (published: known; else its config file
    alone); empty where it cannot be read (offline), and the pipeline says later what it lacks."""
    if hasattr(model, "components"):
        return dict(adapter.transformer_config(model))
    from radial_lora.models.published import describe_model

    try:
        return dict(describe_model(str(model)).transformer)
    except (OSError, ValueError):
        import diffusers

        try:
            cls = getattr(diffusers, adapter.transformer_class_name)
            return dict(cls.load_config(str(model), subfolder="transformer"))
        except (OSError, ValueError):
            return {}


def _image_conditions(
    adapter: Any, first_last: bool, images: Sequence[Any] | None, count: int, height: int, width: int
) -> list[tuple[np.ndarray, dict[str, str]]] | None:
    """Per prompt, the images an image-to-video model starts from (uint8 ``[H, W, 3]``, or ``[2, H, W, 3]`` with
    the last frame) and the sidecar settings naming them (path or "array", sha256 of the pixels); None for a
    text-to-video model. A missing or extra image is one line saying what to pass."""
    if adapter.task != "i2v":
        if images:
            raise ValueError(f"the {adapter.family} model generates from text only; drop --image")
        return None
    if not images:
        raise ValueError(
            f"the {adapter.family} model generates from an image: pass --image PATH, or a JSON prompts file of "
            '{"prompt": ..., "image": PATH} entries'
        )
    if len(images) != count:
        raise ValueError(f"got {len(images)} images for {count} prompts; give one image per prompt (or one for all)")
    out = []
    for image in images:
        frames, names = _read_condition(image, height, width)
        if len(frames) == 2 and not first_last:
            raise ValueError(f"the {adapter.family} model starts from a first frame only; drop --last-image")
        if len(frames) == 1 and first_last:
            raise ValueError(
                "this first-last-frame model (Wan2.1-FLF2V) generates between two frames: pass --last-image PATH "
                'too, or "last_image" in every prompts-file entry'
            )
        settings = {"image": names[0], "image_sha256": hashlib.sha256(frames[0].tobytes()).hexdigest()}
        if len(frames) == 2:
            settings |= {"last_image": names[1], "last_image_sha256": hashlib.sha256(frames[1].tobytes()).hexdigest()}
        out.append((frames[0] if len(frames) == 1 else np.stack(frames), settings))
    return out


def _read_condition(image: Any, height: int, width: int) -> tuple[list[np.ndarray], list[str]]:
    """One prompt's images, scaled and centre-cropped to the video's size: a file, a ``(first, last)`` pair of
    files, or uint8 ``[H, W, 3]`` / ``[2, H, W, 3]``; with a name for each (its path, or "array")."""
    from radial_lora.data.video_io import read_image, resize_center_crop

    if isinstance(image, np.ndarray):
        arrays = list(image) if image.ndim == 4 else [image]
        return [np.ascontiguousarray(resize_center_crop(a, height, width)) for a in arrays], ["array"] * len(arrays)
    paths = list(image) if isinstance(image, list | tuple) else [image]
    return [read_image(path, height, width) for path in paths], [str(path) for path in paths]


def _plan_outputs(
    prompts: list[str],
    names: Sequence[str] | None,
    out: Path,
    save_frames: bool,
    skip_existing: bool,
    base_settings: dict[str, Any],
    seed: int,
    conditions: list[tuple[np.ndarray, dict[str, str]]] | None = None,
) -> tuple[dict[int, GenerationResult], list[_Pending]]:
    """The results that can be reused as they are (``skip_existing``: same settings) and the videos to render;
    an image-to-video video's settings name its image(s) and the sha256 of their pixels."""
    results: dict[int, GenerationResult] = {}
    todo: list[_Pending] = []
    for i, prompt in enumerate(prompts):
        stem = names[i] if names is not None else f"{i:03d}_{slug(prompt)}"
        video_path, sidecar = out / f"{stem}.mp4", out / f"{stem}.json"
        frames_file = out / f"{stem}.npz" if save_frames else None
        settings = {**base_settings, "prompt": prompt, "seed": seed + i}
        image = None
        if conditions is not None:
            image, named = conditions[i]
            settings |= named
        found = _load_existing(video_path, sidecar, frames_file, settings) if skip_existing else None
        if found is not None:
            logger.info("reusing %s (same settings)", video_path)
            results[i] = GenerationResult(prompt, i, video_path, sidecar, found[1], found[0], reused=True)
        else:
            todo.append(_Pending(prompt, i, video_path, sidecar, frames_file, settings, image))
    return results, todo


def _keep_earlier(todo: list[_Pending], root: Path, overwrite: bool, *, mover: bool) -> None:
    """Stop before replacing a video made with other settings (its sidecar says which; a video without our
    sidecar counts as other settings), or with ``overwrite`` move its files to ``root/previous/<time>/``
    (:func:`radial_lora.files.set_aside`; ``mover``: the process that moves, the others only check)."""
    replaced: list[str] = []
    first = ""
    for t in todo:
        files = [f for f in (t.video, t.sidecar, t.frames_file) if f is not None and f.exists()]
        if not files:
            continue
        try:
            old = json.loads(t.sidecar.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError, AttributeError):
            old = None
        old = old if isinstance(old, dict) else None
        new = jsonable(t.settings)
        if old == new:
            continue  # the same settings again: rendered anew in place
        replaced += [f.resolve().relative_to(root.resolve()).as_posix() for f in files]
        if not first:
            changed = [
                f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in new if old and old.get(k) != new[k]
            ]
            first = f"{t.video.name}: " + (", ".join(changed[:3]) if changed else "no settings of radial-lora")
    if replaced and (mover or not overwrite):
        moved = set_aside(
            root,
            replaced,
            overwrite=overwrite,
            holds=f"videos made with other settings ({first})",
            ways="choose another --out",
        )
        logger.info("--overwrite: %d earlier file(s) moved to %s", len(replaced), moved)


def _base_settings(
    model: Any, pipe: Any, family: str, attn: dict, backend: str, loras: list, call: dict
) -> dict[str, Any]:
    """What a generated video depends on (its sidecar's ``settings``; a rerun with the same ones is reused)."""
    model_name = str(model) if isinstance(model, str | os.PathLike) else getattr(pipe, "name_or_path", None)
    return {
        "model": model_name,
        "family": family,
        **{k: call[k] for k in ("num_frames", "height", "width")},
        **attn,
        "backend": backend,
        "loras": [[p, s] for p, s in loras],
        "lora_sha256": [lora_digest(p) for p, _ in loras],
        "steps": call["steps"],
        "guidance": float(call["guidance"]),
        "fps": float(call["fps"]),
        "negative_prompt": call["negative_prompt"],
        "dtype": str(next(pipe.transformer.parameters()).dtype).removeprefix("torch."),
        "device": str(call["device"]),
    }


def _sidecar(
    prompt: str, index: int, video: Path, frames_file: Path | None, settings: dict, rendered: Any, budget: dict
) -> dict[str, Any]:
    """The JSON written beside a video: its settings, time, memory, attention cost (the caller adds where each
    setting came from, ``settings_source``)."""
    return {
        "format": SIDECAR_FORMAT,
        "prompt": prompt,
        "index": index,
        "video": video.name,
        "frames_file": frames_file.name if frames_file is not None else None,
        "settings": settings,
        "wall_time_s": rendered.wall_time_s,
        "peak_memory": rendered.peak_memory,
        "attention": {**budget, "calls": rendered.calls},
        "versions": _versions(),
    }


def _checked_inputs(
    prompts: Sequence[str],
    names: Sequence[str] | None,
    steps: int,
    fps: float,
    loras: Sequence[tuple[Any, float]],
    batch_size: int = 1,
) -> tuple[list[str], list[tuple[str, float]]]:
    """The prompts and ``[(lora path, scale)]`` of a generate() call, or a ValueError naming the bad input."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass --prompt TEXT or --prompts FILE (one prompt per line)")
    if names is not None and len(names) != len(prompts):
        raise ValueError(f"got {len(names)} names for {len(prompts)} prompts")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    lora_list = [(str(p), float(s)) for p, s in loras]
    for path, _ in lora_list:
        if not Path(path).exists():
            raise FileNotFoundError(f"LoRA {path} not found; pass a LoRA folder or .safetensors file")
        check_lora(path)  # read whole: a truncated or damaged file is one line here, not a traceback later
    return prompts, lora_list


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list."""
    return [prompt for prompt, _ in read_prompt_entries(path)]


def read_prompt_entries(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """``(prompt, image)`` pairs of a prompts file: a text file (one prompt per line, no images) or a JSON list
    of prompt strings and ``{"prompt": TEXT, "image": PATH}`` objects (image-to-video; a relative PATH is
    relative to the file's folder; with ``"last_image": PATH`` too, the image is the pair ``(first, last)``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} not found")
    text = p.read_text(encoding="utf-8")
    wanted = 'a JSON list of prompt strings or {"prompt": TEXT, "image": PATH} objects'
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc}); expected {wanted}") from exc
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected {wanted}")
        entries: list[tuple[str, Any]] = []
        for i, item in enumerate(data):
            if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                image, last = item.get("image"), item.get("last_image")
                for key, value in (("image", image), ("last_image", last)):
                    if value is not None and not isinstance(value, str):
                        raise ValueError(f"{p}: entry {i}'s {key} must be a path (a string), got {value!r}")
                if last is not None and image is None:
                    raise ValueError(f"{p}: entry {i} has a last_image but no image; give both")
                first = None if image is None else p.parent / image
                entries.append((item["prompt"].strip(), first if last is None else (first, p.parent / last)))
            elif isinstance(item, str):
                entries.append((item.strip(), None))
            else:
                raise ValueError(f"{p}: entry {i} is {item!r}; expected {wanted}")
        entries = [e for e in entries if e[0]]
    else:
        entries = [
            (line.strip(), None) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if not entries:
        raise ValueError(f"{p} holds no prompts; write one prompt per line")
    return entries
