"""`radial-lora generate`: videos from prompts with radial (or dense) attention and optional LoRAs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from radial_lora.constants import FAMILIES
from radial_lora.inference.generate import parse_lora_spec


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    """Model, attention and sampling options shared by `generate` and `evaluate` (None = LoRA or default)."""
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="model family (default: read from the model's model_index.json, folder or hub id)",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image-to-video: the first frame of every video (scaled and centre-cropped to --height x --width)",
    )
    p.add_argument(
        "--last-image",
        type=Path,
        default=None,
        help="first-last-frame models (Wan2.1-FLF2V): the last frame of every video, with --image",
    )
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dense-layers", type=int, default=None, help="first N blocks keep dense attention")
    p.add_argument("--dense-timesteps", type=int, default=None, help="first N denoising steps dense")
    p.add_argument("--decay", type=float, default=None, help="mask decay factor (default: LoRA's, else family's)")
    p.add_argument("--block-size", type=int, default=None, help="mask block size in tokens (default 128)")
    p.add_argument("--backend", default="auto", choices=["auto", "flex", "sparse", "dense", "reference"])
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--base-frames",
        type=int,
        default=None,
        help="length the model was trained for: what 1x means, and what RIFLEx extends from (default: the "
        "LoRA's recorded base_length, else the family's default: Wan 81, HunyuanVideo 129)",
    )
    p.add_argument(
        "--riflex-k",
        type=int,
        default=None,
        help="RIFLEx: the temporal RoPE component to slow down (default: the first whose period covers "
        "--base-frames; HunyuanVideo 4)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="prompts per pipeline call (same noise per prompt; more memory)"
    )
    p.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less memory for long videos)")


def prompt_entries(args: argparse.Namespace, default: list[str] | None = None) -> list[tuple[str, Any]]:
    """``(prompt, image)`` of every --prompt and --prompts entry: an entry's own image, else --image (with
    --last-image: the pair ``(first, last)``)."""
    from radial_lora.inference.generate import read_prompt_entries

    entries: list[tuple[str, Any]] = [(p, None) for p in args.prompt or []]
    if args.prompts is not None:
        entries += read_prompt_entries(args.prompts)
    if not entries and default:
        entries = [(p, None) for p in default]
    if not entries:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    image, last = getattr(args, "image", None), getattr(args, "last_image", None)
    if last is not None:
        if image is None:
            raise ValueError("--last-image needs --image (the first frame) too")
        image = (image, last)
    return [(prompt, own or image) for prompt, own in entries]


def images_of(entries: list[tuple[str, Any]]) -> list[Any] | None:
    """The image of every prompt, or None when no prompt has one; some with and some without is an error."""
    images = [image for _, image in entries]
    if all(i is None for i in images):
        return None
    missing = [n for n, i in enumerate(images) if i is None]
    if missing:
        raise ValueError(
            f"prompt {missing[0]} ({entries[missing[0]][0][:40]!r}) has no image while others have one: give "
            "--image PATH for those, or an image in every prompts-file entry"
        )
    return images


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate videos (mp4 + JSON sidecar per prompt)",
        description="Generate one video per prompt with the stock diffusers pipeline under radial attention. "
        "Settings left out come from the LoRA's training metadata, else the defaults. docs/LORA_LENGTH_EXTENSION.md",
    )
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help='file with one prompt per line, or a JSON list of prompts and {"prompt": ..., "image": PATH} entries',
    )
    p.add_argument("--frames", type=int, required=True, help="frames, 4k+1 (e.g. 81, 161)")
    p.add_argument("--pattern", choices=["radial", "dense"], default=None, help="attention (default radial)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to apply (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--skip-existing", action="store_true", help="reuse videos already written with the same settings")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="videos of the same names made with other settings move to OUT/previous/<time>/ (without it: an error)",
    )
    p.add_argument(
        "--riflex",
        action="store_true",
        help="training-free length extrapolation (RIFLEx, Zhao et al. 2025): slow the temporal RoPE component "
        "that repeats; with or without a LoRA",
    )
    p.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each video's tokens over N processes (run under torchrun --nproc-per-node N, or a multiple "
        "of N: the groups share out the prompts); for videos too long for one GPU",
    )
    add_attention_arguments(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from radial_lora.inference.generate import generate

    loras = [parse_lora_spec(s) for s in args.lora]
    riflex_base = None
    if args.riflex:
        riflex_base = base_length(args.base_frames, loras[0] if loras else None, args.family, args.model)[0]
    entries = prompt_entries(args)
    results = generate(
        args.model,
        [prompt for prompt, _ in entries],
        images=images_of(entries),
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        out_dir=args.out,
        pattern=args.pattern,
        dense_layers=args.dense_layers,
        dense_timesteps=args.dense_timesteps,
        decay_factor=args.decay,
        block_size=args.block_size,
        backend=args.backend,
        loras=loras,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        fps=args.fps,
        family=args.family,
        negative_prompt=args.negative_prompt,
        device=args.device,
        dtype=args.dtype,
        skip_existing=args.skip_existing,
        offload=args.offload,
        vae_tiling=args.vae_tiling,
        riflex_base_frames=riflex_base,
        riflex_k=args.riflex_k,
        batch_size=args.batch_size,
        sequence_parallel=args.sequence_parallel,
        overwrite=args.overwrite,
    )
    for r in results:
        a = r.info["attention"]
        print(
            f"{r.video_path}  {r.info['wall_time_s']:.1f}s  density {a['effective_density']:.3f}  "
            f"peak {r.info['peak_memory'].get('bytes', 0) / 2**30:.2f} GiB"
        )
    print(json.dumps({"videos": [str(r.video_path) for r in results]}))
    return 0


def base_length(given: int | None, lora: tuple[str, float] | None, family: str | None, model: str) -> tuple[int, str]:
    """What 1x means, and where that came from: ``--base-frames``, else the ``base_length`` a radial-lora LoRA
    records, else the default length of the model family (``--family``, the LoRA's, or the model folder's)."""
    if given is not None:
        return given, "--base-frames"
    meta: dict = {}
    if lora is not None:
        from radial_lora.lora import LoraFormatError, read_lora_metadata

        try:
            meta = read_lora_metadata(lora[0])
        except LoraFormatError:
            raise
        except (ValueError, FileNotFoundError):
            meta = {}
    value = meta.get("base_length")
    if isinstance(value, int) and value > 0:
        return value, f"the LoRA's base_length, {lora[0]}"
    from radial_lora.models.registry import detect_family, get_adapter

    how = "--family" if family else "the LoRA's metadata" if meta.get("family") else "the model's model_index.json"
    family = family or meta.get("family")
    if family is None:
        try:
            family = detect_family(model)
        except ValueError:
            raise ValueError(
                f"cannot tell what 1x means for {model}: pass --base-frames N (the length it was trained for) "
                f"or --family ({', '.join(FAMILIES)})"
            ) from None
    return get_adapter(family).default_frames, f"the {family} default, family from {how}"
