"""Synthetic bouncing-shape videos: the motion drawn is the motion the spec and caption claim."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from radial_lora.data.sample import (
    BACKGROUNDS,
    CAPTION_VOCABULARY,
    PALETTE,
    ClipSpec,
    caption_for,
    count_bounces,
    render_clip,
    sample_specs,
    trajectory,
    write_sample_dataset,
)
from radial_lora.data.video_io import read_video


def _centroids(clip: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured centre (x, y) and pixel area of the shape in every frame."""
    mask = np.all(clip == np.asarray(PALETTE[colour], np.uint8), axis=-1)
    area = mask.sum(axis=(1, 2))
    ys, xs = np.arange(clip.shape[1]) + 0.5, np.arange(clip.shape[2]) + 0.5
    cx = (mask.sum(axis=1) * xs).sum(axis=1) / area
    cy = (mask.sum(axis=2) * ys).sum(axis=1) / area
    return cx, cy, area


def test_render_draws_the_trajectory() -> None:
    spec = ClipSpec(shape="circle", colour="red", direction="right", speed=0.9, start_x=0.2, start_y=0.5)
    clip = render_clip(spec, 33, (48, 80), fps=16)
    assert clip.shape == (33, 48, 80, 3) and clip.dtype == np.uint8
    cx, cy, area = _centroids(clip, "red")
    tx, ty = trajectory(spec, 33, (48, 80), fps=16)
    np.testing.assert_allclose(cx, tx, atol=0.3)
    np.testing.assert_allclose(cy, ty, atol=0.3)
    r = 0.15 * 48
    np.testing.assert_allclose(area, math.pi * r * r, rtol=0.08)
    # the background is exactly the background colour everywhere else
    assert np.all(clip[0, 0, 0] == BACKGROUNDS["black"])
    # it starts moving right, reaches the right wall (centre at width - r) and comes back
    assert cx[1] > cx[0] and cx.max() == pytest.approx(80 - r, abs=1.0) and cx[-1] < cx.max()
    assert count_bounces(spec, 33, 16) == 1


@pytest.mark.parametrize("direction, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_directions(direction: str, axis: int, sign: int) -> None:
    spec = ClipSpec(shape="square", colour="blue", direction=direction, start_x=0.5, start_y=0.5)
    centres = _centroids(render_clip(spec, 5, 64, fps=16), "blue")
    moving, still = centres[axis], centres[1 - axis]
    assert np.all(np.sign(np.diff(moving)) == sign)
    assert np.ptp(still) < 1e-6


def test_shapes_have_their_areas() -> None:
    areas = {}
    for shape in ("circle", "square", "triangle"):
        spec = ClipSpec(shape=shape, colour="green", speed=0.0, radius=0.25)
        areas[shape] = _centroids(render_clip(spec, 1, 128, fps=8), "green")[2][0]
    r = 0.25 * 128
    assert areas["circle"] == pytest.approx(math.pi * r * r, rel=0.03)
    assert areas["square"] == pytest.approx((1.7 * r) ** 2, rel=0.03)
    assert areas["triangle"] == pytest.approx(2 * r * r, rel=0.03)


def test_captions_are_honest_and_in_vocabulary() -> None:
    specs = sample_specs(40, seed=3)
    assert specs == sample_specs(40, seed=3) and specs != sample_specs(40, seed=4)
    for spec in specs:
        for frames in (17, 81):
            text = caption_for(spec, frames, 16)
            assert set(text.split()) <= set(CAPTION_VOCABULARY), text
            assert f"a {spec.colour} {spec.shape}" in text and f"moves {spec.direction}" in text
            # "bounces" iff the drawn centre reverses direction within the clip
            axis = 0 if spec.direction in ("left", "right") else 1
            centres = _centroids(render_clip(spec, frames, 64, 16), spec.colour)[axis]
            steps = np.diff(centres)
            steps = steps[np.abs(steps) > 1e-6]
            reverses = bool(np.any(np.sign(steps[1:]) != np.sign(steps[:-1])))
            assert ("bounces" in text) == reverses, (text, centres)
    assert "bounces" not in caption_for(specs[0])
    # short clips of slow specs do not bounce, long clips of every spec do: captions differ by length
    assert any("bounces" not in caption_for(s, 17, 16) for s in specs)
    assert all("bounces" in caption_for(s, 81, 16) for s in specs)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="colour='pink'"):
        ClipSpec(colour="pink")
    with pytest.raises(ValueError, match="direction"):
        ClipSpec(direction="sideways")
    with pytest.raises(ValueError, match="start"):
        ClipSpec(start_x=1.5)
    with pytest.raises(ValueError, match="fps"):
        caption_for(ClipSpec(), 17)


