"""Tiny pipelines of the real diffusers classes with random weights, for tests, examples and the demo.

Nothing is downloaded: every model is built from a small config and every tokenizer is a local
``tokenizers`` WordLevel model over a caption vocabulary (:func:`caption_vocabulary`). The pipelines
save with ``save_pretrained`` and load back with the stock ``DiffusionPipeline.from_pretrained``.

HunyuanVideo's stock prompt template crops the first ``crop_start = 95`` Llama-3 tokens (the system
prompt). The tiny Llama tokenizer splits text the way Llama-3 does where the template needs it (a
lone space before a digit and ``"\\n\\n"`` are tokens of their own), so the template prefix is
exactly 95 tokens and the stock crop leaves the user's caption, as with the real model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from radial_lora.constants import FAMILIES

logger = logging.getLogger(__name__)


# Words of simple synthetic captions ("a red circle moves right and bounces off the wall") and of
# everyday scene descriptions. Everything else becomes [UNK]; pass more text to caption_vocabulary().
_BASE_WORDS = """
a an the one two three four five six seven eight nine ten some many several small big large tiny huge
little tall short long wide thin thick bright dark light pale deep colorful
red green blue yellow orange purple pink white black gray grey brown cyan magenta violet gold silver
circle circles square squares triangle triangles rectangle rectangles ball balls box boxes dot dots
star stars shape shapes disk disc ring line lines bar bars block blocks cube object objects
moves move moving moved slides slide sliding rolls roll rolling bounces bounce bouncing falls fall
falling rises rise rising drifts drift drifting spins spin spinning rotates rotate rotating grows
grow growing shrinks shrink shrinking flies fly flying jumps jump jumping runs run running walks
walk walking travels travel crosses cross goes go turns turn turning swings oscillates orbits
stops stop stays stay waits appears disappears fades changes change pulses glows flashes
left right up down upward downward upwards downwards across around along through toward towards
away back forth diagonally horizontally vertically slowly quickly fast slow steadily smoothly
and or then while with without off of on onto in into at to from by over under above below
between behind before after again twice once is are it its they them their this that there
wall walls edge edges corner corners side sides top bottom center middle frame screen background
floor ceiling sky ground water grass field road room scene camera view video clip motion
person man woman dog cat bird car tree sun moon cloud clouds wave waves fire snow rain city
street beach ocean sea river mountain forest house window door table light shadow
""".split()

# Special tokens of each tokenizer, in id order (UMT5: pad 0, eos 1, unk 2 as in T5).
_UMT5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_LLAMA_SPECIALS = [
    "<|end_of_text|>",
    "<unk>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
_CLIP_SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<unk>"]

# Llama-3-like split: "\n\n", a space right before a digit, words, single punctuation marks.
_LLAMA_SPLIT = r"\n\n| (?=\d)|\w+|[^\w\s]"
# HunyuanVideo-I2V's Llava (Llama-3) template also has a lone "\n" after its "<image>" token.
_LLAVA_SPLIT = r"\n\n|\n| (?=\d)|\w+|[^\w\s]"
_WORD_SPLIT = r"\w+|[^\w\s]"


def caption_vocabulary(texts: Iterable[str] = ()) -> list[str]:
    """Sorted lowercase word vocabulary: the built-in caption words plus every word of ``texts``.

    The demo builds its model with the captions it will train on, so no caption word is [UNK].
    """
    words = set(_BASE_WORDS)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    for text in [*texts, DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ")]:
        words.update(w for w in re.findall(_WORD_SPLIT, re.sub(r"<\|\w+\|>", " ", text.lower())))
    words.update(str(d) for d in range(10))
    return sorted(words)


def _word_tokenizer(
    vocab: list[str], specials: list[str], unk: str, split: str, template: tuple[str, str] | None, **token_kwargs: str
) -> PreTrainedTokenizerFast:
    """A lowercase WordLevel tokenizer; ``template`` = (single, pair) post-processing with specials."""
    ids = {tok: i for i, tok in enumerate(specials)}
    for word in vocab:
        ids.setdefault(word, len(ids))
    if split in (_LLAMA_SPLIT, _LLAVA_SPLIT):
        ids.setdefault("\n\n", len(ids))
        ids.setdefault(" ", len(ids))
    if split == _LLAVA_SPLIT:
        ids.setdefault("\n", len(ids))
    tok = Tokenizer(WordLevel(vocab=ids, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    if template is not None:
        single, pair = template
        used = sorted({t for t in (single + " " + pair).split() if t in ids}, key=ids.get)
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, ids[t]) for t in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **token_kwargs)


def build_tokenizer(kind: str, vocab: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Local tokenizer standing in for ``kind`` in {"umt5", "llama", "llava", "clip"} (same special-token roles;
    "llava": Llama-3's with the ``<image>`` token of HunyuanVideo-I2V's text encoder)."""
    vocab = caption_vocabulary() if vocab is None else vocab
    if kind == "umt5":
        return _word_tokenizer(
            vocab,
            _UMT5_SPECIALS,
            "<unk>",
            _WORD_SPLIT,
            ("$A </s>", "$A </s> $B </s>"),
            pad_token="<pad>",
            eos_token="</s>",
            model_max_length=512,
        )
    if kind in ("llama", "llava"):
        return _word_tokenizer(
            vocab,
            _LLAMA_SPECIALS + (["<image>"] if kind == "llava" else []),
            "<unk>",
            _LLAMA_SPLIT if kind == "llama" else _LLAVA_SPLIT,
            ("<|begin_of_text|> $A", "<|begin_of_text|> $A <|begin_of_text|> $B"),
            pad_token="<|end_of_text|>",
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            model_max_length=1024,
        )
    if kind == "clip":
        return _word_tokenizer(
            vocab,
            _CLIP_SPECIALS,
            "<unk>",
            _WORD_SPLIT,
            ("<|startoftext|> $A <|endoftext|>", "<|startoftext|> $A <|endoftext|> $B <|endoftext|>"),
            pad_token="<|endoftext|>",
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            model_max_length=77,
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of 'umt5', 'llama', 'llava', 'clip'")


_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
_HUNYUAN_TRANSFORMER = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(4, 6, 6),
)


