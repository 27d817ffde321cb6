"""`radial-lora mask`: build the radial block mask for a video size and show what it saves."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mask",
        help="build a radial attention mask: density, FLOPs, picture",
        description="Build the radial block mask for a video geometry and print its density and the "
        "attention FLOPs it saves. Give either --frames/--height/--width (pixels) or "
        "--latent-frames/--tokens-per-frame. Sparsity counts the [nb, nb] blocks the mask drops, over the whole "
        "sequence (video and, for HunyuanVideo, text; Wan's sink frame included); the paper's Table 2 numbers "
        "correspond to other settings: docs/RADIAL_MASK.md.",
    )
    p.add_argument(
        "--model",
        default="wan",
        help="a family (wan = Wan2.1, wan22 = Wan2.2, hunyuan, hunyuan15; the -i2v ones) for its defaults, or a "
        "published hub id / pipeline "
        "folder (e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers: its VAE, patch and heads too)",
    )
    p.add_argument("--frames", type=int, help="video frames (4k+1, e.g. 81, 161)")
    p.add_argument("--height", type=int, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, help="video width in pixels (multiple of 16)")
    p.add_argument("--latent-frames", type=int, help="latent frames (instead of pixel geometry)")
    p.add_argument("--tokens-per-frame", type=int, help="tokens per latent frame (instead of pixel geometry)")
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help="decay factor (default: wan 0.2, wan22 0.8, hunyuan and hunyuan15 0.95)",
    )
    p.add_argument("--block-size", type=int, default=None, help="tokens per block (default: 128; wan22 64)")
    p.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="text tokens appended (default: wan 0, hunyuan 256, hunyuan15 1985)",
    )
    p.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads, for FLOPs (default: the model's; wan/wan22 40 as the 14B models, hunyuan 24)",
    )
    p.add_argument("--head-dim", type=int, default=128, help="head dimension, for FLOPs (default 128)")
    p.add_argument("--save-npy", type=Path, help="write the [nb, nb] bool mask as .npy")
    p.add_argument("--save-png", type=Path, help="write a picture of the block pattern")
    p.set_defaults(func=run)


def _model(name: str) -> tuple[str, int | None, tuple[int, int], tuple[int, int, int]]:
    """``(family, heads or None, (temporal, spatial) VAE factors, patch)`` of a family name or a model."""
    from radial_lora.constants import FAMILIES

    if name in FAMILIES:  # the family's own defaults (its adapter's)
        from radial_lora.models.registry import get_adapter

        adapter = get_adapter(name)
        return name, adapter.reference_heads, adapter.lone_vae_factors({}), adapter.default_patch
    from radial_lora.models.published import describe_model, patch_of

    found = describe_model(name)
    return found.family, int(found.transformer["num_attention_heads"]), found.vae, patch_of(found.transformer)


def _geometry(args: argparse.Namespace, vae: tuple[int, int], patch: tuple[int, int, int]) -> tuple[int, int, str]:
    """(latent frames, tokens per frame, description) from whichever geometry form was given."""
    from radial_lora.geometry import latent_geometry

    pixels = [args.frames, args.height, args.width]
    latent = [args.latent_frames, args.tokens_per_frame]
    if any(x is not None for x in pixels) and any(x is not None for x in latent):
        raise ValueError("give either --frames/--height/--width or --latent-frames/--tokens-per-frame, not both")
    if all(x is not None for x in pixels):
        geo = latent_geometry(
            args.frames, args.height, args.width, temporal_factor=vae[0], spatial_factor=vae[1], patch=patch
        )
        text = (
            f"{args.frames} frames {args.height}x{args.width} -> {geo.latent_frames} latent frames x "
            f"{geo.latent_height // patch[1]}x{geo.latent_width // patch[2]} patches = {geo.tokens_per_frame} "
            f"tokens per frame (VAE {vae[0]}x{vae[1]}x{vae[1]})"
        )
        return geo.latent_frames, geo.tokens_per_frame, text
    if all(x is not None for x in latent):
        for name, value in (("--latent-frames", args.latent_frames), ("--tokens-per-frame", args.tokens_per_frame)):
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        return (
            args.latent_frames,
            args.tokens_per_frame,
            f"{args.latent_frames} latent frames x {args.tokens_per_frame} tokens",
        )
    raise ValueError(
        "missing geometry: give all of --frames/--height/--width (e.g. --frames 161 --height 720 --width 1280) "
        "or both --latent-frames and --tokens-per-frame"
    )


def _atomic(path: Path, write) -> None:
    """``write(file handle)`` into a finished ``path`` (radial_lora.files.atomic_path)."""
    from radial_lora.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def save_png(mask: np.ndarray, path: Path, title: str) -> None:
    """Picture of the block pattern (kept blocks dark), like the paper's mask figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=150)
    ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    fig.tight_layout()
    _atomic(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from radial_lora.constants import FAMILY_BLOCK_SIZE, FAMILY_DECAY
    from radial_lora.mask import attention_cost, radial_block_mask
    from radial_lora.models.registry import get_adapter

    family, heads, vae, patch = _model(args.model)
    adapter = get_adapter(family)  # an image-to-video family: its text-to-video twin's attention
    frames, tokens, described = _geometry(args, vae, patch)
    decay = FAMILY_DECAY[family] if args.decay is None else args.decay
    block = FAMILY_BLOCK_SIZE[family] if args.block_size is None else args.block_size
    args.block_size = block
    text = adapter.joint_text_tokens if args.text_tokens is None else args.text_tokens
    if args.heads is None:
        args.heads = heads
    for name, value in (("--heads", args.heads), ("--head-dim", args.head_dim)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    mask = radial_block_mask(
        frames, tokens, block_size=block, decay_factor=decay, model_type=adapter.mask_model_type, num_text_tokens=text
    )
    seq = frames * tokens + text
    cost = attention_cost(mask, seq, head_dim=args.head_dim, num_heads=args.heads, block_size=args.block_size)
    print(f"geometry:      {described}")
    print(f"sequence:      {frames * tokens} video + {text} text = {seq} tokens")
    print(f"mask:          {mask.shape[0]} x {mask.shape[1]} blocks of {args.block_size} ({family}, decay {decay})")
    print(f"density:       {cost.density:.4f}  (sparsity {1 - cost.density:.4f})")
    print(
        f"attention:     {cost.dense_flops / 1e12:.2f} TFLOPs dense vs {cost.radial_flops / 1e12:.2f} TFLOPs radial "
        f"per layer forward ({args.heads} heads x {args.head_dim})"
    )
    print(f"ideal speedup: {cost.ideal_speedup:.2f}x")
    arr = mask.numpy()
    if args.save_npy:
        _atomic(args.save_npy, lambda fh: np.save(fh, arr))
        print(f"wrote {args.save_npy}")
    if args.save_png:
        title = (
            f"{family} radial mask: {frames} latent frames x {tokens} tokens + {text} text\n"
            f"block {args.block_size}, decay {decay}, density {cost.density:.3f}"
        )
        save_png(arr, args.save_png, title)
        print(f"wrote {args.save_png}")
    return 0
