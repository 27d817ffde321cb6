"""PyAV reader/writer: real files in several containers, partial reads, clear errors, atomic writes."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from radial_lora.data.video_io import (
    VideoReadError,
    iter_frames,
    iter_timed_frames,
    probe_video,
    read_video,
    write_video,
)


def _gradient_clip(frames: int = 12, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth content that H.264 at low crf reproduces closely, with a per-frame brightness ramp."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], axis=-1)
    clip = np.stack([np.clip(base + 8 * t, 0, 255) for t in range(frames)])
    return clip.astype(np.uint8)


@pytest.mark.parametrize(
    "ext, codec_name, tolerance",
    [("mp4", "h264", 3.0), ("mkv", "h264", 3.0), ("mov", "h264", 3.0), ("webm", "vp9", 4.0), ("gif", "gif", 20.0)],
)
def test_roundtrip_formats(tmp_path, ext: str, codec_name: str, tolerance: float) -> None:
    clip = _gradient_clip()
    path = write_video(tmp_path / f"clip.{ext}", clip, fps=10)
    info = probe_video(path)
    assert info.codec == codec_name
    assert (info.height, info.width) == (32, 48)
    frames, fps = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == clip.shape
    assert fps == pytest.approx(10.0)
    assert np.abs(frames.astype(float) - clip).mean() < tolerance
    # frames stay in order: the brightness ramp is monotone
    means = frames.reshape(len(frames), -1).mean(axis=1)
    assert np.all(np.diff(means) > 0)
    # nothing but the final file is left in the folder (the temp file was renamed)
    assert [p.name for p in tmp_path.iterdir()] == [f"clip.{ext}"]


def test_mp4_is_h264_yuv420p(tmp_path) -> None:
    path = write_video(tmp_path / "a.mp4", _gradient_clip(4), fps=16)
    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        assert (ctx.name, ctx.pix_fmt) == ("h264", "yuv420p")
        assert float(container.streams.video[0].average_rate) == 16.0


def test_odd_size_is_padded_or_refused(tmp_path) -> None:
    clip = _gradient_clip(3, h=31, w=45)
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", clip, fps=8))
    assert frames.shape == (3, 32, 46, 3)
    # the replicated edge row equals the last real row (up to codec noise)
    assert np.abs(frames[:, 31].astype(int) - frames[:, 30]).mean() < 4
    with pytest.raises(ValueError, match="even width and height"):
        write_video(tmp_path / "odd2.mp4", clip, fps=8, odd_size="error")
    assert not (tmp_path / "odd2.mp4").exists()


def test_partial_read_and_streaming(tmp_path) -> None:
    clip = _gradient_clip(10)
    path = write_video(tmp_path / "p.mp4", clip, fps=10, crf=0)
    full, _ = read_video(path)
    part, _ = read_video(path, start_frame=3, max_frames=4)
    assert part.shape[0] == 4
    np.testing.assert_array_equal(part, full[3:7])
    assert sum(1 for _ in iter_frames(path, max_frames=2)) == 2


def test_bad_inputs_name_the_file(tmp_path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video at all" * 50)
    with pytest.raises(VideoReadError, match="junk.mp4"):
        read_video(junk)
    real = write_video(tmp_path / "real.mp4", _gradient_clip(8), fps=10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    with pytest.raises(VideoReadError, match="truncated.mp4"):
        read_video(truncated)
    with pytest.raises(VideoReadError, match="missing.mp4"):
        probe_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoReadError, match="no decodable frames"):
        read_video(real, start_frame=100)


def test_write_rejects_bad_arrays(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(tmp_path / "f.mp4", np.zeros((8, 8, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.uint8), fps=0)
    assert list(tmp_path.iterdir()) == []


def _write_with(path: Path, frames: np.ndarray, *, rotation: int = 0, sar: Fraction | None = None) -> Path:
    """An H.264 file as a phone (display-matrix rotation) or a DVD/anamorphic camera (sample aspect ratio)
    writes it: the coded frames are the stored ones, the metadata says how to show them."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16, options={"qp": "0"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        if sar is not None:
            s.codec_context.sample_aspect_ratio = sar
        if rotation:
            s.set_display_rotation(rotation)
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv444p")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


def _marked(frames: int = 3, h: int = 16, w: int = 32) -> np.ndarray:
    """Landscape frames, white in the top-left quarter: where it lands says how the frame was turned."""
    x = np.zeros((frames, h, w, 3), np.uint8)
    x[:, : h // 2, : w // 2] = 255
    return x


def test_phone_rotation_is_applied_as_players_do(tmp_path: Path) -> None:
    # A phone held upright stores landscape frames and a display matrix of -90 degrees (shown turned clockwise).
    stored = _marked()
    video = _write_with(tmp_path / "phone.mp4", stored, rotation=-90)
    frames, _ = read_video(video)
    assert frames.shape == (3, 32, 16, 3)  # portrait, as shown
    want = np.rot90(stored, -1, axes=(1, 2))  # clockwise: the top-left quarter goes to the top right
    assert np.abs(frames.astype(int) - want).max() <= 2 and frames[0, 0, -1, 0] > 200 and frames[0, 0, 0, 0] < 50
    timed = [f for _, f in iter_timed_frames(video)]
    assert timed[0].shape == (32, 16, 3) and np.array_equal(timed[0], frames[0])
    upside = read_video(_write_with(tmp_path / "flip.mp4", stored, rotation=180))[0]
    assert np.abs(upside.astype(int) - stored[:, ::-1, ::-1]).max() <= 2


def test_non_square_pixels_are_shown_in_display_space(tmp_path: Path) -> None:
    stored = _marked(h=16, w=16)
    wide = read_video(_write_with(tmp_path / "anamorphic.mp4", stored, sar=Fraction(2, 1)))[0]
    assert wide.shape == (3, 16, 32, 3)  # 2:1 pixels: twice as wide as stored, as a player shows it
    assert wide[0, 4, 4, 0] > 200 and wide[0, 4, 12, 0] > 200 and wide[0, 4, 20, 0] < 50
    tall = read_video(_write_with(tmp_path / "tall.mp4", stored, sar=Fraction(1, 2)))[0]
    assert tall.shape == (3, 32, 16, 3)
    dvd = read_video(_write_with(tmp_path / "dvd.mp4", _marked(h=48, w=72), sar=Fraction(32, 27)))[0]
    assert dvd.shape[1:3] == (48, 85)  # 72 x 32/27 = 85.3


def test_cover_art_stream_is_not_the_video(tmp_path: Path) -> None:
    path = tmp_path / "with_cover.mkv"
    with av.open(str(path), "w") as c:  # stream 0: a one-frame still (cover art), stream 1: the video
        art = c.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 16, 16, "yuvj420p"
        video = c.add_stream("libx264", rate=16, options={"qp": "0"})
        video.width, video.height, video.pix_fmt = 32, 16, "yuv444p"
        still = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24").reformat(
            format="yuvj420p"
        )
        still.pts = 0
        c.mux(art.encode(still))
        c.mux(art.encode(None))
        for i, img in enumerate(_marked(frames=6)):
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv444p")
            f.pts = i
            c.mux(video.encode(f))
        c.mux(video.encode(None))
    frames, fps = read_video(path)
    assert frames.shape == (6, 16, 32, 3) and fps == 16.0
    info = probe_video(path)
    assert (info.width, info.height, info.codec) == (32, 16, "h264")