_HUNYUAN15_TRANSFORMER = dict(
    in_channels=9,  # latents, condition latents (4 each) and the condition mask
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    text_embed_2_dim=8,
    image_embed_dim=8,
    rope_axes_dim=(4, 6, 6),
    target_size=64,
    task_type="t2v",  # "i2v" for hunyuan15-i2v
)
# HunyuanVideo 1.5's Qwen2.5-VL stand-in formats prompts with a chat template (the pipeline crops its first
# 108 tokens, the system part of the real template).
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _check_overrides(family: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for the tiny {family!r} transformer; allowed: {sorted(defaults)}"
        )
    return {**defaults, **overrides}


def _wan_transformer(seed: int, cfg: dict[str, Any]) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg).eval()


def _build_wan(
    family: str,
    seed: int,
    vocab: list[str],
    overrides: dict[str, Any],
    expand_timesteps: bool = False,
    first_last: bool = False,
) -> DiffusionPipeline:
    cfg = _check_overrides(family, _WAN_TRANSFORMER, overrides)
    z = cfg["in_channels"]
    i2v = family.endswith("-i2v")
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * (i % 5) - 0.2 for i in range(z)],
        latents_std=[1.0 + 0.25 * (i % 3) for i in range(z)],
    ).eval()
    tokenizer = build_tokenizer("umt5", vocab)
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=cfg["text_dim"],
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    kwargs: dict[str, Any] = {}
    if i2v and not expand_timesteps:  # the input: noise, 4-channel frame mask, image latents (models/wan_i2v.py)
        cfg = {**cfg, "in_channels": 2 * z + 4, "out_channels": z}
        if family == "wan-i2v":  # Wan2.1-I2V: CLIP ViT penultimate states into every cross-attention
            kwargs = _tiny_clip_vision(seed + 4)
            dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
            cfg |= {"image_dim": kwargs["image_encoder"].config.hidden_size, "added_kv_proj_dim": dim}
            if first_last:  # Wan2.1-FLF2V: a position embedding over both images' CLIP tokens (17 each here)
                cfg |= {"pos_embed_seq_len": 2 * 17}
    transformer = _wan_transformer(seed + 2, cfg)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    if expand_timesteps:  # TI2V-5B: one transformer; the image's latent replaces frame 0 (timestep 0 there)
        kwargs |= {"expand_timesteps": True}
    elif family.startswith("wan22"):
        # Wan2.2 A14B: `transformer` denoises t >= boundary, `transformer_2` the low-noise rest.
        kwargs |= {"transformer_2": _wan_transformer(seed + 3, cfg), "boundary_ratio": 0.875}
    if i2v:  # imported here: its module imports CLIPImageProcessor, which warns without torchvision
        from diffusers import WanImageToVideoPipeline

    cls = WanImageToVideoPipeline if i2v else WanPipeline
    return cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer, **kwargs
    )


