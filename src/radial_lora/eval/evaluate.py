"""The evaluation grid: video lengths x variants (base/LoRA, dense/radial), same prompts and seeds.

Every cell generates its videos through :func:`radial_lora.inference.generate` (mp4 + sidecar +
lossless frames under ``OUT/videos``), so a rerun skips finished cells. Per cell: wall time, peak
memory, attention density and FLOPs, and quality against the dense video of the same weights at
the same length (PSNR, SSIM as the paper reports, drift along time), plus temporal consistency, and what
goes wrong in long videos (:mod:`radial_lora.eval.long_video`: motion per quarter, frozen, looping,
degrading). With a prepared dataset, the held-out flow-matching loss per length and variant
(``heldout_loss``), and the held-out clips themselves as the ``real`` row: decoded from their cached latents
by the same VAE as the generated videos, the motion every cell's ``motion_ratio`` is measured against.
The numbers go to ``results.json``; :mod:`radial_lora.eval.report` and :mod:`radial_lora.eval.plots`
turn them into ``report.md`` and PNGs. A run holds ``OUT``'s lock; finished cells with equal settings are reused,
but an evaluation made with other settings is never replaced unasked (:func:`claim_output`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import radial_lora.eval.metrics as metrics
from radial_lora import files
from radial_lora.eval import long_video, shape_score
from radial_lora.locks import FolderLock
from radial_lora.lora import check_lora

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "radial-lora-eval/1"
_VARIANT_RE = re.compile(r"^(base|lora|lora2)_(dense|radial|riflex|radial_riflex)$")


@dataclass(frozen=True)
class Variant:
    """One column of the grid: which weights (base, LoRA, second LoRA) under which attention pattern, with or
    without RIFLEx (``base_riflex``: the base, dense attention, RIFLEx RoPE; ``lora_radial_riflex``)."""

    name: str
    weights: str  # "base", "lora", "lora2"
    pattern: str  # "dense", "radial"
    loras: tuple[tuple[str, float], ...] = ()
    riflex: bool = False


def make_variants(
    names: Sequence[str], lora: tuple[str, float] | None = None, lora2: tuple[str, float] | None = None
) -> list[Variant]:
    """Variants from names like ``base_dense``, ``lora_radial``, ``lora2_radial`` (need --lora / --lora2)."""
    out: list[Variant] = []
    for name in names:
        m = _VARIANT_RE.match(name)
        if m is None:
            raise ValueError(
                f"unknown variant {name!r}; use WEIGHTS_ATTENTION with weights base, lora or lora2 and attention "
                "dense, radial, riflex or radial_riflex (e.g. base_dense, base_riflex, lora_radial)"
            )
        weights, attention = m.groups()
        spec = {"base": None, "lora": lora, "lora2": lora2}[weights]
        if weights != "base" and spec is None:
            flag = "--lora" if weights == "lora" else "--lora2"
            raise ValueError(f"variant {name} needs {flag} PATH[:SCALE]")
        pattern = "radial" if attention.startswith("radial") else "dense"
        out.append(Variant(name, weights, pattern, () if spec is None else (spec,), "riflex" in attention))
    if len({v.name for v in out}) != len(out):
        raise ValueError(f"variant listed twice in {list(names)}")
    return out


def default_variant_names(has_lora: bool, has_lora2: bool) -> list[str]:
    names = ["base_dense", "base_radial"]
    if has_lora:
        names += ["lora_dense", "lora_radial"]
    if has_lora2:
        names += ["lora2_radial"]
    return names


def reference_for(variant: Variant, variants: Sequence[Variant]) -> Variant | None:
    """The dense variant of the same weights if it is in the grid, else ``base_dense``, else None."""
    by_name = {v.name: v for v in variants}
    return by_name.get(f"{variant.weights}_dense") or by_name.get("base_dense")


def parse_lengths(text: str, base_frames: int) -> list[int]:
    """``17,33,65`` (frames) or ``1x,2x,4x`` (multiples of ``base_frames`` in latent frames: ``(b-1)*k+1``)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if part.lower().endswith("x"):
                k = float(part[:-1])
                frames = int(round((base_frames - 1) * k)) + 1
            else:
                frames = int(part)
        except ValueError:
            raise ValueError(f"--lengths item {part!r} is neither a frame count (65) nor a multiple (2x)") from None
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"--lengths {part!r} gives {frames} frames; video VAEs need 4k+1 frames (17, 33, 81...)")
        out.append(frames)
    if not out:
        raise ValueError("--lengths is empty; e.g. --lengths 81,161 or --lengths 1x,2x")
    return sorted(set(out))


