"""Fit the activation coefficients of ``radial_lora.memory_plan`` to exact counts on the real diffusers blocks.

For each config of a small design (widths, FFN widths, heads, head dims, LoRA ranks, text lengths, frames,
latent channels) it counts the bytes autograd keeps for backward in a bf16 training forward with LoRA
(``memory_plan.measure_step``) at 1 and 2 blocks of each kind, with and without gradient checkpointing, and
solves the least-squares fit of each kind's per-block and outside-block bytes. Prints the coefficients as
the ``COEFFICIENTS`` literal and the worst relative residual; a few minutes on 2 cores.

``--check-published``: the fitted model against exact counts at the published Wan2.1-14B and HunyuanVideo
widths (one or two real blocks of each kind, LoRA rank 128, the pipelines' text lengths), per block, at two
token counts; about two minutes on 2 cores.

    python benchmarks/memory_model.py [--check-published]
"""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np

from radial_lora.memory_plan import BLOCK_FEATURES, OUTSIDE_FEATURES, dims_of, features, kept_bytes, measure_step
from radial_lora.models.published import PUBLISHED, hunyuan_config, wan_config

# heads, head_dim, ffn, rank, text, frames, channels
DESIGN = [
    (4, 64, 1024, 16, 64, 3, 16),
    (8, 64, 1024, 16, 64, 3, 16),
    (4, 64, 2048, 16, 64, 3, 16),
    (4, 64, 1024, 32, 64, 3, 16),
    (4, 64, 1024, 16, 128, 3, 16),
    (4, 64, 1024, 16, 64, 6, 16),
    (6, 64, 1536, 8, 96, 4, 32),
    (4, 32, 768, 16, 64, 5, 16),
    (2, 128, 512, 8, 32, 3, 48),
    (4, 64, 1024, 16, 512, 3, 16),  # the pipelines' own text lengths: Wan 512, HunyuanVideo 256
    (3, 128, 768, 8, 256, 4, 48),
    (6, 32, 640, 24, 512, 2, 16),
    (2, 64, 384, 4, 256, 5, 32),
]


def config(family: str, heads: int, head_dim: int, ffn: int, channels: int, blocks: int, single: int) -> dict:
    if family == "wan":
        return wan_config(heads, ffn, blocks, head_dim=head_dim, channels=channels, text_dim=64, freq_dim=32)
    mlp_ratio = ffn / (heads * head_dim)
    return hunyuan_config(heads, blocks, single, head_dim, mlp_ratio, 1, channels, text_dim=64, pooled_dim=32)


def row(names: tuple[str, ...], t: int, x: int, heads: int, head_dim: int, ffn: int, rank: int, c: int) -> list:
    v = features(t, x, hidden=heads * head_dim, ffn=ffn, rank=rank, heads=heads, head_dim=head_dim, channels=c)
    return [v[n] for n in names]


def fit(rows: list, ys: list) -> tuple[dict, float]:
    a, y = np.array([r[1] for r in rows], float), np.array(ys, float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    worst = float(np.max(np.abs(a @ coef - y) / np.abs(y)))
    return dict(zip(rows[0][0], (round(float(c), 3) for c in coef))), worst


def main() -> None:
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore")
    out = {}
    for family, kinds in (("wan", {"wan": (2, 0)}), ("hunyuan", {"double": (2, 1), "single": (1, 2)})):
        base_blocks = (1, 0) if family == "wan" else (1, 1)
        block_rows: dict[str, tuple[list, list]] = {k: ([], []) for k in kinds}
        outside = {False: ([], []), True: ([], [])}
        for heads, hd, ffn, rank, text, frames, c in DESIGN:

            def run(blocks: tuple[int, int], ckpt: bool, spec=(family, heads, hd, ffn, rank, text, frames, c)) -> tuple:
                fam, h, d, f, r, x, n, ch = spec
                cfg = config(fam, h, d, f, ch, *blocks)
                return measure_step(fam, cfg, frames=n, side=32, rank=r, text=x, checkpointing=ckpt)

            one, t = run(base_blocks, False)
            f = row(BLOCK_FEATURES, t, text, heads, hd, ffn, rank, c)
            per_kind = {}
            for kind, blocks in kinds.items():
                per_kind[kind] = run(blocks, False)[0] - one
                block_rows[kind][0].append((BLOCK_FEATURES, f))
                block_rows[kind][1].append(per_kind[kind])
            fo = row(OUTSIDE_FEATURES, t, text, heads, hd, ffn, rank, c)
            outside[False][0].append((OUTSIDE_FEATURES, fo))
            outside[False][1].append(one - sum(per_kind.values()))
            stream = (t + (text if family == "hunyuan" else 0)) * heads * hd * 2
            ckpt_one = run(base_blocks, True)[0]
            outside[True][0].append((OUTSIDE_FEATURES, fo))
            outside[True][1].append(ckpt_one - sum(base_blocks) * stream)
            print(family, (heads, hd, ffn, rank, text, frames, c), "tokens", t, flush=True)
        for kind, (rows, ys) in block_rows.items():
            out[kind], worst = fit(rows, ys)
            print(f"{kind}: worst residual {worst:.2e}")
        for ckpt, (rows, ys) in outside.items():
            name = f"{family}-outside" + ("-checkpointing" if ckpt else "")
            out[name], worst = fit(rows, ys)
            print(f"{name}: worst residual {worst:.2e}")
    print("COEFFICIENTS = {")
    for k, v in out.items():
        print(f"    {k!r}: {v},")
    print("}")


def check_published() -> None:
    """Per-block bytes kept for backward at the real widths: measured (difference of 2 and 1 blocks) vs the
    fitted model. Text terms are per block, so the bytes per video token fall as the sequence grows."""
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore")
    cases = (
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan", {"wan": (2, 0)}, (1, 0)),
        ("hunyuanvideo-community/HunyuanVideo", "hunyuan", {"double": (2, 1), "single": (1, 2)}, (1, 1)),
    )
    print("| model | block | video tokens | measured bytes | plan bytes | plan error | plan per token at 147,600 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for hub, family, kinds, base in cases:
        spec = PUBLISHED[hub]
        d = dims_of(family, spec.transformer)

        def cfg(blocks: tuple[int, int], spec=spec, family=family) -> dict:
            if family == "wan":
                return dict(spec.transformer) | {"num_layers": blocks[0]}
            return dict(spec.transformer) | {"num_layers": blocks[0], "num_single_layers": blocks[1]}

        for frames in (2, 3):
            run = {b: measure_step(family, cfg(b), frames=frames, side=32, rank=128, text=d.text_tokens,
                                   checkpointing=False) for b in (base, *kinds.values())}  # fmt: skip
            one, tokens = run[base]
            for kind, blocks in kinds.items():
                measured = run[blocks][0] - one
                plan = kept_bytes(kind, tokens, d.text_tokens, d, 128)
                long = kept_bytes(kind, 147_600, d.text_tokens, d, 128) / 147_600
                print(f"| {hub} | {kind} | {tokens} | {measured:,} | {plan:,.0f} | {plan / measured - 1:+.2%} "
                      f"| {long:,.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    check_published() if "--check-published" in sys.argv else main()
