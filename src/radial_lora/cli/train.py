"""`radial-lora train --config FILE [--set key=value ...] [--resume latest|PATH | --overwrite]` (docs/TRAINING.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a length-extension LoRA under radial attention",
        description="Train a LoRA so the base model generates longer videos under Radial Attention. "
        "Multi-GPU: `accelerate launch $(which radial-lora) train ...` (or torchrun) with the same config.",
    )
    p.add_argument("--config", required=True, help="JSON or TOML training config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, VALUE parsed as JSON (e.g. --set train.steps=100); repeatable",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue from the newest whole checkpoint of output_dir, or from a checkpoint directory",
    )
    how.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if output_dir holds a run: the old run moves to OUTPUT/previous/<time>/ (kept, "
        "and out of --resume latest's sight); without it such a folder is an error",
    )
    p.add_argument("--check", action="store_true", help="validate the config, print it resolved, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from radial_lora.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from radial_lora.train.trainer import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.lora_path is not None:
        print(
            f"LoRA: {result.lora_path} (steps {result.last_step}, final loss {result.losses[-1]:.6f})"
            if result.losses
            else f"LoRA: {result.lora_path}"
        )
    return 0
