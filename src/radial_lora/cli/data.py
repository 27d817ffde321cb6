"""`radial-lora data prepare|sample|validate`: build, make and check training datasets (docs/DATA.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radial_lora.constants import FAMILIES


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts like 17,65, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("give at least one frame count, e.g. 17,65")
    return values


def _size(text: str) -> int | tuple[int, int]:
    """`64` or `HEIGHTxWIDTH` (e.g. 48x80)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must be N or HEIGHTxWIDTH, got {text!r}") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare, generate or check datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser(
        "prepare",
        help="videos + captions -> cached latents per clip length",
        description="Encode clips of each length with the model's VAE and text encoder. Exit status: "
        "0 all inputs used, 3 some input skipped (listed in the log and summary), 2 usage error.",
    )
    p.add_argument(
        "input", type=Path, nargs="?", help="folder of videos with same-named .txt captions, or a CSV/JSONL/JSON"
    )
    p.add_argument("--input", type=Path, dest="input_option", metavar="INPUT", help="the same, as an option")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (resumed if it exists)")
    p.add_argument("--model", required=True, help="diffusers model folder or hub id")
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="model family (default: read from the model's model_index.json)",
    )
    p.add_argument("--lengths", type=_int_list, default=(17, 65), help="frame counts, 4k+1 each (default 17,65)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0, help="resample every video to this frame rate")
    p.add_argument("--clip-mode", choices=["start", "middle", "sliding"], default="start")
    p.add_argument(
        "--stride", type=int, default=None, help="sliding mode: frames between clip starts (default: length)"
    )
    p.add_argument("--max-clips", type=int, default=None, help="at most this many clips per video and length")
    p.add_argument("--batch-size", type=int, default=1, help="clips per VAE call")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model weights (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--video-column", default=None, help="CSV/JSONL column with the video path (default: video, ...)")
    p.add_argument("--caption-column", default=None, help="CSV/JSONL column with the caption (default: caption, ...)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="GPU: keep the VAE and text encoder(s) on the CPU, each on the GPU only while it encodes (when they "
        "do not fit together; the transformer is never loaded)",
    )
    p.set_defaults(func=_prepare)

    s = sub.add_parser("sample", help="write the synthetic bouncing-shapes video dataset (folder format)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--num-videos", type=int, default=8)
    s.add_argument("--frames", type=int, default=81)
    s.add_argument("--size", type=_size, default=64, help="N or HEIGHTxWIDTH (default 64)")
    s.add_argument("--fps", type=float, default=16.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)

    v = sub.add_parser(
        "validate",
        help="check a prepared dataset (files, shapes, checksums, NaN/Inf)",
        description="Exit status: 0 usable, 1 problems found (the first ones are listed), 2 usage error.",
    )
    v.add_argument("dataset", type=Path)
    v.add_argument("--no-checksums", action="store_true", help="skip the sha256 check (faster)")
    v.add_argument("--max-problems", type=int, default=20, help="list at most this many problems")
    v.set_defaults(func=_validate)


def _prepare(args: argparse.Namespace) -> int:
    import torch

    from radial_lora.data.prepare import PrepareOptions, prepare_dataset

    if (args.input is None) == (args.input_option is None):
        raise ValueError("give the input once: `data prepare INPUT ...` or `data prepare --input INPUT ...`")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    opts = PrepareOptions(
        input=args.input or args.input_option,
        out=args.out,
        model=args.model,
        family=args.family,
        lengths=args.lengths,
        height=args.height,
        width=args.width,
        fps=args.fps,
        clip_mode=args.clip_mode,
        stride=args.stride,
        max_clips=args.max_clips,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        video_column=args.video_column,
        caption_column=args.caption_column,
        offload=args.offload,
    )
    summary = prepare_dataset(opts)
    print(summary.format())
    for skip in summary.skipped:
        print(f"skipped {skip.source}: {skip.reason}")
    return summary.exit_code


def _sample(args: argparse.Namespace) -> int:
    from radial_lora.data.sample import write_sample_dataset

    if args.num_videos < 1 or args.frames < 1:
        raise ValueError(f"--num-videos {args.num_videos} and --frames {args.frames} must be >= 1")
    out = write_sample_dataset(args.out, args.num_videos, args.frames, args.size, args.fps, args.seed)
    print(f"wrote {args.num_videos} videos to {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from radial_lora.data.validate import validate_dataset

    if not args.dataset.exists():
        raise FileNotFoundError(f"{args.dataset}: no such dataset folder")
    report = validate_dataset(args.dataset, checksums=not args.no_checksums)
    print(report.format(args.max_problems), file=sys.stdout if report.ok else sys.stderr)
    return report.exit_code
