"""HunyuanVideo-I2V (models/hunyuan_i2v.py), both published layouts (latent_concat: HunyuanVideo-I2V-33ch;
token_replace: HunyuanVideo-I2V): the trainer's transformer inputs are the stock pipeline's, bit for bit; the
empty caption is the pipeline's negative branch; the loss leaves out exactly the frames the pipeline keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_cases import capture_inputs, random_frames
from radial_lora.constants import IMAGE_LATENTS
from radial_lora.models import build_tiny_pipeline, detect_family, get_adapter
from radial_lora.models.hunyuan_i2v import IMAGE_EMBED_INTERLEAVE, IMAGE_TOKENS
from radial_lora.train.flow_matching import flow_step

KINDS = ["latent_concat", "token_replace"]
PROMPT = "a red circle moves right"


@pytest.fixture(scope="module", params=KINDS)
def pipe(request):
    return build_tiny_pipeline("hunyuan-i2v", image_condition_type=request.param)


def test_trainer_inputs_equal_the_stock_pipeline_inputs(pipe) -> None:
    """One denoising step of HunyuanVideoImageToVideoPipeline with its transformer's inputs captured; the adapter
    given the same x_t and timestep and the conditioning data prepare stores (encode_images: the image latents
    and the Llava text of image and prompt) feeds the transformer exactly the same tensors."""
    kind = pipe.transformer.config.image_condition_type
    adapter = get_adapter("hunyuan-i2v")
    (frame,) = random_frames(1)
    seen, handle = capture_inputs(pipe.transformer)
    pipe(
        prompt=PROMPT,
        image=Image.fromarray(frame),
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=1,
        guidance_scale=adapter.guidance_scale,  # the embedded guidance training conditions on (token_replace)
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    handle.remove()
    stock = seen[0]
    channels = pipe.transformer.config.out_channels
    x_t = stock["hidden_states"][:, :channels].clone()
    if kind == "token_replace":  # the captured frame 0 is the image's latent; any x_t frame 0 gives the same input
        x_t[:, :, 0] = torch.randn(x_t[:, :, 0].shape, generator=torch.Generator().manual_seed(1))

    cond = adapter.encode_images(pipe, [frame], 9) | adapter.encode_prompts_with_images(pipe, [PROMPT], [frame])
    text_tokens = IMAGE_TOKENS // IMAGE_EMBED_INTERLEAVE[kind] + 256 - 4
    assert cond["encoder_hidden_states"].shape[1] == text_tokens
    seen, handle = capture_inputs(pipe.transformer)
    adapter.predict(pipe.transformer, x_t, stock["timestep"], cond)
    handle.remove()
    ours = seen[0]
    assert sorted(k for k, v in ours.items() if v is not None) == sorted(k for k, v in stock.items() if v is not None)
    for key, value in stock.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == ours[key].dtype and torch.equal(ours[key], value), key
    hidden = stock["hidden_states"]
    if kind == "latent_concat":  # noise | the image's latent on frame 0, zeros after | mask 1 on frame 0
        assert hidden.shape[1] == 2 * channels + 1
        assert hidden[:, channels:-1, 1:].abs().max() == 0 and hidden[:, channels:-1, 0].abs().max() > 0
        assert hidden[:, -1, 0].min() == 1 and hidden[:, -1, 1:].max() == 0
    else:
        assert torch.equal(hidden[:, :, :1], cond[IMAGE_LATENTS]) and torch.equal(hidden[:, :, 1:], x_t[:, :, 1:])


def test_the_empty_caption_is_the_pipelines_negative_branch() -> None:
    """True CFG on the 33-channel model: the pipeline's second (negative) call reads the empty prompt with a black
    image; ``encode_prompts([""])`` (the dataset's null_text, for caption dropout) is exactly that text."""
    pipe = build_tiny_pipeline("hunyuan-i2v")
    adapter = get_adapter("hunyuan-i2v")
    seen, handle = capture_inputs(pipe.transformer)
    pipe(
        prompt=PROMPT,
        image=Image.fromarray(random_frames(1)[0]),
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=1,
        **adapter.guidance_arguments(pipe, 3.0),
        output_type="latent",
    )
    handle.remove()
    assert len(seen) == 2  # true CFG: a conditional and a negative call
    null = adapter.encode_prompts(pipe, [""])
    negative = seen[1]
    for key in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"):
        assert torch.equal(null[key].to(negative[key].dtype), negative[key]), key
    assert adapter.guidance_passes(3.0, pipe.transformer) == 2 and adapter.guidance_passes(1.0, pipe.transformer) == 1


def test_flow_step_trains_on_the_frames_the_pipeline_generates(pipe) -> None:
    """latent_concat generates every latent frame (the noise drawn for frame 0 changes the loss); token_replace
    keeps frame 0 as the image (the pipeline never steps it): that frame's noise changes nothing. A different
    image changes the prediction in both."""
    kind = pipe.transformer.config.image_condition_type
    adapter = get_adapter("hunyuan-i2v")
    frames = random_frames(2, seed=1)
    cond = adapter.encode_images(pipe, frames, 9) | adapter.encode_prompts_with_images(pipe, ["a", "b"], frames)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    step = flow_step(adapter, pipe.transformer, x0, cond, torch.tensor([0.5, 0.9]), noise)
    step.loss.backward()
    replace = kind == "token_replace"
    assert torch.isfinite(step.loss) and adapter.given_frames(pipe.transformer) == int(replace)
    with torch.no_grad():
        swapped = {**cond, IMAGE_LATENTS: cond[IMAGE_LATENTS].flip(0)}
        again = adapter.predict(pipe.transformer, step.noisy, step.timesteps, swapped)
        assert not torch.allclose(again, step.prediction.detach())
        other = noise.clone()
        other[:, :, 0] += 1.0
        moved = flow_step(adapter, pipe.transformer, x0, cond, torch.tensor([0.5, 0.9]), other).loss
    assert (moved == step.loss) if replace else (moved != step.loss)


def test_detected_from_pipeline_folder_and_lone_transformer(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("hunyuan-i2v", image_condition_type="token_replace")
    assert detect_family(pipe) == "hunyuan-i2v" and get_adapter("hunyuan-i2v").task == "i2v"
    pipe.save_pretrained(tmp_path / "pipe")
    assert detect_family(tmp_path / "pipe") == "hunyuan-i2v"
    lone = type(pipe.transformer)(**pipe.transformer.config)  # untagged: its image_condition_type says I2V
    assert detect_family(lone) == "hunyuan-i2v"
    t2v = build_tiny_pipeline("hunyuan").transformer
    assert detect_family(type(t2v)(**t2v.config)) == "hunyuan"
    with pytest.raises(ValueError, match="one prompt per image"):
        get_adapter("hunyuan-i2v").encode_prompts_with_images(pipe, ["a", "b"], random_frames(1))


def test_prepare_reads_each_caption_and_first_frame_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """data prepare's text cache keys HunyuanVideo-I2V's text by caption and first frame: a source's clips of every
    length (same caption, same first frame) cost one Llava encoding; another frame or caption is encoded anew."""
    from radial_lora.data.prepare import _Encoder

    pipe = build_tiny_pipeline("hunyuan-i2v")
    adapter = get_adapter("hunyuan-i2v")
    calls = []
    original = adapter.encode_prompts_with_images

    def counted(p, prompts, frames):
        calls.append(prompts)
        return original(p, prompts, frames)

    monkeypatch.setattr(adapter, "encode_prompts_with_images", counted)
    encoder = _Encoder(adapter, pipe, torch.device("cpu"))
    a, b = random_frames(2)
    clips = [np.stack([a] * 9), np.stack([b] * 9)]
    first, _ = encoder.conditions(clips, ["x", "x"], 9)
    again, _ = encoder.conditions([np.stack([a] * 17), np.stack([b] * 17)], ["x", "x"], 17)
    assert calls == [["x", "x"]]  # both clips at 9 frames in one call, nothing at 17
    assert all(torch.equal(u["encoder_hidden_states"], v["encoder_hidden_states"]) for u, v in zip(first, again))
    assert not torch.equal(first[0]["encoder_hidden_states"], first[1]["encoder_hidden_states"])
    encoder.conditions([np.stack([a] * 9)], ["y"], 9)
    assert calls[-1] == ["y"]