def _tiny_clip_vision(seed: int) -> dict[str, Any]:
    """A CLIP vision tower and its processor at 32x32 (16 patches + the class token): Wan2.1-I2V's image
    encoder in miniature. (Without torchvision, transformers warns once that it uses the PIL processor.)"""
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"image_encoder": encoder, "image_processor": processor}


def _build_hunyuan(family: str, seed: int, vocab: list[str], overrides: dict[str, Any]) -> DiffusionPipeline:
    """HunyuanVideo, text- or image-to-video (``image_condition_type`` "latent_concat", the 33-channel
    HunyuanVideo-I2V-33ch, or "token_replace", HunyuanVideo-I2V; then with a tiny Llava text encoder)."""
    i2v = family == "hunyuan-i2v"
    defaults = _HUNYUAN_TRANSFORMER | ({"image_condition_type": "latent_concat"} if i2v else {})
    cfg = _check_overrides(family, defaults, overrides)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg["in_channels"],
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    tokenizer = build_tokenizer("llava" if i2v else "llama", vocab)
    tokenizer_2 = build_tokenizer("clip", vocab)
    torch.manual_seed(seed + 1)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg["text_embed_dim"],
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048 if i2v else 1024,  # I2V: 256 text + the template + 576 image tokens
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = _tiny_llava(llama, tokenizer) if i2v else LlamaModel(llama).eval()
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=cfg["pooled_projection_dim"],
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=cfg["pooled_projection_dim"],
            pad_token_id=tokenizer_2.pad_token_id,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    if cfg.get("image_condition_type") == "latent_concat":  # noise, image latents, mask; no embedded guidance
        cfg = {**cfg, "in_channels": 2 * cfg["out_channels"] + 1, "guidance_embeds": False}
    transformer = HunyuanVideoTransformer3DModel(**cfg).eval()
    components = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    if not i2v:
        return HunyuanVideoPipeline(**components)
    from diffusers import HunyuanVideoImageToVideoPipeline
    from transformers import CLIPImageProcessor

    side = _LLAVA_IMAGE_SIDE
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return HunyuanVideoImageToVideoPipeline(**components, image_processor=processor)


# HunyuanVideo-I2V's template expands its one <image> token to 576 (image_emb_len): the tiny Llava's vision
# tower must give 576 patch features, 24 x 24 patches of 4 pixels.
_LLAVA_IMAGE_TOKENS = 576
_LLAVA_IMAGE_SIDE = 96


def _tiny_llava(llama: LlamaConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A Llava of a tiny CLIP vision tower and ``llama``: HunyuanVideo-I2V's text encoder in miniature (its
    image becomes 576 tokens of the prompt, as in llava-llama-3-8b)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=_LLAVA_IMAGE_SIDE,
        patch_size=_LLAVA_IMAGE_SIDE // 24,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=_LLAVA_IMAGE_TOKENS,
        pad_token_id=tokenizer.pad_token_id,  # read by the pipeline from the top-level config
    )
    return LlavaForConditionalGeneration(config).eval()


