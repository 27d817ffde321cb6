"""`radial-lora demo --out runs/demo [--quick]`: the whole method on the shipped tiny model, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from radial_lora.demo import ASSET, DEFAULT_CONFIG

    p = subparsers.add_parser(
        "demo",
        help="extend the shipped tiny Wan model to 4x its length on a CPU and write REPORT.md",
        description="The Radial Attention paper's Table 2 in miniature: sample videos -> prepare -> train a "
        "radial-attention and a dense-attention LoRA at 4x -> time dense vs radial -> evaluate the original model, "
        "radial attention, RIFLEx and both LoRAs at 1x/2x/4x on samples and held-out loss -> OUT/REPORT.md. "
        "Rerun to resume; finished steps are skipped.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (a minute or two): a smoke test")
    p.add_argument("--model", type=Path, default=ASSET, help="a tiny Wan pipeline folder (default: the shipped one)")
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="training config (default: the packaged assets/demo_tiny_4x.json)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for this tiny model on shared cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="first training seed; also the sampling seed")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each LoRA with this many seeds (seed, seed+1, ...) and report mean and spread (default 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from radial_lora.demo import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(
            out=args.out,
            quick=args.quick,
            model=args.model,
            config=args.config,
            threads=args.threads,
            seed=args.seed,
            seeds=args.seeds,
        )
    )
    print(f"demo report: {report}")
    return 0
