"""The 8-bit frozen base (``model.base_quantization``) against bf16 on a CPU: bytes, and how close LoRA
training stays.

``bytes``: one Wan2.1-T2V-14B block at its real width (351M parameters), built layer by layer so no bf16 copy
of the whole block exists when it is quantized: the block's tensor storage (exact) and the process's peak
resident set above what it held before (each scheme in a fresh process), bf16 vs int8 vs float8.

``train``: a real-config Wan2.1-T2V-1.3B transformer cut to one block (real width 1536, real embeddings and
head; diffusers' initialisation, the published weights cannot be downloaded here) and the shipped pre-trained
tiny Wan, LoRA rank 32 on the attention projections, a few AdamW steps on fixed random latents and text with
the flow-matching loss: per scheme the relative error of the first step's LoRA gradients and of the loss at
each step against the bf16 base, and of the LoRA's total update after the last step.

    python benchmarks/quantized_base.py [bytes|train]      (both by default; ~3 minutes on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from radial_lora.memory import _rss_bytes
from radial_lora.models.published import PUBLISHED, build_transformer
from radial_lora.models.quantize import _torchao_config, block_weight_shapes, module_bytes, quantized_linears

SCHEMES = (None, "int8", "float8")


def block_bytes(scheme: str | None) -> dict[str, float]:
    """One Wan2.1-14B block, layer by layer in bf16 (each Linear quantized as soon as it exists)."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    config = dict(PUBLISHED["Wan-AI/Wan2.1-T2V-14B-Diffusers"].transformer, num_layers=1)
    model = build_transformer("wan", config)  # meta: no memory
    block = model.blocks[0]
    chosen = {id(m) for _, m in quantized_linears(model)}
    before = _rss_bytes() or 0
    peak = before
    for module in block.modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.data = torch.randn(p.shape, dtype=torch.bfloat16) * 0.02
        if scheme is not None and id(module) in chosen:
            quantize_(module, _torchao_config(scheme), filter_fn=None)
        peak = max(peak, _rss_bytes() or 0)
    expected = block_weight_shapes(build_transformer("wan", config))[0].bytes(scheme)
    return {"storage": module_bytes(block), "planned": expected, "rss_peak_above_start": peak - before}


def _bytes_report() -> None:
    rows = {}
    for scheme in SCHEMES:
        code = f"import json, benchmarks.quantized_base as b; print(json.dumps(b.block_bytes({scheme!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows[scheme] = json.loads(out.strip().splitlines()[-1])
    base = rows[None]
    print("| Wan2.1-14B block | tensor storage | planner | ratio to bf16 | process peak above start | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scheme, r in rows.items():
        print(
            f"| {scheme or 'bf16'} | {r['storage'] / 1e6:.1f} MB | {r['planned'] / 1e6:.1f} MB | "
            f"{r['storage'] / base['storage']:.3f} | {r['rss_peak_above_start'] / 1e6:.0f} MB | "
            f"{r['rss_peak_above_start'] / base['rss_peak_above_start']:.3f} |"
        )


def _model(which: str) -> torch.nn.Module:
    if which == "tiny-wan-base":
        from diffusers import WanTransformer3DModel

        from radial_lora.models.builtin import resolve_model_id

        root = resolve_model_id("builtin:tiny-wan-base")
        return WanTransformer3DModel.from_pretrained(root, subfolder="transformer")
    torch.manual_seed(0)
    config = dict(PUBLISHED["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"].transformer, num_layers=1)
    return build_transformer("wan", config, "cpu")


def train_run(which: str, scheme: str | None, steps: int, side: int, frames: int) -> dict[str, list]:
    """Losses, first-step LoRA gradients and the final LoRA of ``steps`` AdamW steps at ``scheme``."""
    from radial_lora import lora
    from radial_lora.models.quantize import quantize_base
    from radial_lora.models.registry import get_adapter
    from radial_lora.train.flow_matching import flow_step

    model = _model(which).to(torch.bfloat16)
    model.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        params = lora.add_lora(model, rank=32)
    for p in params:
        p.data = p.data.float()
    if scheme is not None:
        quantize_base(model, scheme)
    g = torch.Generator().manual_seed(2)
    cfg = model.config
    x0 = torch.randn(1, cfg.in_channels, frames, side, side, generator=g)
    text = {"encoder_hidden_states": torch.randn(1, 512, cfg.text_dim, generator=g).to(torch.bfloat16)}
    noise, sigmas = torch.randn(x0.shape, generator=g), torch.tensor([0.6])
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, grads = [], []
    adapter = get_adapter("wan")
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flow_step(adapter, model, x0, text, sigmas, noise).loss
        loss.backward()
        if step == 0:
            grads = [p.grad.detach().clone() for p in params]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    update = [p.detach() - s for p, s in zip(params, start)]
    return {"losses": losses, "grads": grads, "update": update}


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).float().square().sum()) for x, y in zip(a, b))
    return (num / sum(float(y.float().square().sum()) for y in b)) ** 0.5


def _train_report(steps: int = 5) -> None:
    print(f"| model | base | LoRA grad error (step 1) | loss error, worst of {steps} steps | LoRA update error |")
    print("| --- | --- | --- | --- | --- |")
    for which, side, frames in (("Wan2.1-1.3B, 1 block", 16, 5), ("tiny-wan-base", 8, 5)):
        runs = {s: train_run(which, s, steps, side, frames) for s in SCHEMES}
        ref = runs[None]
        for scheme in SCHEMES[1:]:
            r = runs[scheme]
            loss_err = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            print(
                f"| {which} | {scheme} | {_rel(r['grads'], ref['grads']):.4f} | {loss_err:.5f} | "
                f"{_rel(r['update'], ref['update']):.4f} |"
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    which = sys.argv[1:] or ["bytes", "train"]
    if "bytes" in which:
        _bytes_report()
    if "train" in which:
        _train_report()
