"""`radial-lora generate`: videos from prompts with radial (or dense) attention and optional LoRAs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from radial_lora.inference.generate import parse_lora_spec


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    """Model, attention and sampling options shared by `generate` and `evaluate` (None = LoRA or default)."""
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument(
        "--family",
        choices=["wan", "wan22", "hunyuan"],
        default=None,
        help="model family (detected from a local folder's model_index.json)",
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
    p.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less memory for long videos)")


def prompts_from_args(args: argparse.Namespace, default: list[str] | None = None) -> list[str]:
    """--prompt values plus the --prompts file; ``default`` when neither is given (else an error)."""
    from radial_lora.inference.generate import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts is not None:
        prompts += read_prompts(args.prompts)
    if not prompts and default:
        return list(default)
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate videos (mp4 + JSON sidecar per prompt)",
        description="Generate one video per prompt with the stock diffusers pipeline under radial attention. "
        "Settings left out come from the LoRA's training metadata, else the defaults. docs/LORA_LENGTH_EXTENSION.md",
    )
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line (or a JSON list)")
    p.add_argument("--frames", type=int, required=True, help="frames, 4k+1 (e.g. 81, 161)")
    p.add_argument("--pattern", choices=["radial", "dense"], default=None, help="attention (default radial)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to apply (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--skip-existing", action="store_true", help="reuse videos already written with the same settings")
    add_attention_arguments(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from radial_lora.inference.generate import generate

    results = generate(
        args.model,
        prompts_from_args(args),
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
        loras=[parse_lora_spec(s) for s in args.lora],
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
    )
    for r in results:
        a = r.info["attention"]
        print(
            f"{r.video_path}  {r.info['wall_time_s']:.1f}s  density {a['effective_density']:.3f}  "
            f"peak {r.info['peak_memory'].get('bytes', 0) / 2**30:.2f} GiB"
        )
    print(json.dumps({"videos": [str(r.video_path) for r in results]}))
    return 0
