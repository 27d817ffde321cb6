"""`radial-lora score PATH... [--reference DIR_OR_FILES] [--json]`: frozen, looping and fading videos."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="measure motion over time and flag frozen, looping and degrading videos (no model weights)",
        description="Score videos for what goes wrong past a model's trained length: motion per quarter of the "
        "clip (short sides of the frame per second), frozen (the motion stops for a quarter of the clip or "
        "more), looping (the clip plays back and forth or repeats a stretch of itself), degrading (contrast, "
        "sharpness or colour fade). With --reference, motion relative to real clips of the same length "
        "(1.0 = as much). docs/EVALUATION.md says what each number is and why its threshold. Exit status 1 when "
        "a file could not be read (the others are still scored).",
    )
    p.add_argument("paths", nargs="+", help="video files, or folders of videos (their files, not sub-folders)")
    p.add_argument(
        "--reference",
        nargs="+",
        default=None,
        metavar="DIR_OR_FILE",
        help="real clips to compare motion with (same frame count; all of them when none has it)",
    )
    p.add_argument("--json", action="store_true", help='print {"videos": [...], "errors": [...]} as JSON')
    p.set_defaults(func=run)


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(videos: list[dict[str, Any]]) -> str:
    """The readable table: one row per video."""
    rows = [
        "| video | frames | motion | per quarter | vs real | frozen | looping | degrading |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in videos:
        quarters = " / ".join(_f(q) for q in v["motion_quarters"])
        loop = f"yes ({v['loop_kind']}, {v['loop_share']:.0%})" if v["looping"] else "no"
        fade = [
            name
            for name, key in (
                ("contrast", "contrast_change"),
                ("sharpness", "sharpness_change"),
                ("colour", "colour_change"),
            )
            if v[key] <= -0.2
        ]
        rows.append(
            f"| {v['path']} | {v['frames']} | {_f(v['motion'])} | {quarters} | {_f(v['motion_ratio'], 2)} | "
            f"{'yes' if v['frozen'] else 'no'} ({v['still_share']:.0%} still) | {loop} | "
            f"{'yes' if v['degrading'] else 'no'}{' (' + ', '.join(fade) + ' down)' if fade else ''} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from radial_lora.eval.long_video import score_paths

    result = score_paths(args.paths, args.reference, progress=not args.json)
    for error in result.errors:
        print(f"radial-lora score: cannot score {error['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(table(result.videos))
        if result.reference:
            by = ", ".join(f"{k} frames {v:.3f}" for k, v in result.reference["motion_by_frames"].items())
            print(f"\nreference: {result.reference['clips']} clips, median motion {by} (short sides per second)")
        print("\nmotion: short sides of the frame per second; frozen/looping/degrading: docs/EVALUATION.md")
    return 1 if result.errors else 0