def _build_hunyuan15(family: str, seed: int, vocab: list[str], overrides: dict[str, Any]) -> DiffusionPipeline:
    """HunyuanVideo 1.5, text- or image-to-video (then with a tiny SigLIP of 16 tokens)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    task = "i2v" if family.endswith("-i2v") else "t2v"
    cfg = _check_overrides(family, {**_HUNYUAN15_TRANSFORMER, "task_type": task}, overrides)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=cfg["out_channels"], block_out_channels=(8,) * 5, layers_per_block=1
    ).eval()  # 16x spatial, 4x temporal as the real one
    tokenizer = build_tokenizer("llama", vocab)
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer_2 = ByT5Tokenizer()  # bytes: no vocabulary to build
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg["text_embed_dim"],
            intermediate_size=32,
            num_hidden_layers=3,  # the pipeline reads the third-last hidden state
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=cfg["text_embed_2_dim"], d_kv=4, d_ff=16, num_layers=1, num_heads=2
        )
    ).eval()
    torch.manual_seed(seed + 2)
    transformer = HunyuanVideo15Transformer3DModel(**cfg).eval()
    components = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    if task == "t2v":
        return HunyuanVideo15Pipeline(**components)
    torch.manual_seed(seed + 3)
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg["image_embed_dim"],
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return HunyuanVideo15ImageToVideoPipeline(**components, image_encoder=image_encoder, feature_extractor=processor)


def build_tiny_pipeline(
    family: str,
    seed: int = 0,
    *,
    vocabulary_texts: Iterable[str] = (),
    expand_timesteps: bool = False,
    first_last: bool = False,
    **overrides: Any,
) -> DiffusionPipeline:
    """A tiny random-weight pipeline of ``family`` (``radial_lora.constants.FAMILIES``), in float32 on CPU.

    ``overrides`` change the transformer config (e.g. ``num_layers=4``); ``vocabulary_texts`` adds
    words to the tokenizers' vocabulary. Same seed, same weights. ``expand_timesteps`` (``wan22-i2v``):
    Wan2.2-TI2V-5B's layout, one transformer that takes the image in place of the first latent frame.
    ``first_last`` (``wan-i2v``): Wan2.1-FLF2V's, which generates between a first and a last frame.
    """
    vocab = caption_vocabulary(vocabulary_texts)
    if expand_timesteps and family != "wan22-i2v":
        raise ValueError("expand_timesteps is Wan2.2-TI2V-5B's image mode: family 'wan22-i2v'")
    if first_last and family != "wan-i2v":
        raise ValueError("first_last is Wan2.1-FLF2V's layout: family 'wan-i2v'")
    if family in ("wan", "wan22", "wan-i2v", "wan22-i2v"):
        pipe = _build_wan(family, seed, vocab, overrides, expand_timesteps, first_last)
    elif family in ("hunyuan", "hunyuan-i2v"):
        if family == "hunyuan-i2v":  # the words of its Llava prompt template
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

            vocab = caption_vocabulary([*vocabulary_texts, DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ")])
        pipe = _build_hunyuan(family, seed, vocab, overrides)
    elif family in ("hunyuan15", "hunyuan15-i2v"):
        pipe = _build_hunyuan15(family, seed, vocab, overrides)
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    pipe.set_progress_bar_config(disable=True)
    from radial_lora.models.registry import detect_family

    detect_family(pipe)  # tags the transformers, so a lone Wan2.2 expert still reports "wan22"
    return pipe


def save_tiny_pipeline(
    family: str, out_dir: str | os.PathLike, seed: int = 0, *, vocabulary_texts: Iterable[str] = (), **overrides: Any
) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``out_dir`` (written to a temp dir, then moved)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory for the tiny pipeline")
    pipe = build_tiny_pipeline(family, seed, vocabulary_texts=vocabulary_texts, **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved tiny %s pipeline to %s", family, out)
    return out
