"""`radial-lora evaluate`: the lengths x variants grid -> report.md, plots, mp4s and results.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from radial_lora.cli.generate import add_attention_arguments, prompts_from_args
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
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line (or a JSON list)")
    p.add_argument(
        "--lengths",
        default="1x,2x",
        help="frame counts (81,161) or multiples of --base-frames (1x,2x,4x); default 1x,2x",
    )
    p.add_argument(
        "--base-frames",
        type=int,
        default=None,
        help="length the model was trained for, what 1x means (default: the LoRA's recorded base_length, "
        "else the family's default: Wan 81, HunyuanVideo 129)",
    )
    p.add_argument("--lora", default=None, metavar="PATH[:SCALE]", help="the LoRA under test")
    p.add_argument("--lora2", default=None, metavar="PATH[:SCALE]", help="a second LoRA to compare")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of base_dense, base_radial, lora_dense, lora_radial, lora2_dense, lora2_radial "
        "(default: base and each given LoRA, dense and radial; lora2 radial only)",
    )
    p.add_argument("--dataset", type=Path, default=None, help="prepared dataset for the held-out loss per length")
    p.add_argument("--heldout-max-clips", type=int, default=8, help="clips per length for the held-out loss")
    p.add_argument("--segments", type=int, default=4, help="time segments for the drift metric (4 = quarters)")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
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
    opts = GridOptions(
        model=args.model,
        prompts=prompts_from_args(args, DEFAULT_PROMPTS),
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
    )
    run_grid(opts)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'results.json'}")
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
                "or --family wan|wan22|hunyuan"
            ) from None
    return get_adapter(family).default_frames, f"the {family} default, family from {how}"
