"""The tiny base's sample scorer (``radial_lora.eval.shape_score``, used by ``scripts/pretrain_tiny_base.py``),
which the model card's numbers rest on: the rendered truth must score perfectly, and wrong shapes, colours
and motion must not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from radial_lora.data.sample import ClipSpec, render_clip, sample_specs
from radial_lora.eval import shape_score

FRAMES, SIZE, FPS = 17, 32, 16.0  # the tiny base's clips (scripts/pretrain_tiny_base.py)


def test_rendered_truth_scores_perfectly() -> None:
    specs = sample_specs(120, seed=300)
    rows = [shape_score.score_clip(render_clip(s, FRAMES, SIZE, FPS), s) for s in specs]
    summary = shape_score.summarise(rows)
    assert {k: summary[k] for k in ("colour", "direction", "speed", "shape", "all")} == dict.fromkeys(
        ("colour", "direction", "speed", "shape", "all"), 1.0
    )
    assert summary["shape_iou"] > 0.99 and summary["colour_err"] == 0.0


@pytest.mark.parametrize("drawn", ["circle", "square", "triangle"])
def test_each_wrong_shape_colour_and_direction_is_caught(drawn: str) -> None:
    caption = ClipSpec(shape="square", colour="red", direction="right", speed=0.9, start_x=0.3, radius=0.26)
    clip = render_clip(replace(caption, shape=drawn), FRAMES, SIZE, FPS)
    out = shape_score.score_clip(clip, caption)
    assert out["shape_pred"] == drawn and out["shape"] == (drawn == "square")
    assert out["colour"] and out["direction"] and out["speed"]
    wrong = shape_score.score_clip(
        render_clip(replace(caption, colour="blue", direction="up"), FRAMES, SIZE, FPS), caption
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