@dataclass
class GridOptions:
    """Everything one grid run needs (the CLI flags)."""

    model: Any
    prompts: list[str]
    lengths: list[int]
    variants: list[Variant]
    out_dir: Path
    height: int = 480
    width: int = 832
    family: str | None = None
    dense_layers: int | None = None
    dense_timesteps: int | None = None
    decay_factor: float | None = None
    block_size: int | None = None
    backend: str = "auto"
    seed: int = 0
    steps: int = 50
    guidance: float = 5.0
    fps: float = 16.0
    negative_prompt: str | None = None
    device: str | None = None
    dtype: str | None = None
    dataset: Path | None = None
    heldout_max_clips: int = 8
    segments: int = 4
    offload: bool = False
    vae_tiling: bool = False
    base_frames: int | None = None  # what RIFLEx variants extend from
    riflex_k: int | None = None  # their RoPE component (default: the RIFLEx rule for base_frames)
    batch_size: int = 1  # prompts per pipeline call
    images: list[Any] | None = None  # image-to-video: prompt i's first frame (path or uint8 [H, W, 3])
    overwrite: bool = False  # move an earlier evaluation in out_dir aside (previous/<time>/) and start afresh


def _cell_name(variant: Variant, length: int, prompt_index: int) -> str:
    return f"{variant.name}_f{length:04d}_p{prompt_index:02d}"


def _mean(values: Sequence[float]) -> float:
    return metrics.mean_finite(list(values))


def _quality(frames: list[np.ndarray], ref_frames: list[np.ndarray] | None, segments: int) -> dict[str, Any]:
    """Per-prompt metrics and their means (PSNR means over finite values; all-identical stays inf)."""
    per_prompt = [metrics.summarize(f, r, segments) for f, r in zip(frames, ref_frames or [None] * len(frames))]
    out: dict[str, Any] = {
        "temporal_consistency": _mean([p["temporal_consistency"] for p in per_prompt]),
        "per_prompt": per_prompt,
    }
    if ref_frames is not None:
        seg = len(per_prompt[0]["drift"]["psnr"])
        out.update(
            psnr=_mean([p["psnr"] for p in per_prompt]),
            ssim=_mean([p["ssim"] for p in per_prompt]),
            reference_temporal_consistency=_mean([p["reference_temporal_consistency"] for p in per_prompt]),
            drift_psnr=[_mean([p["drift"]["psnr"][i] for p in per_prompt]) for i in range(seg)],
            drift_ssim=[_mean([p["drift"]["ssim"][i] for p in per_prompt]) for i in range(seg)],
        )
        first, last = out["drift_psnr"][0], out["drift_psnr"][-1]
        out["psnr_drop"] = 0.0 if math.isinf(first) and math.isinf(last) else first - last
        out["ssim_drop"] = out["drift_ssim"][0] - out["drift_ssim"][-1]
    return out


def _heldout(
    pipe: Any, family: str, variant: Variant, opts: GridOptions, attn: dict[str, Any], riflex_k: int | None
) -> dict[str, Any]:
    """Held-out flow-matching loss of one variant on the prepared dataset, per length bucket."""
    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.inference.generate import set_loras
    from radial_lora.models import apply_radial_attention, get_adapter
    from radial_lora.models.riflex import pipeline_ropes, riflex
    from radial_lora.train.flow_matching import heldout_loss

    ds = PreparedDataset(opts.dataset)
    records = [r for bucket in ds.buckets.values() for r in bucket[: opts.heldout_max_clips]]
    adapter = get_adapter(family)
    set_loras(pipe, list(variant.loras))
    controller = apply_radial_attention(
        pipe,
        pattern=variant.pattern,
        dense_layers=attn["dense_layers"],
        dense_timesteps=0,
        decay_factor=attn["decay_factor"],
        block_size=attn["block_size"],
        backend=opts.backend,
    )
    ropes = pipeline_ropes(adapter, pipe) if variant.riflex else []
    with controller.training_mode(), riflex(ropes, riflex_k if variant.riflex else None):
        result = heldout_loss(adapter, adapter.transformers(pipe)[0], records, seed=opts.seed, dataset=ds)
    return result.to_dict()


