"""Pretrain the tiny Wan base model shipped in ``src/radial_lora/assets/tiny-wan-base`` (CPU, ~30 min).

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
4. ``export``: a ``WanPipeline`` ``save_pretrained`` to ``--out`` (temp dir, then rename), sample strips.

Usage: ``python scripts/pretrain_tiny_base.py --work runs/pretrain --out src/radial_lora/assets/tiny-wan-base``
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
from tqdm import tqdm
from transformers import UMT5Config, UMT5EncoderModel

from radial_lora.data.sample import BACKGROUNDS, CAPTION_VOCABULARY, caption_for, render_clip, sample_specs
from radial_lora.models import get_adapter
from radial_lora.models.tiny import build_tokenizer, caption_vocabulary
from radial_lora.train.flow_matching import add_noise, flow_matching_loss, sample_sigmas

log = logging.getLogger("pretrain_tiny_base")

# ---- sizes (the model card quotes these) -------------------------------------------------------------
SIZE = 32  # pixels; 8x VAE -> 4x4 latents; patch 1 -> 16 tokens per latent frame
FPS = 16.0
BASE_FRAMES = 17  # the only length the base ever sees (5 latent frames)
Z_DIM = 16  # latent channels, as in Wan2.1
FLOW_SHIFT = 2.0
VAE_CFG = dict(base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
               temperal_downsample=[False, True, True])  # fmt: skip
TRANSFORMER_CFG = dict(
    patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=24, in_channels=Z_DIM, out_channels=Z_DIM,
    text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)  # fmt: skip
TEXT_CFG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip


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


def build_components(seed: int) -> dict[str, Any]:
    """Random-weight components of the real classes (same seed, same weights)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CFG, latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM)
    tokenizer = build_tokenizer("umt5", caption_vocabulary(CAPTION_VOCABULARY))
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_CFG)).eval()
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(**TRANSFORMER_CFG)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT
    )
    return dict(vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler)


# ---- phase 1: VAE ------------------------------------------------------------------------------------
def train_vae(comp: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, float]:
    vae: AutoencoderKLWan = comp["vae"]
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state = {"step": 0, "history": []}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        log.info("vae: resumed at step %d", state["step"])
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
        ema = float(l1.detach()) if ema is None else 0.9 * ema + 0.1 * float(l1)
        bar.set_postfix(l1=f"{ema:.4f}", mse=f"{float(mse):.4f}")
        state["step"] = step + 1
        if (step + 1) % 25 == 0 or step + 1 in (args.vae_steps, total):
            state["history"].append({"step": step + 1, "l1_ema": ema, "mse": float(mse), "kl": float(kl)})
            log.info("vae step %d: l1(ema) %.4f mse %.4f kl/elem %.4f", step + 1, ema, float(mse), float(kl))
            atomic_torch_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "state": state, "rng": torch.get_rng_state()},
                ckpt,
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
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])  # fmt: skip
    return vae.config.latents_mean, vae.config.latents_std


