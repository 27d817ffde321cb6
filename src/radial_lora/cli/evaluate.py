"""`radial-lora evaluate`: the lengths x variants grid -> report.md, plots, mp4s and results.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from radial_lora.cli.generate import add_attention_arguments, base_length, images_of, prompt_entries
from radial_lora.inference.generate import parse_lora_spec

# Used when no prompt is given: varied motion, so temporal quality differences show.
DEFAULT_PROMPTS = [
    "A golden retriever runs along a beach at sunset, waves rolling in, the camera tracking beside it",
    "A red car drives up a winding snowy mountain road, snowflakes falling, aerial view",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compare base/LoRA x dense/radial across video lengths (report.md, plots, results.json)",
        description="Generate every (length, variant) cell with the same prompts and seeds and compare each "
        "with the dense video of the same weights. Finished cells are reused on a rerun. "
        "docs/LORA_LENGTH_EXTENSION.md explains the report.",
    )
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help='file with one prompt per line, or a JSON list of prompts and {"prompt": ..., "image": PATH} entries '
        "(image-to-video with --dataset and no images: the held-out clips' captions and first frames)",
    )
    p.add_argument(
        "--lengths",
        default="1x,2x",
        help="frame counts (81,161) or multiples of --base-frames (1x,2x,4x); default 1x,2x",
    )
    p.add_argument("--lora", default=None, metavar="PATH[:SCALE]", help="the LoRA under test")
    p.add_argument("--lora2", default=None, metavar="PATH[:SCALE]", help="a second LoRA to compare")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of WEIGHTS_ATTENTION: weights base, lora or lora2; attention dense, radial, riflex "
        "(dense attention + RIFLEx) or radial_riflex, e.g. base_dense,base_riflex,lora_radial (default: base "
        "and each given LoRA, dense and radial; lora2 radial only)",
    )
    p.add_argument("--dataset", type=Path, default=None, help="prepared dataset for the held-out loss per length")
    p.add_argument("--heldout-max-clips", type=int, default=8, help="clips per length for the held-out loss")
    p.add_argument("--segments", type=int, default=4, help="time segments for the drift metric (4 = quarters)")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: an earlier evaluation in --out moves to OUT/previous/<time>/ (without it, one made "
        "with other settings is an error; one with the same settings is resumed)",
    )
    add_attention_arguments(p)
    p.set_defaults(func=_evaluate, steps=30)


def _evaluate(args: argparse.Namespace) -> int:
    from radial_lora.eval.evaluate import GridOptions, default_variant_names, make_variants, parse_lengths, run_grid

    lora = parse_lora_spec(args.lora) if args.lora else None
    lora2 = parse_lora_spec(args.lora2) if args.lora2 else None
    names = (
        [n.strip() for n in args.variants.split(",") if n.strip()]
        if args.variants
        else default_variant_names(lora is not None, lora2 is not None)
    )
    if args.heldout_max_clips < 1 or args.segments < 1:
        raise ValueError("--heldout-max-clips and --segments must be >= 1")
    base_frames, source = base_length(args.base_frames, lora, args.family, args.model)
    lengths = parse_lengths(args.lengths, base_frames)
    print(f"lengths {args.lengths} = {lengths} frames: 1x is {base_frames} frames ({source})")
    entries = prompt_entries(args, DEFAULT_PROMPTS)
    opts = GridOptions(
        model=args.model,
        prompts=[prompt for prompt, _ in entries],
        images=images_of(entries),
        lengths=lengths,
        variants=make_variants(names, lora, lora2),
        out_dir=args.out,
        height=args.height,
        width=args.width,
        family=args.family,
        dense_layers=args.dense_layers,
        dense_timesteps=args.dense_timesteps,
        decay_factor=args.decay,
        block_size=args.block_size,
        backend=args.backend,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        fps=args.fps,
        negative_prompt=args.negative_prompt,
        device=args.device,
        dtype=args.dtype,
        dataset=args.dataset,
        heldout_max_clips=args.heldout_max_clips,
        segments=args.segments,
        offload=args.offload,
        vae_tiling=args.vae_tiling,
        base_frames=base_frames,
        riflex_k=args.riflex_k,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    run_grid(opts)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'results.json'}")
    return 0
