"""Tiny pipelines: real diffusers classes, local tokenizers, save/load round trip, fast calls."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, HunyuanVideoPipeline, WanPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from radial_lora.models.tiny import build_tiny_pipeline, build_tokenizer, caption_vocabulary, save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTION = "a red circle moves right and bounces off the wall"


def _call(pipe, frames: int = 9):
    return pipe(
        CAPTION,
        num_frames=frames,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_vocabulary_covers_captions_and_unknown_words_are_unk():
    tok = build_tokenizer("umt5")
    ids = tok(CAPTION + " xylophone")["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words == CAPTION.split() + ["<unk>", "</s>"]
    assert "xylophone" in caption_vocabulary(["A Xylophone!"])


def test_hunyuan_template_crop_leaves_exactly_the_caption():
    tok = build_tokenizer("llama")
    ids = tok(DEFAULT_PROMPT_TEMPLATE["template"].format(CAPTION))["input_ids"]
    cropped = tok.convert_ids_to_tokens(ids[DEFAULT_PROMPT_TEMPLATE["crop_start"] :])
    assert cropped == CAPTION.split() + ["<|eot_id|>"]


def test_clip_pools_at_the_end_token():
    pipe = build_tiny_pipeline("hunyuan")
    enc = pipe.tokenizer_2([CAPTION], padding="max_length", max_length=77, return_tensors="pt")
    end = int(enc.attention_mask.sum()) - 1
    out = pipe.text_encoder_2(enc.input_ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, end])


@pytest.mark.parametrize(
    "family, cls, fixture",
    [
        ("wan", WanPipeline, "tiny_wan_dir"),
        ("wan22", WanPipeline, "tiny_wan22_dir"),
        ("hunyuan", HunyuanVideoPipeline, "tiny_hunyuan_dir"),
    ],
)
def test_saved_pipeline_loads_with_stock_from_pretrained_and_matches(family, cls, fixture, request):
    path = request.getfixturevalue(fixture)
    loaded = DiffusionPipeline.from_pretrained(path)
    assert type(loaded) is cls
    if family == "wan22":
        assert loaded.transformer_2 is not None and loaded.config.boundary_ratio == 0.875
        assert not torch.equal(loaded.transformer.proj_out.weight, loaded.transformer_2.proj_out.weight)
    loaded.set_progress_bar_config(disable=True)
    frames = _call(loaded)
    assert frames.shape == (1, 9, 3, 32, 32) and torch.isfinite(frames).all()
    torch.testing.assert_close(frames, _call(build_tiny_pipeline(family)), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in loaded.transformer.parameters()) < 200_000


def test_overrides_change_the_transformer_and_bad_input_is_named(tmp_path):
    pipe = build_tiny_pipeline("wan", num_layers=3)
    assert len(pipe.transformer.blocks) == 3
    with pytest.raises(ValueError, match="num_blocks"):
        build_tiny_pipeline("wan", num_blocks=3)
    with pytest.raises(ValueError, match="flux"):
        build_tiny_pipeline("flux")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        save_tiny_pipeline("wan", tmp_path / "x")
