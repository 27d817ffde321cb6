"""Pretrain the tiny Wan base model shipped in ``src/radial_lora/assets/tiny-wan-base`` (CPU, ~1 h).

Why: the demo extends a *pre-trained* model to 4x its training length. Real Wan checkpoints are gigabytes,
so we ship a tiny model of the real diffusers classes (``WanTransformer3DModel``, ``AutoencoderKLWan``,
``UMT5EncoderModel``) trained here on synthetic moving shapes at ONE short length (17 frames, 32x32).

Phases (each checkpointed in ``--work``; rerunning the command resumes where it stopped):

1. ``vae``: reconstruction (L1 + MSE) of the slightly noised posterior mean + a small KL on short random
   clips: 1 + 4 frames first, then 1 + 4 + 4 (every kind of causal chunk of the Wan VAE). Then the
   per-channel mean/std of the latents go into the VAE config (``latents_mean``/``latents_std``) so that
   the transformer sees ~unit-variance latents.
2. ``latents``: a pool of 17-frame clips encoded once (VAE mode), plus the frozen random text encoder's
   embeddings of every caption (frozen random UMT5: its outputs still tell the captions apart).
3. ``transformer``: flow matching (x_t = (1 - s) x0 + s eps, target eps - x0, shifted s) with caption
   dropout (so classifier-free guidance works), AdamW + cosine schedule.
4. ``decoder`` (refine): the VAE again, from its weights, first on single frames (``--dec-image-steps``: the
   spatial code alone), then on whole 17-frame clips, with a sharper loss (shape pixels 10x, L1 of finite
   differences); ``--dec-freeze-encoder`` trains only the decoder.
5. ``refine`` (refine): more transformer steps from its weights at a lower lr on a 4x bigger pool encoded
   with the refined VAE (latent stats re-measured), exporting an EMA of the weights.
6. ``export``: a ``WanPipeline`` ``save_pretrained`` to ``--out`` (temp dir, then rename), sample strips.

``--eval`` scores a saved pipeline instead (``evaluate``: colour, motion direction, speed and shape of
generated samples and of VAE reconstructions, against the rendered truth of each caption).

Usage: ``python scripts/pretrain_tiny_base.py --work runs/pretrain --out src/radial_lora/assets/tiny-wan-base``
(all phases, ~1.5 h on 2 shared cores); ``--init-from DIR`` runs only the refine phases on an existing pipeline;
``--eval [--eval-model DIR]`` scores one (``--eval-guidance`` with no value: only the VAE reconstructions).

The shipped weights are "v7": v6's VAE and text encoder (the defaults below are their "v5" recipe, plus
phase 5 of the model card) and a transformer trained anew on the sample clips that drift across their
captioned direction (``radial_lora.data.sample``): ``--init-from src/radial_lora/assets/tiny-wan-base
--fresh-transformer --dec-steps 0 --dec-image-steps 0 --long-dec-steps 0 --refine-steps 16000 --refine-lr 1e-3
--refine-pool 4096`` (the model card has the numbers).

The defaults are the "v5" recipe: a 4x-spatial VAE with 4 latent channels (a 32x32 frame is an 8x8x4
latent), a 2x2-patch transformer (16 tokens of 16 numbers per latent frame), an image-then-video decoder
refine (300 + 700 steps, edge weight 3), 8000 transformer refine steps. Earlier layouts stay reachable for
comparison (the model card has their scores): ``--vae-spatial 8 --patch 1 --z-dim 16 --dec-image-steps 0
--dec-edge 1 --refine-steps 4000`` is v1-v3's (an 8x VAE whose 4x4 latents rounded every shape); ``--z-dim 16``
with the 4x VAE is v4's (64-number tokens the tiny transformer did not learn in 20 min); ``--dec-steps 0
--dec-image-steps 0`` skips the decoder refine (``--dec-constant-lr``: clip steps without the cosine);
``--vae-from FILE`` skips phase 1 with given VAE weights; ``--dit-steps 0`` skips phases 2-3 (the transformer
then trains from scratch in ``refine`` alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm
from transformers import UMT5Config, UMT5EncoderModel

from radial_lora.data.sample import BACKGROUNDS, CAPTION_VOCABULARY, caption_for, render_clip, sample_specs
from radial_lora.eval.long_video import failure_rates, score_frames
from radial_lora.eval.shape_score import score_clip, summarise
from radial_lora.models import get_adapter
from radial_lora.models.tiny import build_tokenizer, caption_vocabulary
from radial_lora.train.flow_matching import flow_step, sample_sigmas

log = logging.getLogger("pretrain_tiny_base")

# ---- sizes (the model card quotes these) -------------------------------------------------------------
SIZE = 32  # pixels; 4x VAE -> 8x8 latents; patch 2 -> 16 tokens per latent frame (v1-v3: 8x VAE, patch 1)
FPS = 16.0
BASE_FRAMES = 17  # the only length the base ever sees (5 latent frames)
Z_DIM = 16  # latent channels of v1-v4, as in Wan2.1 (v5: --z-dim 4)
FLOW_SHIFT = 2.0
VAE_CFG = dict(
    base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
)
# ``--vae-spatial 4`` (v4): two down stages, 4x spatial and 4x temporal: a 32x32 frame is an 8x8 latent (room
# for corners; the 8x VAE's 4x4 rounds every square and triangle); with ``--patch 2`` the transformer still
# sees 4x4 = 16 tokens per latent frame (same cost and radial-mask geometry as patch 1 on the 8x VAE).
VAE_CFG_4X = dict(
    base_dim=16,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[True, True],
    scale_factor_spatial=4,
    scale_factor_temporal=4,
)
TRANSFORMER_CFG = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TEXT_CFG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Checkpoint writes survive an interrupt: temp file, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_video_tensor(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[F,H,W,3]`` clips -> float ``[B,3,F,H,W]`` in [-1, 1]."""
    x = torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def build_components(seed: int, vae_spatial: int = 4, patch: int = 2, z_dim: int = 4) -> dict[str, Any]:
    """Random-weight components of the real classes (same seed, same weights); the defaults are v5's layout
    (v1-v3: ``vae_spatial`` 8, ``patch`` 1, ``z_dim`` 16)."""
    torch.manual_seed(seed)
    vae_cfg = (VAE_CFG if vae_spatial == 8 else VAE_CFG_4X) | {"z_dim": z_dim}
    vae = AutoencoderKLWan(**vae_cfg, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    tokenizer = build_tokenizer("umt5", caption_vocabulary(CAPTION_VOCABULARY))
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_CFG)).eval()
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        **(TRANSFORMER_CFG | {"patch_size": (1, patch, patch), "in_channels": z_dim, "out_channels": z_dim})
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT
    )
    return dict(vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler)


