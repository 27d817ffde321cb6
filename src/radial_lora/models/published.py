"""The published models by hub id: family, transformer config and VAE factors, known without a download.

Why: ``radial-lora plan`` and ``radial-lora mask`` answer questions about the real models (memory, tokens per
frame, heads) on a laptop, and the tests build the real configs with few blocks and random weights. The
values are those of the models' diffusers ``config.json`` files that matter here (the Wan team's configs:
Wan2.1 1.3B 1536 = 12 x 128, 14B 5120 = 40 x 128; Wan2.2 TI2V-5B 3072 = 24 x 128 with the 16x-spatial,
48-channel Wan2.2 VAE; HunyuanVideo 24 x 128, 20 double + 40 single blocks, and so its I2V models, with
33 input channels (I2V-33ch) or the image in place of frame 0 (I2V); the Wan image-to-video 14B models take
36 input channels, Wan2.1-I2V also CLIP ViT-H embeddings, 1280 wide, into every cross-attention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Published:
    family: str  # radial-lora family (radial_lora.constants.FAMILIES)
    transformer: dict[str, Any]  # the diffusers transformer config (as its config.json, no "_" keys)
    vae: tuple[int, int]  # (temporal, spatial) compression
    experts: int = 1  # Wan2.2 A14B: two transformers


def wan_config(
    heads: int,
    ffn: int,
    layers: int,
    head_dim: int = 128,
    channels: int = 16,
    text_dim: int = 4096,
    freq_dim: int = 256,
    i2v: bool = False,
    image_dim: int | None = None,
) -> dict[str, Any]:
    """A ``WanTransformer3DModel`` config: the published ones, and smaller ones of the same shape for tests and
    the memory fit. ``i2v``: the input also holds the frame mask and the image latents (2 x channels + 4);
    ``image_dim``: CLIP image embeddings into every cross-attention (Wan2.1-I2V: ViT-H, 1280)."""
    image = {"image_dim": image_dim, "added_kv_proj_dim": heads * head_dim} if image_dim else {}
    return image | dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=2 * channels + 4 if i2v else channels,
        out_channels=channels,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def hunyuan_config(
    heads: int,
    layers: int,
    single: int,
    head_dim: int = 128,
    mlp_ratio: float = 4.0,
    refiner: int = 2,
    channels: int = 16,
    text_dim: int = 4096,
    pooled_dim: int = 768,
    image_condition: str | None = None,
) -> dict[str, Any]:
    """A ``HunyuanVideoTransformer3DModel`` config. RoPE splits the head as the published model does
    (16, 56, 56 of 128): an eighth for time, the rest shared by height and width. ``image_condition``:
    HunyuanVideo-I2V's ``image_condition_type`` ("latent_concat": 2 x channels + 1 in, no embedded guidance;
    "token_replace"), as diffusers' conversion script sets them."""
    time_dim = head_dim // 8
    image = {} if image_condition is None else {"image_condition_type": image_condition}
    return image | dict(
        in_channels=2 * channels + 1 if image_condition == "latent_concat" else channels,
        out_channels=channels,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_single_layers=single,
        num_refiner_layers=refiner,
        mlp_ratio=mlp_ratio,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=image_condition != "latent_concat",
        text_embed_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        rope_theta=256.0,
        rope_axes_dim=(time_dim, (head_dim - time_dim) // 2, (head_dim - time_dim) // 2),
    )


def hunyuan15_config(task: str, target_size: int = 640) -> dict[str, Any]:
    """A ``HunyuanVideo15Transformer3DModel`` config of the published 8.3B models: 54 double-stream blocks of
    16 x 128, patch 1, 32 latent channels (65 in: noise, condition latents, condition mask), Qwen2.5-VL-7B
    (3584), ByT5 (1472) and SigLIP (1152) inputs; ``target_size`` 640 for 480p, 960 for 720p."""
    return dict(
        in_channels=65,
        out_channels=32,
        num_attention_heads=16,
        attention_head_dim=128,
        num_layers=54,
        num_refiner_layers=2,
        mlp_ratio=4.0,
        patch_size=1,
        patch_size_t=1,
        qk_norm="rms_norm",
        text_embed_dim=3584,
        text_embed_2_dim=1472,
        image_embed_dim=1152,
        rope_theta=256.0,
        rope_axes_dim=(16, 56, 56),
        target_size=target_size,
        task_type=task,
        use_meanflow=False,
    )


PUBLISHED: dict[str, Published] = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": Published("wan", wan_config(12, 8960, 30), (4, 8)),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": Published("wan", wan_config(40, 13824, 40), (4, 8)),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": Published("wan22", wan_config(24, 14336, 30, channels=48), (4, 16)),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": Published("wan22", wan_config(40, 13824, 40), (4, 8), experts=2),
    "hunyuanvideo-community/HunyuanVideo": Published("hunyuan", hunyuan_config(24, 20, 40), (4, 8)),
    "hunyuanvideo-community/HunyuanVideo-I2V": Published(
        "hunyuan-i2v", hunyuan_config(24, 20, 40, image_condition="token_replace"), (4, 8)
    ),
    "hunyuanvideo-community/HunyuanVideo-I2V-33ch": Published(
        "hunyuan-i2v", hunyuan_config(24, 20, 40, image_condition="latent_concat"), (4, 8)
    ),
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v": Published("hunyuan15", hunyuan15_config("t2v"), (4, 16)),
    "hunyuanvideo-community/HunyuanVideo-1.5-720p_t2v": Published("hunyuan15", hunyuan15_config("t2v", 960), (4, 16)),
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v": Published("hunyuan15-i2v", hunyuan15_config("i2v"), (4, 16)),
    "hunyuanvideo-community/HunyuanVideo-1.5-720p_i2v": Published(
        "hunyuan15-i2v", hunyuan15_config("i2v", 960), (4, 16)
    ),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": Published(
        "wan-i2v", wan_config(40, 13824, 40, i2v=True, image_dim=1280), (4, 8)
    ),
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": Published(
        "wan-i2v", wan_config(40, 13824, 40, i2v=True, image_dim=1280), (4, 8)
    ),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": Published("wan22-i2v", wan_config(40, 13824, 40, i2v=True), (4, 8), experts=2),
    # the first-last-frame model: Wan2.1-I2V-14B with a position embedding over both images' 257 CLIP tokens
    "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers": Published(
        "wan-i2v", wan_config(40, 13824, 40, i2v=True, image_dim=1280) | {"pos_embed_seq_len": 2 * 257}, (4, 8)
    ),
}


