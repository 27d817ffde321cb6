"""`radial-lora plan`: the per-GPU memory of a training step before renting the GPUs (``memory_plan``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from radial_lora.constants import BASE_QUANTIZATIONS

PART_NAMES = {
    "weights": "base weights on the GPU (FSDP: shard + 2 gathered)",
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
    p.add_argument(
        "--base-quantization",
        choices=BASE_QUANTIZATIONS,
        default="none",
        help="model.base_quantization: the blocks' Linear weights in 8 bits (8bit = int8)",
    )
    p.add_argument("--blocks-to-swap", type=int, default=0, metavar="N", help="train.blocks_to_swap (one GPU)")
    p.add_argument(
        "--max-frames",
        action="store_true",
        help="one GPU: the longest clip (4k+1 frames) that fits --gpu-memory at --height x --width, and the "
        "cheapest settings that fit it (checkpointing, then offload, 8-bit base, block swap); --frames not needed",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def _inputs(args: argparse.Namespace):
    """``(dims, estimate kwargs)`` from --config or from the geometry options."""
    from radial_lora.memory_plan import config_plan_inputs, resolve_model
    from radial_lora.models.quantize import resolve_scheme
    from radial_lora.parallel import check_layout

    if args.config:
        from radial_lora.train.config import load_config

        raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        hardware = raw.get("_hardware", {})
        gpus = args.gpus or int(hardware.get("gpus", 1))
        memory = args.gpu_memory or float(hardware.get("gpu_memory_gb", 80.0))
        return config_plan_inputs(load_config(args.config), gpus, memory)
    needed = ("model", "height", "width") if args.max_frames else ("model", "frames", "height", "width")
    missing = [f"--{k}" for k in needed if getattr(args, k) is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --config FILE)")
    gpus = args.gpus or 1
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    check_layout(gpus, args.sequence_parallel)
    dims, vae = resolve_model(args.model)
    if args.max_frames:
        args.frames = 1 + vae[0]
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
        quantization=resolve_scheme(args.base_quantization),
        blocks_to_swap=args.blocks_to_swap,
    )


def _plan(args: argparse.Namespace) -> int:
    from radial_lora.memory_plan import GIB, advise, estimate, sequence_degrees, smallest_fitting_degree

    dims, base = _inputs(args)

    def make(**change):
        return estimate(dims, **(base | change))

    if args.max_frames:
        return _max_frames(args, dims, base, make)
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
        f"{f', base in {d.quantization}' if d.quantization else ''}"
        f"{f', {d.blocks_to_swap} blocks swapped' if d.blocks_to_swap else ''}"
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
        print(f"  host memory (offloaded inputs, swapped blocks): {d.host_bytes / GIB:.1f} GiB per process")
    for note in d.notes:
        print(f"  note: {note}")
    if smallest is not None and smallest != n:
        print(f"smallest sequence-parallel degree that fits: {smallest}")
    for tip in tips:
        print(f"to fit: {tip}")
    return 0


def _max_frames(args: argparse.Namespace, dims, base: dict, make) -> int:
    """``--max-frames``: the longest clip one GPU of ``--gpu-memory`` trains, and the settings for it."""
    from radial_lora.memory_plan import GIB, max_frames

    if base["gpus"] != 1 or base["sequence_parallel"] != 1:
        raise ValueError("--max-frames plans one GPU: leave out --gpus and --sequence-parallel")
    fixed = {k: base[k] for k in ("checkpointing", "offload", "quantization", "blocks_to_swap")}
    best = max_frames(lambda **kw: make(**(fixed | kw)), dims.blocks + dims.single_blocks, base["vae"][0])
    frames = None if best is None else best.frames
    memory = base["gpu_memory_gb"]
    if args.json:
        out = {"max_frames": frames, "gpu_memory_gb": memory, "settings": None if best is None else best.settings()}
        print(json.dumps(out | {"plan": None if best is None else best.to_dict()}))
        return 0
    if best is None:
        print(
            f"{args.model} at {base['width']}x{base['height']}: not even {1 + base['vae'][0]} frames fit {memory:g} GB"
        )
        return 0
    print(
        f"{args.model} at {base['width']}x{base['height']} on one {memory:g} GB GPU, LoRA rank {base['rank']}: "
        f"at most {frames} frames ({best.tokens} tokens), peak {best.peak_bytes_per_gpu / GIB:.1f} GiB"
    )
    print(
        "  settings: "
        + " ".join(f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in best.settings().items())
    )
    if best.host_bytes:
        print(f"  host memory: {best.host_bytes / GIB:.1f} GiB (offloaded inputs, swapped blocks)")
    return 0