def resume(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, name: str) -> dict[str, Any] | None:
    """Load a phase checkpoint (weights, optimizer, torch RNG when saved) into ``model``/``opt``; the saved dict."""
    if not ckpt.exists():
        return None
    saved = torch.load(ckpt, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if "rng" in saved:
        torch.set_rng_state(saved["rng"])
    log.info("%s: resumed at step %d", name, saved["state"]["step"])
    return saved


# ---- phase 1: VAE ------------------------------------------------------------------------------------
def train_vae(comp: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, float]:
    vae: AutoencoderKLWan = comp["vae"]
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    saved = resume(ckpt, vae, opt, "vae")
    state = saved["state"] if saved else {"step": 0, "history": []}
    total = args.vae_steps + args.vae_long_steps
    if state["step"] >= total:
        return state["history"][-1] if state["history"] else {}
    specs = sample_specs(4096, seed=args.seed + 100)
    vae.train()
    bar = tqdm(range(state["step"], total), desc="vae", initial=state["step"], total=total)
    ema = None
    for step in bar:
        lr = cosine_lr(step, args.vae_steps, args.vae_lr, warmup=20)
        rng = np.random.default_rng((args.seed, step))  # per-step stream: resuming changes nothing
        # Curriculum: cheap 1+4-frame clips first (spatial code), then 1+4+4 (causal cache), then whole
        # 17-frame clips (without them the later chunks drift in colour: seen here).
        frames, batch = (5, 8) if step < args.vae_short_steps else (args.vae_frames, args.vae_batch)
        if step >= args.vae_steps:
            frames, batch, lr = BASE_FRAMES, 3, 0.3 * args.vae_lr
        for g in opt.param_groups:
            g["lr"] = lr
        picks = rng.integers(len(specs), size=batch)
        # A random window of a longer render: the VAE sees mid-motion and bounce frames too.
        clips, fg = [], []
        for i in picks:
            start = int(rng.integers(0, 12))
            clip = render_clip(specs[i], start + frames, SIZE, FPS)[start:]
            clips.append(clip)
            fg.append(np.any(clip != np.asarray(BACKGROUNDS[specs[i].background], np.uint8), axis=-1))
        x = to_video_tensor(clips)
        # Shapes cover ~8% of the pixels: unweighted, the VAE sits for hundreds of steps in the
        # "background only" minimum (seen here). Shape pixels count args.vae_fg_weight times.
        w = 1.0 + (args.vae_fg_weight - 1.0) * torch.from_numpy(np.stack(fg)).float().unsqueeze(1)
        w = w / w.mean()
        posterior = vae.encode(x).latent_dist
        # The posterior mean plus a little noise: sampling at the initial unit std drowns the encoder's
        # small outputs and the decoder learns to ignore the latent (posterior collapse, seen here).
        z = posterior.mode()
        z = z + args.vae_noise * z.detach().std() * torch.randn_like(z)
        rec = vae.decode(z).sample
        l1 = ((rec - x).abs() * w).mean()
        mse = (((rec - x) ** 2) * w).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = 0.5 * l1 + 2.0 * mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = float(l1.detach()) if ema is None else 0.9 * ema + 0.1 * float(l1.detach())
        bar.set_postfix(l1=f"{ema:.4f}", mse=f"{float(mse):.4f}")
        state["step"] = step + 1
        if (step + 1) % 25 == 0 or step + 1 in (args.vae_steps, total):
            state["history"].append({"step": step + 1, "l1_ema": ema, "mse": float(mse), "kl": float(kl)})
            log.info("vae step %d: l1(ema) %.4f mse %.4f kl/elem %.4f", step + 1, ema, float(mse), float(kl))
            atomic_torch_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "state": state, "rng": torch.get_rng_state()}, ckpt
            )
    vae.eval()
    return state["history"][-1]