def published(model: str) -> Published | None:
    """The entry of a published hub id, or None."""
    return PUBLISHED.get(model)


def build_transformer(family: str, config: dict[str, Any], device: Any = "meta") -> Any:
    """The real diffusers transformer class of ``family`` at ``config`` (default on the meta device: no memory,
    for counting parameters)."""
    import diffusers
    import torch

    from radial_lora.models.registry import get_adapter

    cls = getattr(diffusers, get_adapter(family).transformer_class_name)
    with torch.device(device):
        return cls(**config)


def patch_of(config: dict[str, Any]) -> tuple[int, int, int]:
    """``(t, h, w)`` patch of a transformer config: Wan's ``patch_size`` is the triple, HunyuanVideo's a side
    with ``patch_size_t`` beside it."""
    patch = config.get("patch_size", (1, 2, 2))
    if isinstance(patch, list | tuple):
        return tuple(int(p) for p in patch)  # type: ignore[return-value]
    return int(config.get("patch_size_t", 1)), int(patch), int(patch)


def describe_model(model: str) -> Published:
    """A published hub id (no download) or a local pipeline / transformer folder (its JSON configs only):
    family, transformer config and VAE factors."""
    if model in PUBLISHED:
        return PUBLISHED[model]
    from radial_lora.models.builtin import resolve_model_id

    root = Path(resolve_model_id(model))
    config_file = next((f for f in (root / "transformer" / "config.json", root / "config.json") if f.is_file()), None)
    if config_file is None:
        raise ValueError(
            f"{model}: not a known hub id ({', '.join(PUBLISHED)}) nor a folder with transformer/config.json; "
            "download the pipeline or pass one of those ids"
        )
    from radial_lora.models.registry import family_of, get_adapter

    config = json.loads(config_file.read_text())
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    class_name = index.get("_class_name") or config.get("_class_name", "")
    family = family_of(class_name, index, config, str(config_file))
    experts = 1 if (index.get("transformer_2") or [None])[0] is None else 2
    spatial = get_adapter(family).lone_vae_factors(config)[1]
    vae_file = root / "vae" / "config.json"
    if vae_file.is_file():
        vae = json.loads(vae_file.read_text())
        spatial = vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio")  # Wan; HunyuanVideo
        spatial = int(spatial or 2 ** len(vae.get("temperal_downsample", [0, 0, 0])))
    transformer = {k: v for k, v in config.items() if not k.startswith("_")}
    return Published(family, transformer, (4, spatial), experts)
