"""`radial-lora score` (radial_lora.eval.long_video): motion over time and the frozen / looping / degrading flags
on made-up videos of each failure and of living clips, written through PyAV and read back as a player would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import video_cases as vc
from radial_lora.cli import main
from radial_lora.data.sample import render_clip, sample_specs
from radial_lora.data.video_io import write_video
from radial_lora.eval.long_video import STILL, score_file, score_frames, score_paths

PER_SECOND = vc.FPS / vc.SIDE  # px/frame on a 64-px frame -> short sides per second

# name, video, frozen, looping, degrading
CASES: list[tuple[str, Callable[[], np.ndarray], bool, bool, bool]] = [
    ("object", lambda: vc.moving_object(), False, False, False),
    ("camera pan", lambda: vc.pan(), False, False, False),
    ("slow drift", lambda: vc.pan(speed=0.06), False, False, False),
    ("object with sensor noise", lambda: vc.add_noise(vc.moving_object(), 8.0), False, False, False),
    ("slow drift with sensor noise", lambda: vc.add_noise(vc.pan(speed=0.12), 8.0), False, False, False),
    ("object under flicker", lambda: vc.flicker(vc.moving_object()), False, False, False),
    ("ball bounces once, others move on", vc.bounce_once_among_movers, False, False, False),
    (
        "sample clip (drifting shape)",
        lambda: render_clip(sample_specs(1, seed=300)[0], 65, 32, 16.0),
        False,
        False,
        False,
    ),
    ("still picture with noise", lambda: vc.still_with_noise(8.0), True, False, False),
    ("still picture under flicker", lambda: vc.flicker(vc.still_with_noise(3.0)), True, False, False),
    ("motion stops at 40%", lambda: vc.freeze_from(vc.moving_object(), 0.4), True, False, False),
    ("pan stops at 60%, noisy", lambda: vc.add_noise(vc.freeze_from(vc.pan(), 0.6), 6.0), True, False, False),
    ("pan repeats every 20 frames", lambda: vc.repeat(vc.pan(), 20), False, True, False),
    ("pan back and forth", lambda: vc.back_and_forth(vc.pan(), 17), False, True, False),
    ("object back and forth, once", lambda: vc.back_and_forth(vc.moving_object(1.5), 33), False, True, False),
    (
        "scene repeats, noisy",
        lambda: vc.add_noise(vc.repeat(vc.bounce_once_among_movers(), 30), 5.0),
        False,
        True,
        False,
    ),
    ("fades", lambda: vc.fade(vc.moving_object()), False, False, True),
    ("blurs", lambda: vc.blur_over_time(vc.moving_object()), False, False, True),
    ("loses its colour", lambda: vc.desaturate(vc.moving_object()), False, False, True),
]


@pytest.fixture(scope="module")
def case_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case as a lossless H.264 mp4 (what a generator writes), plus the object at crf 35."""
    root = tmp_path_factory.mktemp("score_cases")
    out = {}
    for i, (name, make, *_flags) in enumerate(CASES):
        out[name] = write_video(root / f"{i:02d}.mp4", make(), vc.FPS, reproducible=True)
    out["compressed"] = write_video(root / "compressed.mp4", vc.moving_object(), vc.FPS, crf=35)
    out["compressed pan"] = write_video(root / "compressed_pan.mp4", vc.pan(1.0), vc.FPS, crf=35)
    out["compressed still"] = write_video(root / "compressed_still.mp4", vc.still_with_noise(6.0), vc.FPS, crf=35)
    return out


@pytest.mark.parametrize("name,frozen,looping,degrading", [(c[0], *c[2:]) for c in CASES])
def test_flags_on_made_up_videos(case_files: dict[str, Path], name: str, frozen: bool, looping: bool, degrading: bool):
    s = score_file(case_files[name])
    assert (s.frozen, s.looping, s.degrading) == (frozen, looping, degrading), s.to_dict()
    if not frozen:
        assert min(s.motion_quarters) > STILL, s.motion_quarters


