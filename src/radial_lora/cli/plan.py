"""`radial-lora plan`: the per-GPU memory of a training step before renting the GPUs (``memory_plan``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PART_NAMES = {
    "weights": "base weights (bf16; FSDP shard + 2 gathered blocks)",
    "lora_and_optimizer": "LoRA fp32 + grads + AdamW moments",
    "checkpointed_inputs": "checkpointed block inputs",
    "block_activations": "block activations (one block's recompute)",
    "attention_exchange": "sequence-parallel all-to-all buffers",
    "backward_transient": "transient gradients in backward (estimate)",
    "outside_blocks": "outside the blocks (embeddings, head, loss)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        description="Estimate the per-GPU peak memory of one LoRA training step (bf16 base, fp32 LoRA, AdamW) and "
        "say whether it fits and what would make it fit. Knows the published Wan2.1/Wan2.2/HunyuanVideo hub ids "
        "without downloading; reads a local folder's transformer config otherwise. docs/TRAINING.md",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a training config: model, longest length, resolution, LoRA, parallel and memory settings from it "
        "(and --gpus/--gpu-memory from its _hardware entry); the options below then only override the hardware",
    )
    p.add_argument("--model", help="hub id (e.g. Wan-AI/Wan2.1-T2V-14B-Diffusers) or pipeline folder")
    p.add_argument("--frames", type=int, help="frames per clip, 4k+1 (e.g. 161)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--gpus", type=int, default=None, help="processes (GPUs) in the job (default 1)")
    p.add_argument(
        "--gpu-memory", type=float, default=None, metavar="GB", help="memory per GPU in GB (1e9 bytes; default 80)"
    )
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N", help="train.sequence_parallel")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (q/k/v/out of every attention)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward per data-parallel rank")
    p.add_argument("--no-checkpointing", action="store_true", help="without train.gradient_checkpointing")
    p.add_argument("--offload", action="store_true", help="train.offload_checkpoints (block inputs in host memory)")
    p.add_argument("--ddp", action="store_true", help="a full base per GPU (train.distributed=ddp); default FSDP")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def _inputs(args: argparse.Namespace):
    """``(dims, estimate kwargs)`` from --config or from the geometry options."""
    from radial_lora.memory_plan import config_plan_inputs, resolve_model
    from radial_lora.parallel import check_layout

    if args.config:
        from radial_lora.train.config import load_config

        raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        hardware = raw.get("_hardware", {})
        gpus = args.gpus or int(hardware.get("gpus", 1))
        memory = args.gpu_memory or float(hardware.get("gpu_memory_gb", 80.0))
        return config_plan_inputs(load_config(args.config), gpus, memory)
    missing = [f"--{k}" for k in ("model", "frames", "height", "width") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --config FILE)")
    gpus = args.gpus or 1
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    check_layout(gpus, args.sequence_parallel)
    dims, vae = resolve_model(args.model)
    if (args.frames - 1) % vae[0]:
        raise ValueError(f"--frames {args.frames}: must be {vae[0]}k+1 (e.g. 81, 161)")
    return dims, dict(
        model=args.model,
        frames=args.frames,
        height=args.height,
        width=args.width,
        gpus=gpus,
        gpu_memory_gb=args.gpu_memory or 80.0,
        sequence_parallel=args.sequence_parallel,
        rank=args.rank,
        fsdp=not args.ddp and gpus > 1,
        checkpointing=not args.no_checkpointing,
        offload=args.offload,
        micro_batch=args.micro_batch,
        vae=vae,
    )


def _plan(args: argparse.Namespace) -> int:
    from radial_lora.memory_plan import GIB, advise, estimate, sequence_degrees, smallest_fitting_degree

    dims, base = _inputs(args)

    def make(**change):
        return estimate(dims, **(base | change))

    plan = make()
    gpus, n = base["gpus"], base["sequence_parallel"]
    degrees = sequence_degrees(dims, gpus, plan.tokens)
    if n not in degrees:
        raise ValueError(
            f"sequence parallel {n} must divide the GPUs ({gpus}), the heads ({dims.heads}) and the tokens "
            f"({plan.tokens}); degrees that do: {degrees}"
        )
    smallest = smallest_fitting_degree(dims, plan, make)
    tips = advise(plan, make, smallest)
    if args.json:
        print(json.dumps(plan.to_dict() | {"smallest_fitting_sequence_parallel": smallest, "advice": tips}))
        return 0
    d = plan
    print(
        f"{d.model}: {dims.params / 1e9:.2f}B parameters, {dims.blocks + dims.single_blocks} blocks, "
        f"{dims.heads} heads x {dims.head_dim}"
    )
    print(
        f"{base['frames']} frames {base['width']}x{base['height']}: {d.tokens} video tokens per sample, "
        f"{base['micro_batch']} per forward; {gpus} GPUs = {gpus // n} data x {n} sequence, "
        f"{'FSDP' if d.fsdp else 'full base per GPU'}, checkpointing {'on' if d.checkpointing else 'off'}"
        f"{', block inputs offloaded' if d.offload else ''}"
    )
    for key, value in d.parts.items():
        print(f"  {PART_NAMES[key]:<52} {value / GIB:8.1f} GiB")
    verdict = "fits" if d.fits else "does NOT fit"
    memory = d.gpu_memory_bytes / 1e9
    print(
        f"  {'peak per GPU':<52} {d.peak_bytes_per_gpu / GIB:8.1f} GiB  -> {verdict} in {memory:g} GB "
        "(10% slack + 1.5 GiB)"
    )
    if d.host_bytes:
        print(f"  host memory for offloaded inputs: {d.host_bytes / GIB:.1f} GiB per process")
    for note in d.notes:
        print(f"  note: {note}")
    if smallest is not None and smallest != n:
        print(f"smallest sequence-parallel degree that fits: {smallest}")
    for tip in tips:
        print(f"to fit: {tip}")
    return 0
