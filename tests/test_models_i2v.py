"""Wan image-to-video (models/wan_i2v.py): the trainer's transformer inputs are the stock pipeline's, bit for bit;
detection by pipeline, folder and lone transformer; the prefix of a clip's image latents is the shorter clip's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model_cases import capture_inputs, random_frames
from radial_lora.constants import FIRST_FRAME, IMAGE_EMBEDS, IMAGE_LATENTS
from radial_lora.models import build_tiny_pipeline, detect_family, get_adapter
from radial_lora.models.wan_i2v import frame_mask
from radial_lora.train.flow_matching import flow_step

I2V = ["wan-i2v", "wan22-i2v"]


# (family, layout): Wan2.1-I2V, Wan2.2-I2V-A14B, TI2V-5B's expand_timesteps, Wan2.1-FLF2V's first and last frame
CASES = [("wan-i2v", ""), ("wan22-i2v", ""), ("wan22-i2v", "expand_timesteps"), ("wan-i2v", "first_last")]


def _pipe(family: str, layout: str):
    return build_tiny_pipeline(family, **({layout: True} if layout else {}))


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_trainer_inputs_equal_the_stock_pipeline_inputs(family: str, layout: str) -> None:
    """One denoising step of WanImageToVideoPipeline, its transformer's inputs captured; the adapter given the
    same x_t and timestep, with the conditioning data prepare stores (encode_prompts + encode_images), feeds
    the transformer exactly the same tensors (TI2V-5B: the image's latent in frame 0, per-token timesteps;
    FLF2V: the last frame in the video condition and the mask, both images' CLIP tokens)."""
    pipe = _pipe(family, layout)
    expand, first_last = layout == "expand_timesteps", layout == "first_last"
    adapter = get_adapter(family)
    frame, last = random_frames(2)
    seen, handle = capture_inputs(pipe.transformer)
    pipe(
        prompt="a red circle moves right",
        image=Image.fromarray(frame),
        last_image=Image.fromarray(last) if first_last else None,
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    handle.remove()
    stock = seen[0]
    z = pipe.vae.config.z_dim
    x_t = stock["hidden_states"][:, :z]
    t = stock["timestep"]
    if expand:  # frame 0 of the captured input is the image; the pipeline's x_t is pure noise at step one
        x_t = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
        t = t.max().reshape(1)  # the step's timestep; the pipeline spreads it per token

    lasts = [last] if first_last else None
    cond = adapter.encode_prompts(pipe, ["a red circle moves right"]) | adapter.encode_images(pipe, [frame], 9, lasts)
    assert (IMAGE_EMBEDS in cond) == (family == "wan-i2v")  # Wan2.2-I2V-A14B has no image encoder
    seen, handle = capture_inputs(pipe.transformer)
    adapter.predict(pipe.transformer, x_t, t, cond)
    handle.remove()
    ours = seen[0]
    assert sorted(k for k, v in ours.items() if v is not None) == sorted(k for k, v in stock.items() if v is not None)
    for key, value in stock.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
    if expand:  # timestep 0 on the image's tokens, the step's elsewhere; the rest of the input is x_t
        tokens = stock["hidden_states"].shape[3] * stock["hidden_states"].shape[4] // 4
        assert stock["timestep"][0, :tokens].max() == 0 and stock["timestep"][0, tokens:].min() == t
        assert torch.equal(stock["hidden_states"][:, :, 1:], x_t[:, :, 1:])
        return
    # The mask channels: 1 on the first latent frame, 0 after it (a first-frame condition); FLF2V: also the
    # last video frame, the 4th of the last latent frame's 4 channels.
    mask = stock["hidden_states"][:, z : z + 4]
    assert torch.equal(mask, frame_mask(x_t, last=first_last)) and mask[:, :, 0].min() == 1
    assert mask[:, :, 1:-1].max() == 0 and mask[:, :3, -1].max() == 0 and mask[:, 3, -1].min() == int(first_last)
    if first_last:  # both images' CLIP tokens, first then last, as the pipeline's [2, 257, D] pair
        assert cond[IMAGE_EMBEDS].shape[1] == 2 * stock["encoder_hidden_states_image"].shape[1]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_flow_step_trains_on_the_generated_frames_with_the_condition(family: str, layout: str) -> None:
    """The trainer's forward (flow_step) with the image conditioning: a finite loss, a different image changes
    the prediction; Wan2.1/2.2-I2V and FLF2V train every frame (the image reaches the patch embedding's image
    channels), TI2V-5B leaves frame 0 out: the noise drawn for it changes nothing."""
    pipe = _pipe(family, layout)
    expand = layout == "expand_timesteps"
    adapter = get_adapter(family)
    frames = random_frames(4, seed=1)
    lasts = frames[2:] if layout == "first_last" else None
    cond = adapter.encode_prompts(pipe, ["a", "b"]) | adapter.encode_images(pipe, frames[:2], 9, lasts)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    step = flow_step(adapter, pipe.transformer, x0, cond, torch.tensor([0.5, 0.9]), noise)
    step.loss.backward()
    assert torch.isfinite(step.loss) and adapter.given_frames(pipe.transformer) == int(expand)
    if not expand:
        weight = pipe.transformer.patch_embedding.weight  # [dim, 2z+4, 1, 2, 2]: noise | mask | image latents
        assert weight.grad[:, 8:].abs().sum() > 0
    swapped = {**cond, IMAGE_LATENTS: cond[IMAGE_LATENTS].flip(0)}
    with torch.no_grad():
        again = adapter.predict(pipe.transformer, step.noisy, step.timesteps, swapped)
        assert not torch.allclose(again, step.prediction.detach())
        other = noise.clone()
        other[:, :, 0] += 1.0
        moved = flow_step(adapter, pipe.transformer, x0, cond, torch.tensor([0.5, 0.9]), other).loss
    assert (moved == step.loss) if expand else (moved != step.loss)


def test_prefix_of_the_image_latents_is_the_shorter_clip() -> None:
    """The VAE is causal: the image latents of a 9-frame video are the first 3 latent frames of a 17-frame one's
    (what the consistency term's base-length prefix uses)."""
    pipe = build_tiny_pipeline("wan-i2v")
    adapter = get_adapter("wan-i2v")
    frames = random_frames(1, seed=2)
    long = adapter.encode_images(pipe, frames, 17)
    short = adapter.encode_images(pipe, frames, 9)
    prefix = adapter.prefix(long, 3)
    assert torch.equal(prefix[IMAGE_LATENTS], short[IMAGE_LATENTS])
    assert torch.equal(prefix[IMAGE_EMBEDS], long[IMAGE_EMBEDS])


@pytest.mark.parametrize("family", I2V)
def test_detected_from_pipeline_folder_and_lone_transformer(family: str, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline(family)
    assert detect_family(pipe) == family
    pipe.save_pretrained(tmp_path / "pipe")
    assert detect_family(tmp_path / "pipe") == family
    lone = type(pipe.transformer)(**pipe.transformer.config)  # untagged, out of its pipeline
    assert detect_family(lone) == "wan-i2v"  # a lone A14B expert looks like Wan2.1, as for text-to-video
    assert get_adapter(family).task == "i2v" and get_adapter("wan").task == "t2v"
    # Wan2.2-TI2V-5B's folder says WanPipeline (text-to-video): its image mode loads with --family wan22-i2v.
    ti2v = {"_class_name": "WanPipeline", "expand_timesteps": True}
    assert get_adapter("wan22-i2v").accepts(ti2v) and not get_adapter("wan-i2v").accepts(ti2v)
    assert not get_adapter("wan22-i2v").accepts({"_class_name": "WanPipeline", "transformer_2": ["x", "y"]})


def test_text_only_family_refuses_an_image() -> None:
    with pytest.raises(ValueError, match="text only"):
        get_adapter("wan").encode_images(build_tiny_pipeline("wan"), random_frames(1), 9)
    assert FIRST_FRAME not in get_adapter("wan-i2v").encode_images(build_tiny_pipeline("wan-i2v"), random_frames(1), 9)
    with pytest.raises(ValueError, match="starts from a first frame only; it takes no last frame"):
        get_adapter("wan-i2v").encode_images(build_tiny_pipeline("wan-i2v"), random_frames(1), 9, random_frames(1))