def test_compression_is_no_failure(case_files: dict[str, Path]) -> None:
    """Heavy H.264 compression (crf 35) moves nothing, stops nothing and fades nothing."""
    moving, still = score_file(case_files["compressed"]), score_file(case_files["compressed still"])
    panning = score_file(case_files["compressed pan"])
    for s in (moving, panning):
        assert (s.frozen, s.looping, s.degrading) == (False, False, False), s.to_dict()
    assert (still.frozen, still.looping, still.degrading) == (True, False, False)
    assert panning.motion == pytest.approx(1.0 * PER_SECOND, rel=0.2)


@pytest.mark.parametrize("speed", [0.12, 0.5, 1.5])
def test_motion_is_the_speed_of_a_pan(speed: float) -> None:
    """A pan of known speed reads as that speed (short sides per second), the same in every quarter."""
    s = score_frames(vc.pan(speed=speed), vc.FPS)
    assert s.motion == pytest.approx(speed * PER_SECOND, rel=0.2)
    assert max(s.motion_quarters) / min(s.motion_quarters) < 1.3


def test_motion_is_the_same_at_any_resolution_and_noise_does_not_move() -> None:
    small, big = score_frames(vc.pan(0.5, side=64), vc.FPS), score_frames(vc.pan(1.0, side=128), vc.FPS)
    assert big.motion == pytest.approx(small.motion, rel=0.15)  # 1 px/frame at 128 px = 0.5 at 64
    assert score_frames(vc.still_with_noise(8.0), vc.FPS).motion < STILL


def test_motion_that_dies_shows_per_quarter() -> None:
    s = score_frames(vc.freeze_from(vc.pan(), 0.5), vc.FPS)
    q = s.motion_quarters
    assert q[0] > 10 * STILL and q[3] < STILL and s.motion_decay is not None and s.motion_decay < 0.1


def test_reference_ratio_and_json(case_files: dict[str, Path], tmp_path: Path, capsys) -> None:
    refs, gen = tmp_path / "refs", tmp_path / "gen"
    refs.mkdir()
    gen.mkdir()
    for i, speed in enumerate((1.0, 1.1)):
        write_video(refs / f"real_{i}.mp4", vc.pan(speed, seed=10 + i), vc.FPS, reproducible=True)
    write_video(refs / "short.mp4", vc.pan(0.2, frames=33), vc.FPS, reproducible=True)  # another length
    write_video(gen / "half.mp4", vc.pan(0.5, seed=20), vc.FPS, reproducible=True)
    write_video(gen / "same.mp4", vc.pan(1.05, seed=21), vc.FPS, reproducible=True)
    assert main(["score", str(gen), "--reference", str(refs), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ratios = {Path(v["path"]).name: v["motion_ratio"] for v in doc["videos"]}
    assert ratios["half.mp4"] == pytest.approx(0.5, abs=0.1) and ratios["same.mp4"] == pytest.approx(1.0, abs=0.12)
    assert doc["errors"] == [] and doc["reference"]["clips"] == 3
    assert set(doc["reference"]["motion_by_frames"]) == {"33", "65"}  # same-length clips only per video
    for v in doc["videos"]:
        assert {"frozen", "looping", "degrading", "motion", "motion_quarters", "still_share", "loop_share"} <= set(v)


def test_unreadable_file_is_one_line_and_the_rest_are_scored(case_files: dict[str, Path], tmp_path: Path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    good = case_files["object"]
    assert main(["score", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "broken.mp4" in line]
    assert len(lines) == 1 and lines[0].startswith("radial-lora score: cannot score ")
    assert str(good) in captured.out and "| frozen |" in captured.out.replace("frozen | looping", "frozen |")
    run = score_paths([bad, good])
    assert [e["path"] for e in run.errors] == [str(bad)] and [v["path"] for v in run.videos] == [str(good)]


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert main(["score", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4: no such file or folder" in capsys.readouterr().err
    assert main(["score", str(tmp_path)]) == 2
    assert "a folder with no video files" in capsys.readouterr().err
