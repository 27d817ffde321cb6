"""Benchmark: one LoRA training step (forward, backward, AdamW) at an extended length, radial vs dense.

The model is a real ``WanTransformer3DModel`` with random weights, large enough that self-attention
dominates: CPU default 4 blocks, dim 128 (2 heads x 64), 81 latent frames x 256 tokens = 20736 tokens
(a 321-frame video), Wan mask decay 0.2 with 128-token blocks, first block dense (``dense_layers=1`` of 4;
the shipped configs use 2 of 40). A narrow model at a long sequence is where attention is most of the
step, as it is for the 14B models at 720p. CUDA (``--device cuda``): bf16, 8 blocks of
dim 1536 at 81 frames 480p (21 x 1560 = 32760 tokens). The step is the trainer's step: the same
``add_lora`` + ``apply_radial_attention`` + flow-matching loss + ``AdamW``.

Each pattern runs in its own subprocess (a fresh peak-memory counter) and the patterns alternate,
so load from other jobs hits both alike; the step time is the best of ``--repeats`` after a warm-up.
Peak memory: CPU = peak resident set (VmHWM) above the resident set before the first step; CUDA =
``torch.cuda.max_memory_allocated``. Writes the "Training step" section of ``benchmarks/RESULTS.md``
(between ``<!-- train:begin -->`` and ``<!-- train:end -->``; CUDA: ``train-cuda``; other sections are
left alone).

    python benchmarks/train_step.py [--quick] [--device cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # sibling module with the RESULTS.md helpers

from attention import update_section  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "train"
# Context for CPU readers, from this machine (2 shared cores), November 2026.
NOTE_CPU = (
    "CPU timings use the `sparse` kernel (exact tile cover of the kept blocks with the fused CPU flash-attention "
    "kernel) for the radial step and SDPA for the dense one; the GPU path (`--device cuda`, FlexAttention) is "
    "measured separately. This narrow model is a toy: at the real width, `--case wan1.3b-480p` (section "
    "train-real) is the measurement that counts."
)


# The Wan2.1-1.3B width at 81 frames of 832x480 (21 x 1560 tokens), bfloat16, the paper's LoRA rank 128.
WAN13B_480P = dict(
    heads=12, head_dim=128, ffn=8960, frames=21, lat_h=60, lat_w=104, text=64, rank=128, dtype="bfloat16"
)


def _setup(device: str, quick: bool, case: str = "toy") -> dict[str, Any]:
    if case == "wan1.3b-480p":  # one block, radial (it stands for the 38 radial blocks of 40), one timed step
        return dict(WAN13B_480P, layers=1, dense_layers=0, repeats=1, warmup=0)
    if device == "cuda":
        return dict(WAN13B_480P, layers=8, dense_layers=1, repeats=5)
    if quick:
        return dict(
            layers=2,
            heads=4,
            head_dim=64,
            ffn=512,
            frames=21,
            lat_h=16,
            lat_w=16,
            text=16,
            rank=16,
            dense_layers=1,
            dtype="float32",
            repeats=2,
        )
    return dict(
        layers=4,
        heads=2,
        head_dim=64,
        ffn=256,
        frames=81,
        lat_h=32,
        lat_w=32,
        text=16,
        rank=16,
        dense_layers=1,
        dtype="float32",
        repeats=2,
    )


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(pattern: str, device: str, s: dict[str, Any]) -> dict[str, Any]:
    """Time ``s['repeats']`` training steps of one attention pattern in this (fresh) process."""
    import torch
    from diffusers import WanTransformer3DModel

    from radial_lora import lora
    from radial_lora.mask import mask_density
    from radial_lora.models import get_adapter
    from radial_lora.models.radial import apply_radial_attention
    from radial_lora.train import flow_matching as fm

    torch.manual_seed(0)
    adapter = get_adapter("wan")
    dtype = getattr(torch, s["dtype"])
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=s["heads"],
        attention_head_dim=s["head_dim"],
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=s["ffn"],
        num_layers=s["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ).to(device=device, dtype=dtype)
    params = lora.add_lora(model, rank=s["rank"])
    for p in params:
        p.data = p.data.float()
    ctrl = apply_radial_attention(model, pattern=pattern, dense_layers=s["dense_layers"], block_size=128)
    model.enable_gradient_checkpointing() if device == "cuda" else None
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0 = torch.randn(1, 16, s["frames"], s["lat_h"], s["lat_w"], device=device)
    text = torch.randn(1, s["text"], 64, device=device, dtype=dtype)
    times = []
    rss0 = _rss_kib("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = s.get("warmup", 1)
    with ctrl.training_mode():
        for i in range(s["repeats"] + warmup):
            noise = torch.randn_like(x0)
            sig = torch.tensor([0.5], device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                loss = fm.flow_step(adapter, model, x0, {"encoder_hidden_states": text}, sig, noise).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:  # a first step warms caches (mask, plans, allocator)
                times.append(time.perf_counter() - t0)
    tokens = s["frames"] * (s["lat_h"] // 2) * (s["lat_w"] // 2)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (_rss_kib("VmHWM") - rss0) / 1024
    density = None
    if pattern == "radial":
        density = mask_density(ctrl.mask(s["frames"], tokens // s["frames"]), tokens, 128)
    return {
        "pattern": pattern,
        "step_s": min(times),
        "times": times,
        "peak_mb": peak_mb,
        "tokens": tokens,
        "density": density,
        "loss": loss.item(),
    }


def _run_worker(pattern: str, device: str, quick: bool, case: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", pattern, "--device", device, "--out", f.name, "--case", case]
        cmd += ["--quick"] if quick else []
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smaller model and length (smoke run)")
    p.add_argument(
        "--case",
        default="toy",
        choices=["toy", "wan1.3b-480p"],
        help="toy: the narrow model above; wan1.3b-480p: one block at the Wan2.1-1.3B width (12 x 128, ffn 8960), "
        "21 x 1560 tokens, bfloat16, LoRA rank 128, radial in that block (CPU section train-real)",
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per pattern")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", choices=["radial", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device cuda: CUDA is not available here (torch {torch.__version__}); nothing measured")
    s = _setup(args.device, args.quick, args.case)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.device, s)))
        return
    best: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for pattern in ("dense", "radial") if r % 2 == 0 else ("radial", "dense"):
            res = _run_worker(pattern, args.device, args.quick, args.case)
            print(f"round {r} {pattern}: step {res['step_s']:.3f}s peak {res['peak_mb']:.0f} MB", flush=True)
            old = best.get(pattern)
            best[pattern] = res if old is None or res["step_s"] < old["step_s"] else old
            best[pattern]["peak_mb"] = max(res["peak_mb"], (old or res)["peak_mb"])
    d, rd = best["dense"], best["radial"]
    speed, mem = d["step_s"] / rd["step_s"], rd["peak_mb"] / max(d["peak_mb"], 1e-9)
    frames = 4 * (s["frames"] - 1) + 1
    body = "\n".join(
        [
            f"`python benchmarks/train_step.py{' --quick' if args.quick else ''}"
            f"{f' --case {args.case}' if args.case != 'toy' else ''}"
            f"{f' --rounds {args.rounds}' if args.rounds != 2 else ''}"
            f"{' --device cuda' if args.device == 'cuda' else ''}`"
            f" - {dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs visible, torch threads default"
            + (f", {__import__('torch').cuda.get_device_name()}" if args.device == "cuda" else ""),
            "",
            f"One LoRA training step (forward + backward + AdamW) of a random-weight `WanTransformer3DModel`: "
            f"{s['layers']} blocks, dim {s['heads'] * s['head_dim']} ({s['heads']} heads x {s['head_dim']}), "
            f"{frames} frames = {s['frames']} latent frames x {d['tokens'] // s['frames']} tokens = "
            f"{d['tokens']} tokens, "
            f"{s['dtype']}, LoRA rank {s['rank']}, radial decay 0.2, 128-token blocks (mask density "
            f"{rd['density']:.3f}), first {s['dense_layers']} block(s) dense, backend auto. "
            f"Best of {s['repeats']} step(s) after {s.get('warmup', 1)} warm-up step(s) "
            f"x {args.rounds} alternating subprocess round(s).",
            "",
            "| attention | step time (s) | peak memory (MB) | speed-up vs dense | memory vs dense |",
            "|---|---|---|---|---|",
            f"| dense | {d['step_s']:.3f} | {d['peak_mb']:.0f} | 1.00x | 1.00x |",
            f"| radial | {rd['step_s']:.3f} | {rd['peak_mb']:.0f} | {speed:.2f}x | {mem:.2f}x |",
            "",
            "Speed-up = dense step time / radial step time (> 1: radial faster); memory = radial peak / dense peak "
            "(< 1: radial smaller). Peak memory on CPU is the largest resident-set high-water mark above the "
            "process's size before the first step (model weights excluded); shared CPUs make absolute times noisy, "
            "the ratios are measured side by side in one run.",
            *([""] + [NOTE_CPU] if args.device == "cpu" and args.case == "toy" else []),
        ]
    )
    print(body)
    if not args.no_write:
        name = SECTION + ("-cuda" if args.device == "cuda" else "-real" if args.case != "toy" else "")
        update_section(RESULTS, name, "## Training step", body)


if __name__ == "__main__":
    main()
