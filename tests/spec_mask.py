"""A literal, slow transcription of docs/RADIAL_MASK.md, used only to check the fast mask.

It builds every frame pair's T x T token mask and shrinks it exactly as the spec says
(float32 densities, as the authors' torch code computes them). Cached by what a pair's
result depends on, so medium configurations stay testable.
"""

from __future__ import annotations

import math
from functools import cache

import torch


def _token_mask(i: int, j: int, t: int, b: int, decay: float, model: str) -> torch.Tensor:
    if model == "wan" and j == 0:
        return torch.ones(t, t, dtype=torch.bool)
    d = abs(i - j)
    if d <= 1:
        return torch.ones(t, t, dtype=torch.bool)
    g = d.bit_length()
    p = 2 ** t.bit_length()
    w = max(p / 2**g * decay, b)
    idx = torch.arange(t)
    mask = (idx[None, :] - idx[:, None]).abs() <= w
    w0 = p / 2**g
    if w0 < b:
        k = int(b / w0)
        if d % k != 0:
            mask = torch.zeros(t, t, dtype=torch.bool)
    return mask


@cache
def _shrunk(key, t: int, b: int, rr: int, rc: int, decay: float, model: str, i: int, j: int) -> torch.Tensor:
    lm = _token_mask(i, j, t, b, decay, model)
    c = math.ceil(t / b)
    canvas = torch.zeros(rr + c * b, rc + c * b, dtype=torch.bool)
    canvas[rr : rr + t, rc : rc + t] = lm
    canvas = canvas[: c * b, : c * b].reshape(c, b, c, b)
    col = canvas.sum(dim=1) / b  # float32, [c, c, b]
    nz = (col > 0).sum(-1)
    hi = (col > 1 / 3).sum(-1)
    return (hi / (nz + 1e-9)) > 0.6


def spec_radial_mask(f: int, t: int, *, block_size: int = 128, decay: float = 1.0, model: str = "wan", text: int = 0):
    b = block_size
    n = f * t
    nb = math.ceil((n + text) / b)
    m = torch.zeros(nb, nb, dtype=torch.bool)
    border = n // b
    m[border:, :] = True
    m[:, border:] = True
    for i in range(f):
        for j in range(f):
            rr, rc = (i * t) % b, (j * t) % b
            d = abs(i - j)
            key = ("sink",) if (model == "wan" and j == 0) else (d if d > 1 else "near",)
            # (i, j) only matter through the key; pass a representative pair for the cache
            if key == ("sink",):
                ri, rj = 1, 0
            elif key == ("near",):
                ri, rj = 1, 1
            else:
                ri, rj = d + 1, 1  # same distance, key frame never 0
            blk = _shrunk(key, t, b, rr, rc, decay, model, ri, rj)
            oi, oj = (i * t) // b, (j * t) // b
            view = m[oi : oi + blk.shape[0], oj : oj + blk.shape[1]]
            view |= blk[: view.shape[0], : view.shape[1]]
    return m
