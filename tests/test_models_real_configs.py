"""The published transformer configs (Wan2.1-1.3B, -14B, Wan2.2-TI2V-5B, HunyuanVideo, Wan2.1-I2V-14B) at
their real width, heads and norms, one block of each kind, random weights: radial attention equals diffusers'
stock processor given the radial mask as a token mask, in float32.

Here: Wan2.1-1.3B at the real 480p geometry (5 latent frames x 1560 tokens, 128-token blocks: 12.2 blocks
a frame), about 20 s on 2 CPU cores; the wider configs at a geometry of several latent frames whose frames are
not whole blocks (the real width is the cost: a 14B block is 351M parameters). ``RADIAL_LORA_REAL_GEOMETRY=1``:
every config at the real geometry (TI2V-5B at 704x1280: 5 x 880 tokens, its 16x VAE, 64-token blocks), about
a minute per config on 2 CPU cores and seconds on a GPU (``benchmarks/gpu_check.sh`` runs it there; the radial
side is then compiled FlexAttention)."""

from __future__ import annotations

import os

import pytest
import torch

from model_cases import oracle_processors
from radial_lora.attention.reference import expand_block_mask
from radial_lora.models import apply_radial_attention, get_adapter
from radial_lora.models.published import PUBLISHED, build_transformer
from radial_lora.models.registry import detect_family

REAL_GEOMETRY = os.environ.get("RADIAL_LORA_REAL_GEOMETRY") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (latent frames, latent height, latent width): 9 frames of 4 x 6 = 24 tokens, 16-token blocks (1.5 per frame)
SMALL = (9, 8, 12)
pytestmark = pytest.mark.slow


REAL_IN_CI = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v")


def _geometry(hub: str) -> tuple[tuple[int, int, int], int | None]:
    """(latent frames, latent height, latent width) and the block size (None: the family's default)."""
    if not (REAL_GEOMETRY or hub in REAL_IN_CI):
        return SMALL, 16
    if "HunyuanVideo-1.5" in hub:  # 480x848 / 16, patch 1: 1590 tokens per frame (3 latent frames in CI)
        return (5 if REAL_GEOMETRY else 3, 30, 53), None
    return ((5, 44, 80) if "TI2V" in hub else (5, 60, 104)), None  # 704x1280 / 16; 480x832 / 8


# A14B's experts are the 14B configs; Wan2.1-I2V's 720P transformer is its 480P one. HunyuanVideo-I2V's blocks,
# width and attention are HunyuanVideo's (its inputs are checked against the stock pipeline on the tiny model):
# with the real geometry only.
SAME_AS_ANOTHER = ("A14B", "720", "" if REAL_GEOMETRY else "HunyuanVideo-I2V")


@pytest.fixture(params=[h for h in PUBLISHED if not any(s and s in h for s in SAME_AS_ANOTHER)])
def real(request):
    hub = request.param
    spec = PUBLISHED[hub]
    config = dict(spec.transformer) | {"num_layers": 1}
    if spec.family in ("hunyuan", "hunyuan-i2v"):
        config |= {"num_single_layers": 1, "num_refiner_layers": 1}
    if spec.family.startswith("hunyuan15"):
        config |= {"num_refiner_layers": 1}
    torch.manual_seed(0)
    transformer = build_transformer(spec.family, config, DEVICE).eval()
    yield hub, spec, transformer


def _call(family: str, transformer: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if family in ("hunyuan", "hunyuan-i2v"):  # HunyuanVideo-I2V: the Llava states of image and prompt alike
        mask = torch.zeros(1, 16, dtype=torch.long)
        mask[:, :11] = 1  # 5 padded text tokens
        text = {
            "encoder_hidden_states": torch.randn(1, 16, 4096, generator=g),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(1, 768, generator=g),
        }
        extra = {"guidance": torch.tensor([6000.0], device=DEVICE)}
    elif family.startswith(
        "hunyuan15"
    ):  # Qwen2.5-VL 16 tokens (11 valid), ByT5 8 (3 valid); predict adds 729 image ones
        mask, mask_2 = torch.zeros(1, 16), torch.zeros(1, 8)
        mask[:, :11], mask_2[:, :3] = 1, 1
        text = {
            "encoder_hidden_states": torch.randn(1, 16, 3584, generator=g),
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(1, 8, 1472, generator=g),
            "encoder_attention_mask_2": mask_2,
        }
    else:
        text, extra = {"encoder_hidden_states": torch.randn(1, 16, 4096, generator=g)}, {}
    if family.endswith("-i2v"):  # the frame mask and image latents on channels; Wan2.1-I2V's CLIP tokens
        f, h, w = latents.shape[2:]
        text["image_latents"] = torch.randn(1, transformer.config.out_channels, f, h, w, generator=g)
        if family == "hunyuan15-i2v":  # SigLIP's 729 tokens, valid ones of the joint text
            text["encoder_hidden_states_image"] = torch.randn(1, 729, 1152, generator=g)
        if getattr(transformer.config, "image_dim", None):  # its cross-attention reads the last 512 tokens as text
            text["encoder_hidden_states"] = torch.randn(1, 512, 4096, generator=g)
            text["encoder_hidden_states_image"] = torch.randn(1, 257, 1280, generator=g)
    text = {k: v.to(DEVICE) for k, v in text.items()}
    t = torch.tensor([700.0], device=DEVICE)
    with torch.no_grad():
        if family.endswith("-i2v") or family.startswith("hunyuan15"):
            return get_adapter(family).predict(transformer, latents, t, text)
        return transformer(latents, t, **text, **extra, return_dict=False)[0]


def test_radial_matches_the_token_mask_oracle_at_the_real_width(real) -> None:
    hub, spec, transformer = real
    family = detect_family(transformer)  # a lone transformer: TI2V-5B's 48 channels say Wan2.2
    assert family == spec.family
    (frames, h, w), block_size = _geometry(hub)
    shape = (1, transformer.config.out_channels, frames, h, w)  # image-to-video: the image is added by _call
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    adapter = get_adapter(family)
    controller = apply_radial_attention(transformer, block_size=block_size)  # backend auto: the CPU kernel
    block = controller.block_size
    radial = _call(family, transformer, latents)
    density = controller.last_density
    pt, ph, pw = adapter.patch_size(transformer)
    tokens = frames // pt * (h // ph) * (w // pw)
    text = {"hunyuan": 16, "hunyuan-i2v": 16, "hunyuan15": 16 + 8 + 729, "hunyuan15-i2v": 16 + 8 + 729}.get(family, 0)
    geo = controller.geometry_for(tokens)
    token_mask = expand_block_mask(controller.mask(*geo, text), tokens + text, block).to(DEVICE)
    from radial_lora.models import remove_radial_attention

    remove_radial_attention(transformer)
    transformer.set_attn_processor(oracle_processors(family, transformer, token_mask))
    oracle = _call(family, transformer, latents)
    assert density is not None and density < 0.95, density  # the mask really drops blocks
    err = float((radial - oracle).abs().max() / oracle.abs().max())
    assert err < 1e-5, (hub, err)
    assert adapter.default_block_size == (64 if adapter.architecture == "wan22" else 128)