def real_clips(pipe: Any, family: str, dataset: Path, lengths: Sequence[int], max_clips: int) -> dict[int, Any]:
    """The held-out clips of each length (up to ``max_clips``) as ``uint8 [F, H, W, 3]`` videos, decoded from
    their cached latents by the pipeline's VAE: the real videos the generated ones are measured against, through
    the same decoder (so the VAE's own blur or colour shifts are in both)."""
    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.inference.generate import frames_to_uint8
    from radial_lora.models import get_adapter

    ds, adapter = PreparedDataset(dataset), get_adapter(family)
    out: dict[int, Any] = {}
    for length in lengths:
        records = ds.buckets.get(length, [])[:max_clips]
        if not records:
            logger.info("no held-out clips of %d frames in %s: no real motion to compare with", length, dataset)
            continue
        latents = torch.stack([ds.load(r)["latents"] for r in records])
        with torch.no_grad():
            video = adapter.decode_latents(pipe, latents)  # [B, 3, F, H, W] in [-1, 1]
        out[length] = frames_to_uint8(((video + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy())
    return out


def heldout_conditions(dataset: Path, lengths: Sequence[int], max_clips: int) -> tuple[list[str], list[np.ndarray]]:
    """An image-to-video evaluation's prompts and images: the captions and first frames (and last, for a
    first-last-frame model) of the held-out clips (the longest length's, up to ``max_clips``), so each
    generated video has a real continuation to compare with."""
    from radial_lora.data.dataset import PreparedDataset

    ds = PreparedDataset(dataset)
    length = max((n for n in lengths if ds.buckets.get(n)), default=None)
    if length is None:
        raise ValueError(f"--dataset {dataset} has no clips of {list(lengths)} frames to take first frames from")
    records = ds.buckets[length][:max_clips]
    return [r.caption for r in records], [ds.image_condition(r) for r in records]


def motion_summary(scores: Sequence[long_video.VideoScore], real: dict[str, Any] | None) -> dict[str, Any]:
    """A cell's (or the real clips') motion: median motion and per quarter, the failure rates, and with the real
    clips' summary ``motion_ratio`` (median motion / the real clips' median, 1.0 = as much) per clip and quarter."""
    motion = float(np.median([s.motion for s in scores]))
    quarters = [float(q) for q in np.median([s.motion_quarters for s in scores], axis=0)]
    ref = real["motion"] if real and real["motion"] > long_video.STILL else None
    return {
        "motion": motion,
        "motion_quarters": quarters,
        "motion_ratio": motion / ref if ref else None,
        "motion_ratio_quarters": [q / ref for q in quarters] if ref else None,
        "failure_rates": long_video.failure_rates(list(scores)),
        "per_video": [s.to_dict() for s in scores],
    }


def _cell(
    length: int, variant: Variant, ref: Variant | None, results: list[Any], quality: dict[str, Any], out: Path
) -> dict[str, Any]:
    """One (length, variant) cell of results.json from its generated videos."""
    first = results[0].info
    return {
        "length": length,
        "variant": variant.name,
        "weights": variant.weights,
        "pattern": variant.pattern,
        "loras": [list(x) for x in variant.loras],
        "reference": ref.name if ref is not None else None,
        "settings": {
            k: first["settings"][k]
            for k in (
                "decay_factor",
                "block_size",
                "dense_layers",
                "dense_timesteps",
                "riflex_k",
                "steps",
                "guidance",
                "backend",
            )
        },
        "wall_time_s": float(np.mean([r.info["wall_time_s"] for r in results])),
        "peak_memory_bytes": max(int(r.info["peak_memory"].get("bytes", 0)) for r in results),
        "peak_memory_kind": first["peak_memory"].get("kind"),
        "attention": {k: v for k, v in first["attention"].items() if k != "calls"},
        "quality": quality,
        "videos": [str(r.video_path.relative_to(out)) for r in results],
        "reused": all(r.reused for r in results),
    }


def _grid_settings(opts: GridOptions, grid_attn: dict[str, Any]) -> dict[str, Any]:
    """results.json's ``settings``: what every cell shares (and what a rerun must share to reuse them)."""
    return {
        "height": opts.height,
        "width": opts.width,
        "seed": opts.seed,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "fps": opts.fps,
        "segments": opts.segments,
        "dataset": str(opts.dataset) if opts.dataset else None,
        **grid_attn,
    }


def _results_doc(
    opts: GridOptions,
    model_name: str | None,
    family: str,
    grid_attn: dict[str, Any],
    cells: list[dict[str, Any]],
    heldout: dict[str, Any],
    real: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """The whole results.json: the grid's settings, every cell, the held-out losses, the real clips' motion."""
    return {
        "format": RESULTS_FORMAT,
        "model": model_name,
        "family": family,
        "prompts": opts.prompts,
        "lengths": opts.lengths,
        "variants": [
            {
                "name": v.name,
                "weights": v.weights,
                "pattern": v.pattern,
                "riflex": v.riflex,
                "loras": [list(x) for x in v.loras],
            }
            for v in opts.variants
        ],
        "settings": _grid_settings(opts, grid_attn),
        "cells": cells,
        "heldout": heldout,
        "sample_scores": _sample_table(cells),
        "real": {str(n): r for n, r in real.items()},
        "motion_ratio": _motion_table(cells, "motion_ratio"),
        "failure_rates": _motion_table(cells, "failure_rates")
        | {"real": {str(n): r["failure_rates"] for n, r in real.items()}},
        "notes": {
            "psnr": "dB vs the reference (dense attention, same weights, prompt, seed, length); 'inf' = identical",
            "peak_memory_bytes": "CUDA max_memory_allocated, or process RSS peak on CPU (includes weights)",
            "sample_scores": "fraction of videos whose colour, shape and direction all match their sample caption "
            "(radial_lora.eval.shape_score); empty when the prompts are not sample captions",
            "motion": "short sides of the frame per second that content keeps moving (radial_lora.eval.long_video); "
            "motion_ratio = a cell's median over the real held-out clips' median at that length (1.0 = as much), "
            "null without --dataset; failure_rates = share of videos frozen / looping / degrading",
        },
    }


def _sample_table(cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{variant: {frames: fraction all right}}`` over the cells that have a sample score."""
    table: dict[str, dict[str, float]] = {}
    for cell in cells:
        if cell.get("sample_score"):
            table.setdefault(cell["variant"], {})[str(cell["length"])] = cell["sample_score"]["all"]
    return table


def _motion_table(cells: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """``{variant: {frames: cell["motion"][key]}}``."""
    table: dict[str, dict[str, Any]] = {}
    for cell in cells:
        table.setdefault(cell["variant"], {})[str(cell["length"])] = cell["motion"][key]
    return table


def _real_motion(pipe: Any, family: str, opts: GridOptions) -> dict[int, dict[str, Any]]:
    """The real held-out clips' motion summary per length (empty without a dataset)."""
    if opts.dataset is None:
        return {}
    videos = real_clips(pipe, family, Path(opts.dataset), opts.lengths, opts.heldout_max_clips)
    scores = {n: [long_video.score_frames(v, opts.fps) for v in clips] for n, clips in videos.items()}
    return {n: motion_summary(s, None) for n, s in scores.items()}


def _riflex_component(pipe: Any, family: str, opts: GridOptions) -> int | None:
    """The RIFLEx component every riflex variant uses (videos and held-out loss alike); None without one."""
    if not any(v.riflex for v in opts.variants):
        return None
    from radial_lora.models import get_adapter
    from radial_lora.models.riflex import pipeline_ropes, resolve_component

    adapter = get_adapter(family)
    temporal_factor = adapter.vae_factors(pipe)[0]
    return resolve_component(pipeline_ropes(adapter, pipe), opts.base_frames, opts.riflex_k, temporal_factor)


# What an evaluation writes into its folder: the entries --overwrite moves aside (anything else stays put).
EVAL_OUTPUTS = (
    "results.json",
    "report.md",
    "metrics_vs_length.png",
    "motion_over_time.png",
    "radial_masks.png",
    "strips",
    "videos",
)


def claim_output(opts: GridOptions, model_name: str | None, settings: dict[str, Any]) -> None:
    """Before a grid writes anything: with ``opts.overwrite`` an earlier evaluation in ``out_dir`` moves to
    ``previous/<time>/``; without, an earlier ``results.json`` whose videos were made from another model, other
    prompts or other settings stops the run in one line, before the model loads. Other lengths or variants are
    fine (the cells they share are reused), and so are other analysis options (``segments``, ``dataset``): they
    change only results.json and the report, which every run writes anew from its cells. (A cell made with other
    settings that this check cannot see, e.g. a LoRA retrained at the same path, is caught by ``generate`` before
    it is replaced.)"""
    out = Path(opts.out_dir)
    holds, differ = "an earlier evaluation", []
    if not opts.overwrite:
        try:
            old = json.loads((out / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        analysis = ("segments", "dataset")
        new = {"model": model_name, "prompts": opts.prompts, **files.jsonable(settings)}
        old = {"model": old.get("model"), "prompts": old.get("prompts"), **(old.get("settings") or {})}
        differ = [
            f"{k} {json.dumps(old.get(k))} -> {json.dumps(v)}"
            for k, v in new.items()
            if k not in analysis and old.get(k) != v
        ]
        if not differ:
            return
        holds = f"an evaluation with other settings ({', '.join(differ[:3])})"
    moved = files.set_aside(
        out,
        EVAL_OUTPUTS,
        overwrite=opts.overwrite,
        holds=holds,
        ways="choose another --out (a rerun with the same settings reuses its finished cells)",
    )
    if moved is not None:
        logger.info("--overwrite: the earlier evaluation in %s moved to %s", out, moved)


def _dataset_task(dataset: Path) -> str:
    """ "i2v" for a dataset prepared with an image-to-video model (its dataset.json), else "t2v"."""
    info = json.loads((Path(dataset) / "dataset.json").read_text(encoding="utf-8"))
    return info.get("task") or "t2v"


def run_grid(opts: GridOptions) -> dict[str, Any]:
    """Run (or resume) the grid and write ``results.json``, ``report.md`` and the plots into ``opts.out_dir``,
    holding its lock (:class:`radial_lora.locks.FolderLock`)."""
    from radial_lora.inference.generate import resolve_attention_settings

    if not opts.prompts:
        raise ValueError("no prompts; pass --prompt TEXT or --prompts FILE")
    if any(v.riflex for v in opts.variants) and opts.base_frames is None and opts.riflex_k is None:
        raise ValueError("RIFLEx variants need the length the model was trained for (--base-frames) or --riflex-k")
    if opts.dataset is not None and not (Path(opts.dataset) / "dataset.json").is_file():
        raise FileNotFoundError(f"--dataset {opts.dataset}: no dataset.json; run `radial-lora data prepare` first")
    if opts.images is None and opts.dataset is not None and _dataset_task(opts.dataset) == "i2v":
        opts.prompts, opts.images = heldout_conditions(opts.dataset, opts.lengths, opts.heldout_max_clips)
        logger.info("image-to-video: %d held-out clips' captions and first frames", len(opts.prompts))
    for variant in opts.variants:
        for path, _ in variant.loras:
            check_lora(path)  # a missing, truncated or damaged LoRA: one line, before the model loads
    user_attn = {
        "decay_factor": opts.decay_factor,
        "block_size": opts.block_size,
        "dense_layers": opts.dense_layers,
        "dense_timesteps": opts.dense_timesteps,
    }
    # One set of mask settings for every variant (the first LoRA's training metadata fills what the user
    # left out), so base and LoRA cells are compared under the same mask.
    first_lora = [s for v in opts.variants for s in v.loras][:1]
    attn, _ = resolve_attention_settings(user_attn, first_lora)
    model_name = str(opts.model) if isinstance(opts.model, str | os.PathLike) else None
    with FolderLock(opts.out_dir, "radial-lora evaluate"):
        claim_output(opts, model_name, _grid_settings(opts, {k: attn[k] for k in user_attn}))
        return _run_grid(opts, attn, {k: attn[k] for k in user_attn}, model_name)


def _run_grid(
    opts: GridOptions, attn: dict[str, Any], grid_attn: dict[str, Any], model_name: str | None
) -> dict[str, Any]:
    """The grid once it holds ``out_dir``: every cell, the held-out losses, results.json, plots, report."""
    from radial_lora.eval.plots import write_plots, write_strip
    from radial_lora.eval.report import write_report
    from radial_lora.inference.generate import generate, load_model

    out = Path(opts.out_dir)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    pipe, family = load_model(
        opts.model, opts.family, device=opts.device, dtype=opts.dtype, offload=opts.offload, vae_tiling=opts.vae_tiling
    )
    riflex_k = _riflex_component(pipe, family, opts)
    # Dense references first, so every radial cell can be compared as soon as it is done.
    order = sorted(opts.variants, key=lambda v: v.pattern != "dense")
    cells_todo = [(length, v) for length in opts.lengths for v in order]
    frames_of: dict[tuple[str, int], list[np.ndarray]] = {}
    cells: list[dict[str, Any]] = []
    real = _real_motion(pipe, family, opts)
    for length, variant in tqdm(cells_todo, desc="eval cells", unit="cell"):
        results = generate(
            pipe,
            opts.prompts,
            num_frames=length,
            height=opts.height,
            width=opts.width,
            out_dir=videos,
            pattern=variant.pattern,
            loras=variant.loras,
            backend=opts.backend,
            seed=opts.seed,
            steps=opts.steps,
            guidance=opts.guidance,
            fps=opts.fps,
            family=family,
            negative_prompt=opts.negative_prompt,
            names=[_cell_name(variant, length, i) for i in range(len(opts.prompts))],
            save_frames=True,
            skip_existing=True,
            riflex_k=riflex_k if variant.riflex else None,
            batch_size=opts.batch_size,
            images=opts.images,
            results_root=out,  # a cell of other settings: "--overwrite moves OUT aside", this run's flag
            **grid_attn,
        )
        if any(key[1] != length for key in frames_of):
            frames_of.clear()  # only this length's dense references stay in memory
        frames = [r.frames for r in results]
        if variant.pattern == "dense":
            frames_of[(variant.name, length)] = frames
        ref = reference_for(variant, opts.variants)
        ref_frames = frames_of.get((ref.name, length)) if ref is not None else None
        cell = _cell(length, variant, ref, results, _quality(frames, ref_frames, opts.segments), out)
        cell["sample_score"] = shape_score.score_prompts(frames, opts.prompts, opts.fps)
        cell["motion"] = motion_summary([long_video.score_frames(f, opts.fps) for f in frames], real.get(length))
        cell["strip"] = write_strip(out, cell, frames[0])
        cells.append(cell)
        logger.info(
            "cell %s @ %d frames: %.1fs, psnr %s",
            variant.name,
            length,
            cell["wall_time_s"],
            cell["quality"].get("psnr"),
        )

    heldout: dict[str, Any] = {}
    if opts.dataset is not None:
        for variant in tqdm(order, desc="held-out loss", unit="variant"):
            heldout[variant.name] = _heldout(pipe, family, variant, opts, attn, riflex_k)
        for cell in cells:
            per_bucket = heldout[cell["variant"]]["per_bucket"]
            cell["heldout_loss"] = per_bucket.get(str(cell["length"]))

    cells.sort(key=lambda c: (c["length"], [v.name for v in opts.variants].index(c["variant"])))
    results_doc = _results_doc(opts, model_name, family, grid_attn, cells, heldout, real)
    files.write_json_atomic(out / "results.json", results_doc)
    plots = write_plots(out, files.from_jsonable(files.jsonable(results_doc)), family)
    write_report(out, results_doc, plots)
    return results_doc
