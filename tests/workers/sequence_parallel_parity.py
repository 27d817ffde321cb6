"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU): each family's tiny radial-patched transformer with
LoRA, split over the processes by Ulysses sequence parallelism, against the same transformer run whole in
each process, and ``generate(sequence_parallel=2)`` against one process. Rank 0 writes the largest differences
(outputs and LoRA gradients, frames) as JSON to ``argv[1]``; ``argv[2:5]``: tiny Wan and HunyuanVideo
pipeline folders, a scratch folder. ``SP_DEVICE=cuda`` (benchmarks/gpu_check.sh, 2+ GPUs): NCCL on
``cuda:LOCAL_RANK``, plus the step time of a Wan2.1-1.3B-width model at 81 frames 480p, split and whole."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from radial_lora.models import apply_radial_attention, build_tiny_pipeline, get_adapter
from radial_lora.models.sequence_parallel import disable_sequence_parallel, enable_sequence_parallel

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' shared tiny models and inputs
from model_cases import forward_backward, lora_model, model_inputs  # noqa: E402

DEVICE = torch.device(
    f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if os.environ.get("SP_DEVICE") == "cuda" else "cpu"
)


def training(report: dict, group: dist.ProcessGroup) -> None:
    """Three AdamW steps of each family's LoRA on the flow-matching loss, whole and split: the same losses."""
    from radial_lora.train.flow_matching import flow_step

    n = dist.get_world_size(group)
    for family in ("wan", "hunyuan"):
        losses = {}
        for split in (False, True):
            transformer = lora_model(family, DEVICE)
            apply_radial_attention(transformer, block_size=16, dense_layers=1)
            if split:
                enable_sequence_parallel(transformer, group)
            params = [p for p in transformer.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-3)
            latents, _, text = model_inputs(family, DEVICE)
            run = []
            for step in range(3):
                g = torch.Generator().manual_seed(step)
                noise = torch.randn(latents.shape, generator=g).to(DEVICE)
                sigmas = torch.rand(latents.shape[0], generator=g)
                loss = flow_step(get_adapter(family), transformer, latents, text, sigmas, noise).loss
                loss.backward()
                if split:  # what DDP/FSDP's average over the processes does in the trainer
                    for p in params:
                        dist.all_reduce(p.grad, group=group)
                        p.grad.div_(n)
                optimizer.step()
                optimizer.zero_grad()
                run.append(float(loss))
            losses["split" if split else "whole"] = run
        report[f"train_{family}"] = losses


def generation(report: dict, models: dict[str, str], scratch: Path) -> None:
    """The same prompts rendered whole (each process alone) and token-split over the group (rank 0 writes)."""
    import numpy as np

    from radial_lora.inference.generate import generate

    rank = dist.get_rank()
    for family, folder in models.items():
        kw = dict(num_frames=9, height=64, width=64, steps=2, family=family, save_frames=True, seed=3)
        kw |= {"device": str(DEVICE), "dtype": "float32"}
        prompts = ["a red fox in snow", "a boat"]
        whole = generate(folder, prompts, out_dir=scratch / f"{family}_whole_{rank}", **kw)
        split = generate(folder, prompts, out_dir=scratch / f"{family}_split", sequence_parallel=2, **kw)
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(split))
        report[f"generate_{family}_other"] = counts[1]
        if rank == 0:
            diffs = [np.abs(a.frames.astype(int) - b.frames.astype(int)) for a, b in zip(whole, split)]
            report[f"generate_{family}"] = {
                "videos": len(split),
                "max_diff": int(max(d.max() for d in diffs)),
                "mean_diff": float(np.mean([d.mean() for d in diffs])),
                "processes": split[0].info["processes"],
            }


