"""The sample scorer (``radial_lora.eval.shape_score``) that the demo's, the evaluate grid's and the tiny base's
model card's sample scores rest on: the rendered truth must score perfectly at 17 and at 65 frames (the demo's
1x and 4x), and wrong shapes, colours and motion must not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from radial_lora.data.sample import ClipSpec, render_clip, sample_specs
from radial_lora.eval import shape_score

FRAMES, SIZE, FPS = 17, 32, 16.0  # the tiny base's clips (scripts/pretrain_tiny_base.py)
LONG = 65  # the demo's 4x


@pytest.mark.parametrize("frames", [FRAMES, LONG])
def test_rendered_truth_scores_perfectly(frames: int) -> None:
    specs = sample_specs(120, seed=300)
    rows = [shape_score.score_clip(render_clip(s, frames, SIZE, FPS), s) for s in specs]
    summary = shape_score.summarise(rows)
    assert {k: summary[k] for k in ("colour", "direction", "speed", "shape", "all")} == dict.fromkeys(
        ("colour", "direction", "speed", "shape", "all"), 1.0
    )
    assert summary["shape_iou"] > 0.99 and summary["colour_err"] == 0.0


@pytest.mark.parametrize("frames", [FRAMES, LONG])
@pytest.mark.parametrize("drawn", ["circle", "square", "triangle"])
def test_each_wrong_shape_colour_and_direction_is_caught(drawn: str, frames: int) -> None:
    caption = ClipSpec(shape="square", colour="red", direction="right", speed=0.9, start_x=0.3, radius=0.26)
    clip = render_clip(replace(caption, shape=drawn), frames, SIZE, FPS)
    out = shape_score.score_clip(clip, caption)
    assert out["shape_pred"] == drawn and out["shape"] == (drawn == "square")
    assert out["colour"] and out["direction"] and out["speed"]
    wrong = shape_score.score_clip(
        render_clip(replace(caption, colour="blue", direction="up"), frames, SIZE, FPS), caption
    )
    assert wrong["colour_pred"] == "blue" and not wrong["colour"]
    assert wrong["direction_pred"] == "up" and not wrong["direction"]


def test_static_slow_and_empty_clips_fail() -> None:
    caption = ClipSpec(shape="circle", colour="green", direction="left", speed=0.9, start_x=0.6, radius=0.25)
    still = shape_score.score_clip(render_clip(replace(caption, speed=0.0), FRAMES, SIZE, FPS), caption)
    assert still["direction_pred"] == "static" and not still["direction"] and still["shape"]
    slow = shape_score.score_clip(render_clip(replace(caption, speed=0.4), FRAMES, SIZE, FPS), caption)
    assert slow["direction"] and not slow["speed"]
    empty = np.full((FRAMES, SIZE, SIZE, 3), 10, dtype=np.uint8)
    blank = shape_score.score_clip(empty, caption)
    assert blank["direction_pred"] == "none" and not any(blank[k] for k in ("colour", "direction", "shape"))


def test_captions_parse_back_and_prompts_are_scored_only_when_all_are_sample_captions() -> None:
    from radial_lora.data.sample import caption_for, spec_from_caption

    specs = sample_specs(60, seed=7)
    for spec in specs:
        for text in (caption_for(spec), caption_for(spec, LONG, FPS), caption_for(spec, FRAMES, FPS).upper()):
            parsed = spec_from_caption(text)
            assert parsed is not None and caption_for(parsed) == caption_for(spec)
    assert spec_from_caption("a red car drives up a mountain road") is None
    assert spec_from_caption("a red circle on a black background moves sideways slowly") is None

    clips = [render_clip(s, LONG, SIZE, FPS) for s in specs[:4]]
    prompts = [caption_for(s, LONG, FPS) for s in specs[:4]]
    scored = shape_score.score_prompts(clips, prompts, FPS)
    assert scored is not None and scored["n"] == 4 and scored["all"] == 1.0 and len(scored["per_prompt"]) == 4
    # A clip scored against another clip's caption is caught (the specs differ in colour, shape or direction).
    swapped = shape_score.score_prompts(clips[::-1], prompts, FPS)
    assert swapped is not None and swapped["all"] < 1.0
    assert shape_score.score_prompts(clips, [*prompts[:3], "a cat"], FPS) is None
