"""Names every layer agrees on, in one place that imports nothing: the config validates against them
without loading peft, transformers or diffusers, and the modules that act on them import them from here."""

from __future__ import annotations

FAMILIES = (
    "wan",
    "wan22",
    "hunyuan",
    "hunyuan15",
    "wan-i2v",
    "wan22-i2v",
    "hunyuan15-i2v",
    "hunyuan-i2v",
)  # models/registry.py: one adapter each
# The transformer kind of each family: an image-to-video family has its text-to-video twin's blocks.
ARCHITECTURE = {
    "wan": "wan",
    "wan22": "wan22",
    "hunyuan": "hunyuan",
    "hunyuan15": "hunyuan15",
    "wan-i2v": "wan",
    "wan22-i2v": "wan22",
    "hunyuan15-i2v": "hunyuan15",
    "hunyuan-i2v": "hunyuan",
}
FAMILY_TASK = {f: "i2v" if f.endswith("-i2v") else "t2v" for f in FAMILIES}  # what a family generates from
# The mask defaults of the authors' scripts per family: decay (Wan2.1 0.2, Wan2.2 0.8, HunyuanVideo 0.95) and
# block size in tokens (their Wan2.2 code uses 64-token blocks, the others 128). They published no
# image-to-video settings: the I2V families take their text-to-video twin's (our choice, docs/IMAGE_TO_VIDEO.md),
# nor any for HunyuanVideo 1.5: it takes HunyuanVideo's (our choice, docs/HUNYUANVIDEO_1_5.md). Per architecture:
FAMILY_DECAY = {f: {"wan": 0.2, "wan22": 0.8, "hunyuan": 0.95, "hunyuan15": 0.95}[a] for f, a in ARCHITECTURE.items()}
FAMILY_BLOCK_SIZE = {f: {"wan": 128, "wan22": 64, "hunyuan": 128, "hunyuan15": 128}[a] for f, a in ARCHITECTURE.items()}
PATTERNS = ("radial", "dense")  # attention of the patched transformer (dense: the like-for-like baseline)
BACKENDS = ("auto", "flex", "sparse", "dense", "reference")  # attention/__init__.py: block_sparse_attention
TIMESTEP_SCHEMES = ("uniform", "logit_normal")  # train/flow_matching.py: sample_sigmas
EXPERTS = ("high", "low")  # Wan2.2 A14B: transformer (high noise), transformer_2 (low noise)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # LoRA on the attention projections (the paper's recipe)
# The frozen base's weights (models/quantize.py): "none" keeps the training dtype; "8bit" is the measured best
# 8-bit format (int8, benchmarks/quantized_base.py); "int8" / "float8" name one (weight-only, per-row scales).
BASE_QUANTIZATIONS = ("none", "8bit", "int8", "float8")
# Per-clip tensors of an image-to-video dataset besides the latents and text (models/wan_i2v.py builds them)
IMAGE_LATENTS = "image_latents"  # [C, F, h, w]: the first frame's VAE latents at the clip's length (per family)
# [tokens, dim]: the image encoder's states of the first frame (Wan2.1-I2V: CLIP; HunyuanVideo 1.5 I2V: SigLIP)
IMAGE_EMBEDS = "encoder_hidden_states_image"
FIRST_FRAME = "first_frame"  # uint8 [H, W, 3]: the frame itself (samples and evaluate start from it)
LAST_FRAME = "last_frame"  # uint8 [H, W, 3]: the clip's last frame, for first-last-frame models (Wan2.1-FLF2V)