# ---- phase 2: latent pool ----------------------------------------------------------------------------
def build_pool(comp: dict[str, Any], pipe: WanPipeline, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = work / "pool.pt"
    if path.exists():
        pool = torch.load(path, weights_only=False)
        comp["vae"].register_to_config(latents_mean=pool["latents_mean"], latents_std=pool["latents_std"])
        log.info("pool: loaded %d clips from %s", len(pool["latents"]), path)
        return pool
    specs = sample_specs(args.pool, seed=args.seed + 200)
    clips = [render_clip(s, BASE_FRAMES, SIZE, FPS) for s in specs]
    raw = []
    for i in tqdm(range(0, len(clips), 16), desc="encode pool"):
        raw.append(encode_raw(comp["vae"], clips[i : i + 16], 16))
    raw_t = torch.cat(raw)
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
    pool = {"latents": latents, "captions": captions, "short": short, "embeds": embeds,
            "latents_mean": mean, "latents_std": std}  # fmt: skip
    atomic_torch_save(pool, path)
    log.info("pool: %d clips, latents %s, normalised std %.3f", len(latents), tuple(latents.shape[1:]),
             float(latents.std()))  # fmt: skip
    return pool


# ---- phase 3: transformer ----------------------------------------------------------------------------
def train_transformer(comp: dict[str, Any], pool: dict[str, Any], work: Path, args: argparse.Namespace) -> dict:
    model: WanTransformer3DModel = comp["transformer"]
    ckpt = work / "transformer.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    state = {"step": 0, "history": []}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        log.info("transformer: resumed at step %d", state["step"])
    if state["step"] >= args.dit_steps:
        return state["history"][-1] if state["history"] else {}
    latents, embeds = pool["latents"], pool["embeds"]
    n = len(latents)
    rng = np.random.default_rng(args.seed + 1000 + state["step"])
    gen = torch.Generator().manual_seed(args.seed + 2000 + state["step"])
    model.train()
    ema = None
    bar = tqdm(range(state["step"], args.dit_steps), desc="transformer", initial=state["step"], total=args.dit_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.dit_steps, args.dit_lr, warmup=50)
        idx = rng.integers(n, size=args.dit_batch)
        x0 = latents[idx]
        texts = []
        for i in idx:
            u = rng.random()
            texts.append("" if u < 0.1 else pool["short"][i] if u < 0.4 else pool["captions"][i])
        text = torch.stack([embeds[t] for t in texts])
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = sample_sigmas(len(idx), shift=FLOW_SHIFT, generator=gen)
        xt = add_noise(x0, noise, sigmas)
        pred = model(hidden_states=xt, timestep=sigmas * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_matching_loss(pred, x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{ema:.4f}")
        state["step"] = step + 1
        if (step + 1) % 100 == 0 or step + 1 == args.dit_steps:
            state["history"].append({"step": step + 1, "loss_ema": ema})
            log.info("transformer step %d: flow-matching loss (ema) %.4f", step + 1, ema)
            atomic_torch_save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "rng": torch.get_rng_state()},
                ckpt,
            )
    model.eval()
    return state["history"][-1]


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
        card = out / "README.md"
        if card.exists():
            shutil.copy2(card, tmp / "README.md")
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

    specs = [ClipSpec("circle", "red", "black", "right", 0.9, 0.2, 0.5, 0.18),
             ClipSpec("square", "yellow", "gray", "down", 0.4, 0.5, 0.2, 0.18),
             ClipSpec("triangle", "blue", "black", "left", 0.9, 0.8, 0.5, 0.18)]  # fmt: skip
    prompts = []
    for i, spec in enumerate(specs):
        prompt = caption_for(spec, BASE_FRAMES, FPS)
        video = pipe(prompt=prompt, negative_prompt="", height=SIZE, width=SIZE, num_frames=BASE_FRAMES,
                     num_inference_steps=steps, guidance_scale=4.0, output_type="np",
                     generator=torch.Generator().manual_seed(seed + i)).frames[0]  # fmt: skip
        gen = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
        real = render_clip(spec, BASE_FRAMES, SIZE, FPS)
        save_strip(np.concatenate([real, gen], axis=1), work / f"sample_{i}.png")
        prompts.append(prompt)
        log.info("sample %d (%s): %s (top: rendered truth, bottom: generated)", i, prompt, work / f"sample_{i}.png")
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/pretrain_tiny_base"))
    p.add_argument("--out", type=Path, default=Path("src/radial_lora/assets/tiny-wan-base"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)  # 1 beats 2 on shared cores
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
    p.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the sample strips")
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = json.loads((args.work / "times.json").read_text()) if (args.work / "times.json").exists() else {}

    comp = build_components(args.seed)
    pipe = WanPipeline(**comp)
    pipe.set_progress_bar_config(disable=True)

    def timed(name: str, fn: Any) -> Any:
        # Wall seconds per phase, summed over resumed runs (an interrupted phase loses its own time).
        t = time.time()
        result = fn()
        times[name] = times.get(name, 0.0) + time.time() - t
        (args.work / "times.json").write_text(json.dumps(times, indent=1))
        return result

    vae_final = timed("vae_s", lambda: train_vae(comp, args.work, args))
    pool = timed("pool_s", lambda: build_pool(comp, pipe, args.work, args))
    dit_final = timed("transformer_s", lambda: train_transformer(comp, pool, args.work, args))
    prompts = samples(pipe, args.work, args.seed, args.sample_steps)
    summary = {"vae": vae_final, "transformer": dit_final, "times_s": times, "sample_prompts": prompts,
               "latents_mean": comp["vae"].config.latents_mean, "latents_std": comp["vae"].config.latents_std,
               "args": {k: str(v) for k, v in vars(args).items()}, "wall_this_run_s": time.time() - t0}  # fmt: skip
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("summary: %s", json.dumps(summary))
    if not args.no_export:
        export(pipe, args.out)


if __name__ == "__main__":
    main()