@torch.no_grad()
def encode_raw(vae: AutoencoderKLWan, clips: list[np.ndarray], batch: int) -> torch.Tensor:
    """Un-normalised VAE latents (posterior mode) of the clips."""
    out = []
    for i in range(0, len(clips), batch):
        out.append(vae.encode(to_video_tensor(clips[i : i + batch])).latent_dist.mode())
    return torch.cat(out)


def set_latent_stats(vae: AutoencoderKLWan, raw: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the latents -> VAE config; the pipeline decodes with ``z * std + mean``."""
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(float(v), 5) for v in mean], latents_std=[round(float(v), 5) for v in std]
    )
    return vae.config.latents_mean, vae.config.latents_std


# ---- phase 2: latent pool ----------------------------------------------------------------------------
def build_pool(
    comp: dict[str, Any], pipe: WanPipeline, path: Path, n: int, args: argparse.Namespace, keep_stats: bool = False
) -> dict[str, Any]:
    """``n`` encoded 17-frame clips + caption embeddings; ``keep_stats`` normalises with the VAE config's
    ``latents_mean``/``latents_std`` (a refine stage) instead of measuring them (phase 2)."""
    if path.exists():
        pool = torch.load(path, weights_only=True)
        comp["vae"].register_to_config(latents_mean=pool["latents_mean"], latents_std=pool["latents_std"])
        log.info("pool: loaded %d clips from %s", len(pool["latents"]), path)
        return pool
    specs = sample_specs(n, seed=args.seed + 200)
    clips = [render_clip(s, BASE_FRAMES, SIZE, FPS) for s in specs]
    raw = []
    for i in tqdm(range(0, len(clips), 16), desc="encode pool"):
        raw.append(encode_raw(comp["vae"], clips[i : i + 16], 16))
    raw_t = torch.cat(raw)
    if keep_stats:
        mean, std = list(comp["vae"].config.latents_mean), list(comp["vae"].config.latents_std)
    else:
        mean, std = set_latent_stats(comp["vae"], raw_t)
    m = torch.tensor(mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1, 1)
    latents = (raw_t - m) / s
    # Honest captions for the 17-frame clip; a third of them without the bounce clause (the demo's long
    # clips carry captions of their own length).
    captions = [caption_for(sp, BASE_FRAMES, FPS) for sp in specs]
    short = [caption_for(sp) for sp in specs]
    adapter = get_adapter("wan")
    texts = sorted(set(captions) | set(short) | {""})
    embeds = {}
    for i in tqdm(range(0, len(texts), 64), desc="encode captions"):
        chunk = texts[i : i + 64]
        e = adapter.encode_prompts(pipe, chunk)["encoder_hidden_states"]
        embeds.update({t: e[j].clone() for j, t in enumerate(chunk)})
    pool = {
        "latents": latents,
        "captions": captions,
        "short": short,
        "embeds": embeds,
        "latents_mean": mean,
        "latents_std": std,
    }
    atomic_torch_save(pool, path)
    log.info(
        "pool: %d clips, latents %s, normalised std %.3f", len(latents), tuple(latents.shape[1:]), float(latents.std())
    )
    return pool


# ---- phase 3: transformer ----------------------------------------------------------------------------
def fit_flow_matching(
    model: WanTransformer3DModel,
    pool: dict[str, Any],
    ckpt: Path,
    args: argparse.Namespace,
    *,
    name: str,
    steps: int,
    lr: float,
    seed_offset: int,
    ema_decay: float = 0.0,
) -> dict:
    """The transformer's flow-matching loop (both transformer phases): batch ``--dit-batch``, captions
    60% full / 30% short / 10% empty, resumable from ``ckpt`` every 100 steps; with ``ema_decay`` > 0 it
    keeps a weight EMA and leaves the model holding it at the end."""
    adapter = get_adapter("wan")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    # diffusers' EMAModel: decay min(ema_decay, (1 + step) / (10 + step)), the warm-up this script used before
    ema_model = EMAModel(model.parameters(), decay=ema_decay) if ema_decay > 0 else None
    saved = resume(ckpt, model, opt, name)
    state = saved["state"] if saved else {"step": 0, "history": []}
    if ema_model is not None and saved and "ema" in saved:
        ema_model.load_state_dict(saved["ema"])
    latents, embeds = pool["latents"], pool["embeds"]
    n = len(latents)
    rng = np.random.default_rng(args.seed + seed_offset + state["step"])
    gen = torch.Generator().manual_seed(args.seed + seed_offset + 1000 + state["step"])
    model.train()
    ema = None
    bar = tqdm(range(state["step"], steps), desc=name, initial=state["step"], total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=50)
        idx = rng.integers(n, size=args.dit_batch)
        texts = []
        for i in idx:
            u = rng.random()
            texts.append("" if u < 0.1 else pool["short"][i] if u < 0.4 else pool["captions"][i])
        text = torch.stack([embeds[t] for t in texts])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = sample_sigmas(len(idx), shift=FLOW_SHIFT, generator=gen)
        loss = flow_step(adapter, model, x0, {"encoder_hidden_states": text}, sigmas, noise).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema_model is not None:
            ema_model.step(model.parameters())
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{ema:.4f}")
        state["step"] = step + 1
        if (step + 1) % 100 == 0 or step + 1 == steps:
            state["history"].append({"step": step + 1, "loss_ema": ema})
            log.info("%s step %d: flow-matching loss (ema) %.4f", name, step + 1, ema)
            snapshot = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "state": state,
                "rng": torch.get_rng_state(),
            }
            if ema_model is not None:
                snapshot["ema"] = ema_model.state_dict()
            atomic_torch_save(snapshot, ckpt)
    if ema_model is not None:
        ema_model.copy_to(model.parameters())  # the exported weights are the EMA
    model.eval()
    return state["history"][-1] if state["history"] else {}


def train_transformer(comp: dict[str, Any], pool: dict[str, Any], work: Path, args: argparse.Namespace) -> dict:
    return fit_flow_matching(
        comp["transformer"],
        pool,
        work / "transformer.pt",
        args,
        name="transformer",
        steps=args.dit_steps,
        lr=args.dit_lr,
        seed_offset=1000,
    )


# ---- phase 5 (refine): the VAE again, sharper loss ------------------------------------------------------
def clip_batch(
    specs: list[Any], rng: np.random.Generator, frames: int, batch: int, max_start: int, fg_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random ``frames``-frame windows (start ``< max_start``) of random specs as a ``[B,3,F,H,W]``
    video and its per-pixel loss weight (shape pixels ``fg_weight`` times the background, mean 1)."""
    clips, fg = [], []
    for i in rng.integers(len(specs), size=batch):
        start = int(rng.integers(0, max_start))
        clip = render_clip(specs[i], start + frames, SIZE, FPS)[start:]
        clips.append(clip)
        fg.append(np.any(clip != np.asarray(BACKGROUNDS[specs[i].background], np.uint8), axis=-1))
    w = 1.0 + (fg_weight - 1.0) * torch.from_numpy(np.stack(fg)).float().unsqueeze(1)
    return to_video_tensor(clips), w / w.mean()


def sharp_loss(
    rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor, edge_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The refine phases' reconstruction loss ``0.5 L1 + 2 MSE`` (weighted by ``w``) + ``edge_weight`` x the L1
    of the finite differences (y, x, and t when there is more than one frame); returns it, L1, MSE and edge."""
    l1 = ((rec - x).abs() * w).mean()
    mse = (((rec - x) ** 2) * w).mean()
    dims = (2, 3, 4) if x.shape[2] > 1 else (3, 4)
    edge = sum((torch.diff(rec, dim=d) - torch.diff(x, dim=d)).abs().mean() for d in dims)
    return 0.5 * l1 + 2.0 * mse + edge_weight * edge, l1, mse, edge


def train_only(vae: AutoencoderKLWan, params: list[torch.nn.Parameter]) -> None:
    """Freeze the VAE except ``params``."""
    for p_ in vae.parameters():
        p_.requires_grad_(False)
    for p_ in params:
        p_.requires_grad_(True)


def train_decoder(comp: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Fine-tune the VAE from its weights on whole 17-frame clips with a sharper loss.

    Loss: 0.5 L1 + 2 MSE with shape pixels weighted ``--dec-fg-weight`` (vs 5 in phase 1) plus
    ``--dec-edge`` x L1 of the spatial and temporal finite differences (edges, motion), + the phase-1 KL.
    With ``--dec-freeze-encoder`` only the decoder (+ ``post_quant_conv``) trains: the latent space, its
    stats and the transformer stay valid (measured: it gains less, see the model card).
    """
    vae: AutoencoderKLWan = comp["vae"]
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    if args.dec_train_encoder:  # the whole VAE: the latent space moves, the pool re-measures its stats
        params = list(vae.parameters())
    ckpt = work / "decoder.pt"
    opt = torch.optim.AdamW(params, lr=args.dec_lr, weight_decay=0.0)
    saved = resume(ckpt, vae, opt, "decoder")
    state = saved["state"] if saved else {"step": 0, "history": []}
    n_img = args.dec_image_steps
    total = n_img + args.dec_steps
    if state["step"] >= total:
        return state["history"][-1] if state["history"] else {}
    specs = sample_specs(4096, seed=args.seed + 100)
    vae.eval()  # no dropout/norm statistics in the Wan VAE; eval just makes the frozen encoder explicit
    train_only(vae, params)
    bar = tqdm(range(state["step"], total), desc="decoder", initial=state["step"], total=total)
    ema = None
    for step in bar:
        image = step < n_img  # the image stage: single frames (only the spatial code), constant lr
        lr = args.dec_image_lr if image else args.dec_lr
        if not image and not args.dec_constant_lr:
            lr = cosine_lr(step - n_img, args.dec_steps, args.dec_lr, warmup=20)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng((args.seed, 5000 + step))
        batch = args.dec_image_batch if image else args.dec_batch
        x, w = clip_batch(specs, rng, 1 if image else BASE_FRAMES, batch, 17 if image else 12, args.dec_fg_weight)
        with torch.set_grad_enabled(args.dec_train_encoder):
            posterior = vae.encode(x).latent_dist
            z = posterior.mode()
            z = z + args.vae_noise * z.detach().std() * torch.randn_like(z)
        rec = vae.decode(z).sample
        loss, l1, mse, edge = sharp_loss(rec, x, w, args.dec_edge)
        if args.dec_train_encoder:
            loss = loss + args.vae_kl * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = float(l1.detach()) if ema is None else 0.9 * ema + 0.1 * float(l1.detach())
        bar.set_postfix(l1=f"{ema:.4f}", edge=f"{float(edge):.4f}")
        state["step"] = step + 1
        if (step + 1) % 25 == 0 or step + 1 in (n_img, total):
            state["history"].append({"step": step + 1, "l1_ema": ema, "mse": float(mse), "edge": float(edge)})
            log.info("decoder step %d: l1(ema) %.4f mse %.4f edge %.4f", step + 1, ema, float(mse), float(edge))
            atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
    train_only(vae, list(vae.parameters()))
    return state["history"][-1]


# ---- phase 5b (refine): the decoder on long clips, encoder frozen ---------------------------------------------
def train_long_decoder(comp: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Teach the decoder every length the demo decodes (up to 65 frames), keeping the latent space.

    Why: trained on clips of at most 17 frames, the causal decoder's later chunks drifted in colour on a
    65-frame video (its round trip scored 0.60 all-right vs 0.90 at 17 frames), so every 4x sample measured the
    VAE. Only the decoder (+ ``post_quant_conv``) trains: the encoder, the latent statistics and the transformer
    stay valid. Steps cycle through ``--long-dec-lengths`` (batch ``68 // frames``, at least 1) with the decoder
    phase's loss (shape pixels 10x, edge L1 x ``--dec-edge``), cosine from ``--long-dec-lr``.
    """
    if args.long_dec_steps <= 0:
        return {}
    vae: AutoencoderKLWan = comp["vae"]
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    ckpt = work / "long_decoder.pt"
    opt = torch.optim.AdamW(params, lr=args.long_dec_lr, weight_decay=0.0)
    saved = resume(ckpt, vae, opt, "long_decoder")
    state = saved["state"] if saved else {"step": 0, "history": []}
    total = args.long_dec_steps
    if state["step"] >= total:
        return state["history"][-1] if state["history"] else {}
    specs = sample_specs(4096, seed=args.seed + 100)
    vae.eval()
    train_only(vae, params)
    bar = tqdm(range(state["step"], total), desc="long_decoder", initial=state["step"], total=total)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, args.long_dec_lr, warmup=20)
        rng = np.random.default_rng((args.seed, 9000 + step))
        frames = args.long_dec_lengths[step % len(args.long_dec_lengths)]
        x, w = clip_batch(specs, rng, frames, max(1, 68 // frames), 12, args.dec_fg_weight)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            z = z + args.vae_noise * z.std() * torch.randn_like(z)
        rec = vae.decode(z).sample
        loss, l1, mse, edge = sharp_loss(rec, x, w, args.dec_edge)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = float(l1.detach()) if ema is None else 0.9 * ema + 0.1 * float(l1.detach())
        bar.set_postfix(l1=f"{ema:.4f}", frames=frames)
        state["step"] = step + 1
        if (step + 1) % 25 == 0 or step + 1 == total:
            state["history"].append({"step": step + 1, "l1_ema": ema, "mse": float(mse), "edge": float(edge)})
            log.info("long_decoder step %d (%d frames): l1(ema) %.4f", step + 1, frames, ema)
            atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
    train_only(vae, list(vae.parameters()))
    return state["history"][-1]


# ---- phase 6 (refine): more transformer steps from its weights, lower lr, bigger pool, weight EMA -------
def refine_transformer(comp: dict[str, Any], pipe: WanPipeline, work: Path, args: argparse.Namespace) -> dict:
    """Continue flow matching from the trained weights on a larger pool (``--refine-pool`` clips, encoded
    with the same encoder and normalised with the VAE config's stats), lower lr, EMA of the weights."""
    if args.refine_steps <= 0:
        return {}
    model: WanTransformer3DModel = comp["transformer"]
    # An encoder the decoder phase did not train keeps the latent space and its stats (unless no phase
    # measured them: --dit-steps 0 without --init-from).
    encoder_moved = args.dec_train_encoder and args.dec_image_steps + args.dec_steps > 0
    keep = not encoder_moved and (args.init_from is not None or args.dit_steps > 0)
    pool = build_pool(comp, pipe, work / "pool_refine.pt", args.refine_pool, args, keep_stats=keep)
    return fit_flow_matching(
        model,
        pool,
        work / "refine.pt",
        args,
        name="refine",
        steps=args.refine_steps,
        lr=args.refine_lr,
        seed_offset=3000,
        ema_decay=args.refine_ema,
    )


# ---- phase 4: export + samples -----------------------------------------------------------------------
def save_strip(frames: np.ndarray, path: Path, every: int = 2, scale: int = 3) -> None:
    """``[F,H,W,3]`` uint8 -> one PNG row of every ``every``-th frame, upscaled (nearest)."""
    from PIL import Image

    row = np.concatenate(list(frames[::every]), axis=1)
    Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST).save(path)


def export(pipe: WanPipeline, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp)
        for cfg in tmp.rglob("*.json"):  # no local paths (--init-from) in the shipped configs
            data = json.loads(cfg.read_text())
            if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
                cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for extra in [out / "README.md", *sorted(out.glob("*.png"))]:  # the card and its figure
            if extra.exists():
                shutil.copy2(extra, tmp / extra.name)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved the pipeline to %s", out)


@torch.no_grad()
def samples(pipe: WanPipeline, work: Path, seed: int, steps: int) -> list[str]:
    from radial_lora.data.sample import ClipSpec

    specs = [
        ClipSpec("circle", "red", "black", "right", 0.9, 0.2, 0.5, 0.26),
        ClipSpec("square", "yellow", "gray", "down", 0.4, 0.5, 0.2, 0.26),
        ClipSpec("triangle", "blue", "black", "left", 0.9, 0.8, 0.5, 0.26),
    ]
    prompts = []
    for i, spec in enumerate(specs):
        prompt = caption_for(spec, BASE_FRAMES, FPS)
        video = pipe(
            prompt=prompt,
            negative_prompt="",
            height=SIZE,
            width=SIZE,
            num_frames=BASE_FRAMES,
            num_inference_steps=steps,
            guidance_scale=4.0,
            output_type="np",
            generator=torch.Generator().manual_seed(seed + i),
        ).frames[0]
        gen = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
        real = render_clip(spec, BASE_FRAMES, SIZE, FPS)
        save_strip(np.concatenate([real, gen], axis=1), work / f"sample_{i}.png")
        prompts.append(prompt)
        log.info("sample %d (%s): %s (top: rendered truth, bottom: generated)", i, prompt, work / f"sample_{i}.png")
    return prompts


# ---- eval: do generated samples show the captioned shape, colour and motion? (radial_lora.eval.shape_score)
EVAL_SEED_OFFSET = 300  # eval captions: sample_specs(n, seed + 300); VAE clips use +100, the pool +200


def to_uint8(video: np.ndarray) -> np.ndarray:
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def evaluate(pipe: WanPipeline, work: Path, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Generate ``--eval-n`` captions (fixed seeds) and score them and the VAE reconstructions of the truth."""
    specs = sample_specs(args.eval_n, seed=args.seed + EVAL_SEED_OFFSET)
    truths = [render_clip(s, args.eval_frames, SIZE, FPS) for s in specs]
    t0 = time.time()
    recons = []
    for i in range(0, len(truths), 8):
        x = to_video_tensor(truths[i : i + 8])
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        recons += list(to_uint8((rec.clamp(-1, 1).permute(0, 2, 3, 4, 1).numpy() + 1) / 2))
    result: dict[str, Any] = {
        "tag": tag,
        "n": len(specs),
        "seed": args.seed + EVAL_SEED_OFFSET,
        "steps": args.eval_steps,
        "frames": args.eval_frames,
        "generated": {},
    }
    result["truth"] = summarise([score_clip(c, s, FPS) for c, s in zip(truths, specs)])
    truth_motion = [score_frames(c, FPS) for c in truths]
    truth_speed = float(np.median([m.motion for m in truth_motion]))
    result["truth_motion"] = {"motion": truth_speed, **failure_rates(truth_motion)}
    result["vae_recon"] = summarise([score_clip(c, s, FPS) for c, s in zip(recons, specs)])
    gens: dict[float, list[np.ndarray]] = {}
    for g in args.eval_guidance:
        gens[g] = []
        rows = []
        for i, spec in enumerate(tqdm(specs, desc=f"eval {tag} g={g}")):
            video = pipe(
                prompt=caption_for(spec, args.eval_frames, FPS),
                negative_prompt="",
                height=SIZE,
                width=SIZE,
                num_frames=args.eval_frames,
                num_inference_steps=args.eval_steps,
                guidance_scale=g,
                output_type="np",
                generator=torch.Generator().manual_seed(args.seed + i),
            ).frames[0]
            gens[g].append(to_uint8(video))
            rows.append(score_clip(gens[g][-1], spec, FPS) | {"caption": caption_for(spec, args.eval_frames, FPS)})
        result["generated"][str(g)] = summarise(rows)
        moved = [score_frames(v, FPS) for v in gens[g]]
        result.setdefault("motion", {})[str(g)] = {
            "motion_ratio": float(np.median([m.motion for m in moved])) / truth_speed,
            "motion_ratio_quarters": [float(q) / truth_speed for q in np.median([m.motion_quarters for m in moved], 0)],
            **failure_rates(moved),
        }
        log.info("eval %s g=%s motion (radial_lora.eval.long_video): %s", tag, g, result["motion"][str(g)])
        result.setdefault("per_clip", {})[str(g)] = rows
    result["wall_s"] = time.time() - t0
    k = min(6, len(specs))
    strip_rows = []
    for i in range(k):
        gen_row = [gens[args.eval_guidance[0]][i]] if args.eval_guidance else []  # none: recon only
        strip_rows += [truths[i], recons[i], *gen_row]
    save_strip(np.concatenate(strip_rows, axis=1), work / f"eval_{tag}.png", scale=2)
    np.savez_compressed(
        work / f"eval_{tag}_videos.npz",
        truth=np.stack(truths),
        recon=np.stack(recons),
        **{f"gen_{g}": np.stack(v) for g, v in gens.items()},
    )
    (work / f"eval_{tag}.json").write_text(json.dumps(result, indent=1))
    head = ["truth", "vae_recon"] + [f"gen g={g}" for g in args.eval_guidance]
    table = [result["truth"], result["vae_recon"]] + [result["generated"][str(g)] for g in args.eval_guidance]
    for name, s in zip(head, table):
        log.info(
            "eval %s %-12s colour %.2f direction %.2f speed %.2f shape %.2f all %.2f | shape IoU %.3f colour err %.1f",
            tag,
            name,
            s["colour"],
            s["direction"],
            s["speed"],
            s["shape"],
            s["all"],
            s["shape_iou"],
            s["colour_err"],
        )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/pretrain_tiny_base"))
    p.add_argument("--out", type=Path, default=Path("src/radial_lora/assets/tiny-wan-base"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)  # 1 beats 2 on shared cores
    p.add_argument(
        "--vae-spatial",
        type=int,
        choices=(8, 4),
        default=4,
        help="VAE spatial factor of a from-scratch build: 4 (v4, v5: dim_mult [1,2,2]) or 8 (v1-v3: [1,2,2,2])",
    )
    p.add_argument(
        "--patch",
        type=int,
        choices=(1, 2),
        default=2,
        help="transformer spatial patch of a from-scratch build (v4, v5: 2 with --vae-spatial 4; v1-v3: 1)",
    )
    p.add_argument(
        "--z-dim", type=int, default=4, help="latent channels of a from-scratch build (v5: 4; v1-v4: 16, as Wan2.1)"
    )
    p.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="skip phase 1: load these VAE weights ({'model': state_dict}, the layout of --vae-spatial)",
    )
    p.add_argument("--vae-steps", type=int, default=650)
    p.add_argument("--vae-batch", type=int, default=6)
    p.add_argument("--vae-frames", type=int, default=9)
    p.add_argument("--vae-long-steps", type=int, default=60, help="last VAE steps on 17-frame clips, batch 3")
    p.add_argument("--vae-short-steps", type=int, default=150, help="first VAE steps on 5-frame clips, batch 8")
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae-fg-weight", type=float, default=5.0, help="loss weight of shape pixels")
    p.add_argument("--vae-noise", type=float, default=0.05, help="latent noise (x latent std) in VAE training")
    p.add_argument("--pool", type=int, default=512)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=16)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start the refine phases from this pipeline (skips phases 1-3: vae, pool, transformer)",
    )
    p.add_argument(
        "--fresh-transformer",
        action="store_true",
        help="with --init-from: keep its VAE and text encoder but train a new transformer from random weights "
        "(in the refine phase: give --refine-lr and --refine-steps of a from-scratch run; v7)",
    )
    p.add_argument("--dec-steps", type=int, default=700, help="refine: VAE steps (17-frame clips, batch 4)")
    p.add_argument("--dec-batch", type=int, default=4)
    p.add_argument(
        "--dec-image-steps",
        type=int,
        default=300,
        help="refine: VAE steps on single frames before the --dec-steps clip steps (v5: 300; v2-v3: 0)",
    )
    p.add_argument("--dec-image-batch", type=int, default=32, help="refine: frames per image step")
    p.add_argument("--dec-image-lr", type=float, default=1e-3, help="refine: constant lr of the image steps")
    p.add_argument(
        "--dec-constant-lr",
        action="store_true",
        help="refine: constant --dec-lr for the clip steps (the v4 try) instead of the cosine",
    )
    p.add_argument("--dec-lr", type=float, default=5e-4)
    p.add_argument("--dec-fg-weight", type=float, default=10.0, help="refine: loss weight of shape pixels")
    p.add_argument(
        "--dec-edge", type=float, default=3.0, help="refine: weight of the finite-difference L1 (v5: 3; v2-v3: 1)"
    )
    p.add_argument(
        "--dec-freeze-encoder",
        action="store_true",
        help="refine only the decoder (latent space, stats and transformer stay valid; measured: less gain)",
    )
    p.add_argument(
        "--long-dec-steps",
        type=int,
        default=700,
        help="refine: decoder-only steps on clips up to 65 frames (v6: 700; 0 = v5, which drifts beyond 17 frames)",
    )
    p.add_argument(
        "--long-dec-lengths",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[17, 65, 33, 65, 65],
        help="refine: clip lengths the long-decoder steps cycle through (default 17,65,33,65,65)",
    )
    p.add_argument("--long-dec-lr", type=float, default=5e-4, help="refine: peak lr of the long-decoder steps")
    p.add_argument("--refine-steps", type=int, default=8000, help="refine: more transformer steps (v5: 8000)")
    p.add_argument("--refine-lr", type=float, default=3e-4)
    p.add_argument("--refine-pool", type=int, default=2048, help="refine: clips in the (bigger) latent pool")
    p.add_argument("--refine-ema", type=float, default=0.999, help="refine: EMA decay of the exported weights")
    p.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the sample strips")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--eval", action="store_true", help="only score the pipeline at --eval-model (see evaluate)")
    p.add_argument("--eval-model", type=Path, default=None, help="pipeline to score (default: --out)")
    p.add_argument("--eval-tag", default=None, help="name of the eval files in --work (default: the model's name)")
    p.add_argument("--eval-n", type=int, default=48, help="eval captions (sample_specs, seed + 300)")
    p.add_argument(
        "--eval-frames", type=int, default=BASE_FRAMES, help="clip length of the eval (17; 65 = the demo's 4x)"
    )
    p.add_argument("--eval-steps", type=int, default=20, help="sampling steps of the eval (the demo's 20)")
    p.add_argument(
        "--eval-guidance",
        type=float,
        nargs="*",
        default=[4.0],
        help="guidance scales (demo: 4); none: score only the VAE reconstructions",
    )
    args = p.parse_args()
    args.dec_train_encoder = not args.dec_freeze_encoder
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.eval:
        model = args.eval_model or args.out
        pipe = WanPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        evaluate(pipe, args.work, args, args.eval_tag or model.name)
        return
    t0 = time.time()
    times = json.loads((args.work / "times.json").read_text()) if (args.work / "times.json").exists() else {}

    if args.init_from:
        init = WanPipeline.from_pretrained(args.init_from)
        comp = build_components(args.seed)  # the fresh tokenizer and scheduler; trained parts from --init-from
        kept = ("vae", "text_encoder") if args.fresh_transformer else ("vae", "text_encoder", "transformer")
        comp.update({k: getattr(init, k) for k in kept})
        pipe = WanPipeline(**comp)
    else:
        comp = build_components(args.seed, args.vae_spatial, args.patch, args.z_dim)
        pipe = WanPipeline(**comp)
    pipe.set_progress_bar_config(disable=True)

    def timed(name: str, fn: Any) -> Any:
        # Wall seconds per phase, summed over resumed runs (an interrupted phase loses its own time).
        t = time.time()
        result = fn()
        path = args.work / "times.json"  # re-read: two runs may share a work folder (decoder || refine)
        times.update(json.loads(path.read_text()) if path.exists() else {})
        times[name] = times.get(name, 0.0) + time.time() - t
        path.write_text(json.dumps(times, indent=1))
        return result

    vae_final = dit_final = {}
    if not args.init_from:
        if args.vae_from:
            comp["vae"].load_state_dict(torch.load(args.vae_from, weights_only=True)["model"])
            comp["vae"].eval()
            vae_final = {"from": str(args.vae_from)}
        else:
            vae_final = timed("vae_s", lambda: train_vae(comp, args.work, args))
        if args.dit_steps > 0:  # 0: the transformer trains from scratch in the refine phase alone
            pool = timed("pool_s", lambda: build_pool(comp, pipe, args.work / "pool.pt", args.pool, args))
            dit_final = timed("transformer_s", lambda: train_transformer(comp, pool, args.work, args))
    # Refine (from the weights above or --init-from): independent of each other (the encoder is frozen).
    dec_final = timed("decoder_s", lambda: train_decoder(comp, args.work, args))
    long_final = timed("long_decoder_s", lambda: train_long_decoder(comp, args.work, args))
    refine_final = timed("refine_s", lambda: refine_transformer(comp, pipe, args.work, args))
    prompts = samples(pipe, args.work, args.seed, args.sample_steps)
    summary = {
        "vae": vae_final,
        "transformer": dit_final,
        "decoder": dec_final,
        "long_decoder": long_final,
        "refine": refine_final,
        "times_s": times,
        "sample_prompts": prompts,
        "latents_mean": comp["vae"].config.latents_mean,
        "latents_std": comp["vae"].config.latents_std,
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_this_run_s": time.time() - t0,
    }
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("summary: %s", json.dumps(summary))
    if not args.no_export:
        export(pipe, args.out)


if __name__ == "__main__":
    main()