def step_time(report: dict, group: dist.ProcessGroup) -> None:
    """Forward + backward of 2 blocks at the Wan2.1-1.3B width (12 x 128, ffn 8960), bf16, LoRA rank 128,
    81 frames 480p (21 x 1560 = 32,760 tokens): one GPU alone, then split over the group."""
    from radial_lora import lora
    from radial_lora.models.published import PUBLISHED, build_transformer

    config = dict(PUBLISHED["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"].transformer) | {"num_layers": 2}
    torch.manual_seed(0)
    transformer = build_transformer("wan", config, DEVICE).to(torch.bfloat16)
    transformer.requires_grad_(False)
    lora.add_lora(transformer, rank=128)
    apply_radial_attention(transformer)
    latents = torch.randn(1, 16, 21, 60, 104, device=DEVICE, dtype=torch.bfloat16)
    text = {"encoder_hidden_states": torch.randn(1, 512, 4096, device=DEVICE, dtype=torch.bfloat16)}

    def timed() -> float:
        times = []
        for _ in range(4):  # the first is the warm-up
            torch.cuda.synchronize(DEVICE)
            start = time.perf_counter()
            out = get_adapter("wan").predict(transformer, latents, torch.tensor([500.0], device=DEVICE), text)
            out.float().square().mean().backward()
            torch.cuda.synchronize(DEVICE)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    whole = timed()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    enable_sequence_parallel(transformer, group)
    split = timed()
    report["step_time"] = {
        "case": "2 blocks of Wan2.1-1.3B width, 81 frames 480p, bf16, LoRA 128, fwd+bwd, best of 3 after warm-up",
        "whole_s": whole,
        "split_s": split,
        "processes": dist.get_world_size(group),
        "split_peak_gib": torch.cuda.max_memory_allocated(DEVICE) / 2**30,
    }


def main(path: str, models: dict[str, str], scratch: Path) -> None:
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    torch.set_num_threads(1)
    group, n = dist.group.WORLD, dist.get_world_size()
    report: dict = {"world": n}
    for family in ("wan", "hunyuan", "wan-i2v", "hunyuan15", "hunyuan15-i2v", "hunyuan-i2v", "hunyuan-i2v-replace"):
        # HunyuanVideo-I2V's blocks are HunyuanVideo's, whose checkpointed run is checked: once is enough
        for checkpointing in (False,) if family.startswith("hunyuan-i2v") else (False, True):
            transformer = lora_model(family, DEVICE)
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            controller = apply_radial_attention(transformer, block_size=16, dense_layers=1)
            want_out, want_grads = forward_backward(family, transformer, DEVICE)
            enable_sequence_parallel(transformer, group)
            controller.reset_stats()
            got_out, got_grads = forward_backward(family, transformer, DEVICE)
            for g in got_grads.values():  # each rank's gradients sum to n x the true one (parallel.py)
                dist.all_reduce(g)
                g.div_(n)
            key = f"{family}{'_checkpointing' if checkpointing else ''}"
            report[key] = {
                "out_diff": float((got_out - want_out).abs().max()),
                "out_scale": float(want_out.abs().max()),
                "grad_diff": max(float((got_grads[k] - want_grads[k]).abs().max()) for k in want_grads),
                "grad_scale": max(float(v.abs().max()) for v in want_grads.values()),
                "grads": len(got_grads),
                "calls": dict(controller.calls),
            }
            if family == "wan" and not checkpointing:
                try:  # 7 latent frames x 16 = 112 tokens divide; 7 x 3 x 3 = 63 do not
                    transformer(
                        torch.randn(1, 4, 7, 6, 6, device=DEVICE),
                        torch.tensor([1.0], device=DEVICE),
                        torch.randn(1, 4, 32, device=DEVICE),
                    )
                except ValueError as exc:
                    report["indivisible_error"] = str(exc)
            disable_sequence_parallel(transformer)
            if family == "wan" and not checkpointing:
                again, _ = forward_backward(family, transformer, DEVICE)
                report["disabled_diff"] = float((again - want_out).abs().max())
    try:
        three = build_tiny_pipeline("wan", num_attention_heads=3).transformer.to(DEVICE)
        apply_radial_attention(three, block_size=16)
        enable_sequence_parallel(three, group)
    except ValueError as exc:
        report["heads_error"] = str(exc)
    training(report, group)
    generation(report, models, scratch)
    if DEVICE.type == "cuda":
        step_time(report, group)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], {"wan": sys.argv[2], "hunyuan": sys.argv[3]}, Path(sys.argv[4]))