def test_write_sample_dataset(tmp_path) -> None:
    out = write_sample_dataset(tmp_path / "sample", num_videos=3, num_frames=21, size=(32, 48), fps=8, seed=1)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == ["sample_0000.mp4", "sample_0001.mp4", "sample_0002.mp4"]
    for row, spec in zip(rows, sample_specs(3, seed=1)):
        assert (out / row["video"].replace(".mp4", ".txt")).read_text().strip() == row["caption"]
        assert row["caption"] == caption_for(spec, 21, 8) and ClipSpec(**row["spec"]) == spec
        frames, fps = read_video(out / row["video"])
        assert frames.shape == (21, 32, 48, 3) and fps == 8
        # H.264 keeps the drawing: mean error small against the pure render
        assert np.abs(frames.astype(float) - render_clip(spec, 21, (32, 48), 8)).mean() < 4


def test_sample_command(tmp_path, capsys) -> None:
    from radial_lora.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "sample",
                "--out",
                str(out),
                "--num-videos",
                "2",
                "--frames",
                "9",
                "--size",
                "32x48",
                "--fps",
                "8",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.jsonl",
        "sample_0000.mp4",
        "sample_0000.txt",
        "sample_0001.mp4",
        "sample_0001.txt",
    ]
    assert read_video(out / "sample_0001.mp4")[0].shape == (9, 32, 48, 3)
    assert (out / "sample_0000.txt").read_text().strip() == caption_for(sample_specs(2, 7)[0], 9, 8)
    with pytest.raises(SystemExit) as exc:  # argparse rejects the size before anything runs
        main(["data", "sample", "--out", str(out), "--size", "big"])
    assert exc.value.code == 2 and "HEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["data", "sample", "--out", str(out), "--frames", "0"]) == 2


@pytest.mark.slow
def test_sample_videos_are_reproducible(tmp_path) -> None:
    """Test fixtures and the demo's data are these files: the same call gives the same bytes, and decodes to
    the same frames, in any process. Separate processes (with torch and diffusers loaded, as in the tests),
    since what varied before was the encoder's use of stale memory: lossy x264 at 32x32 changed its P/B-frame
    decisions in about one run in six even after timestamps and explicit conversion were fixed."""
    import hashlib
    import subprocess
    import sys

    script = (
        "import sys, torch, diffusers; from radial_lora.data.sample import write_sample_dataset; "
        "write_sample_dataset(sys.argv[1], num_videos=8, num_frames=36, size=32, fps=16, seed=0)"
    )
    files, frames = [], []
    for run in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], check=True, capture_output=True)
        videos = sorted((tmp_path / run).glob("*.mp4"))
        files.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / run).iterdir()})
        frames.append([read_video(p)[0] for p in videos])
    assert len(files[0]) == 17 and files[0] == files[1] == files[2]
    assert all(np.array_equal(x, y) for x, y in zip(frames[0], frames[2]))
    # Lossless: a reader decodes exactly the render as yuv420p holds it (converted there and back here).
    import av

    for video, spec in zip(frames[0], sample_specs(8, seed=0)):
        held = [
            av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
            for f in render_clip(spec, 36, (32, 32), 16.0)
        ]
        assert np.array_equal(video, np.stack(held))
