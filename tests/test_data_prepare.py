"""`data prepare` end to end with the tiny Wan pipeline: real video files in, cached latents out."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from radial_lora.cli import main
from radial_lora.data import prepare as prepare_module
from radial_lora.data.dataset import PreparedDataset
from radial_lora.data.prepare import (
    PrepareOptions,
    clip_id,
    clip_starts,
    collect_inputs,
    load_resampled,
    prepare_dataset,
)
from radial_lora.data.sample import render_clip, sample_specs, write_sample_dataset
from radial_lora.data.validate import validate_dataset
from radial_lora.data.video_io import read_video, resize_center_crop, write_video
from radial_lora.files import sha256_file
from radial_lora.models.registry import get_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 shared cores: OpenMP spinning, 5-40x slower

H, W = 32, 48
ARGS = [
    "--family",
    "wan",
    "--lengths",
    "9,17",
    "--height",
    str(H),
    "--width",
    str(W),
    "--fps",
    "16",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--batch-size",
    "2",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Three sample videos (24 fps, 48x64) plus a gif, a webm and four bad inputs, folder format."""
    root = tmp_path_factory.mktemp("sources")
    write_sample_dataset(root, num_videos=3, num_frames=30, size=(48, 64), fps=24, seed=5)
    for name, ext, spec in (("anim", "gif", 0), ("clip", "webm", 1)):
        write_video(root / f"{name}.{ext}", render_clip(sample_specs(2, 9)[spec], 20, (40, 60), 16), 16)
        (root / f"{name}.txt").write_text(f"a shape in a {ext} file\n")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (root / "corrupt.txt").write_text("a red circle")
    write_video(root / "short.mp4", render_clip(sample_specs(1, 0)[0], 6, 32, 16), 16)
    (root / "short.txt").write_text("a short video")
    write_video(root / "nocaption.mp4", render_clip(sample_specs(1, 0)[0], 20, 32, 16), 16)
    write_video(root / "emptycaption.mp4", render_clip(sample_specs(1, 0)[0], 20, 32, 16), 16)
    (root / "emptycaption.txt").write_text("  \n")
    return root


@pytest.fixture
def counting(monkeypatch) -> dict[str, int]:
    """Count the adapter's encode calls (clips and captions) made by prepare."""
    adapter = get_adapter("wan")
    calls = {"videos": 0, "clips": 0, "prompts": 0}
    enc_v, enc_p = adapter.encode_videos, adapter.encode_prompts

    def videos(pipe, x):
        calls["videos"] += 1
        calls["clips"] += x.shape[0]
        return enc_v(pipe, x)

    def prompts(pipe, texts):
        calls["prompts"] += len(texts)
        return enc_p(pipe, texts)

    monkeypatch.setattr(adapter, "encode_videos", videos)
    monkeypatch.setattr(adapter, "encode_prompts", prompts)
    return calls


def test_prepare_folder_skips_bad_input_and_resumes(
    sources, tiny_wan_dir, tmp_path, counting, capsys, monkeypatch
) -> None:
    out = tmp_path / "ds"
    code = main(["data", "prepare", str(sources), "--out", str(out), "--model", str(tiny_wan_dir), *ARGS])
    printed = capsys.readouterr().out
    assert code == 3, printed  # something was skipped
    for name, why in (
        ("corrupt.mp4", "unreadable"),
        ("short.mp4", "too short: 6 frames"),
        ("nocaption.mp4", "missing caption"),
        ("emptycaption.mp4", "missing caption"),
    ):
        assert f"skipped {name}: {why}" in printed
    assert "skipped 4" in printed

    ds = PreparedDataset(out)
    assert ds.info["lengths"] == [9, 17] and ds.info["num_clips"] == {"9": 5, "17": 5}
    assert {r.source for r in ds.records} == {
        "sample_0000.mp4",
        "sample_0001.mp4",
        "sample_0002.mp4",
        "anim.gif",
        "clip.webm",
    }
    assert counting["clips"] == 10 and counting["videos"] == 6  # 5 clips per bucket in batches of 2
    assert counting["prompts"] == 6  # one text encode per unique caption (5), not per clip, and the empty caption
    assert (out / "null_text.safetensors").is_file()
    adapter = get_adapter("wan")
    pipe = DiffusionPipeline.from_pretrained(tiny_wan_dir, torch_dtype=torch.float32)
    record = next(r for r in ds.buckets[17] if r.source == "sample_0001.mp4")
    tensors = ds.load(record, verify=True)
    assert record.latent_shape == (4, 5, 4, 6) and tensors["latents"].dtype == torch.float32
    assert record.caption == (sources / "sample_0001.txt").read_text().strip()
    # parity: the cached tensors are what the adapter computes for the same preprocessed clip and caption
    frames, source_fps = load_resampled(sources / "sample_0001.mp4", H, W, 16.0)
    assert source_fps == 24 and len(frames) == 20  # 30 frames at 24 fps -> 20 at 16 fps
    clip = torch.from_numpy(frames[:17]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    torch.testing.assert_close(tensors["latents"], adapter.encode_videos(pipe, clip)[0], atol=1e-5, rtol=1e-5)
    text = adapter.encode_prompts(pipe, [record.caption])
    assert set(tensors) == {"latents", *text}
    for key, value in text.items():
        torch.testing.assert_close(tensors[key], value[0])
    # the latents decode back through the tiny VAE to the clip's pixel shape
    decoded = adapter.decode_latents(pipe, tensors["latents"][None])
    assert decoded.shape == (1, 3, 17, H, W) and torch.isfinite(decoded).all()
    assert validate_dataset(out).ok

    # second run: everything is there and matches its checksum -> nothing encoded, no file rewritten,
    # and only the videos that gave no clips (corrupt, too short) are decoded again
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "latents").rglob("*.safetensors")}
    counting.update(videos=0, clips=0, prompts=0)
    decoded: list[str] = []
    real_iter = prepare_module.iter_timed_frames
    monkeypatch.setattr(
        prepare_module, "iter_timed_frames", lambda p, **kw: (decoded.append(p.name), real_iter(p, **kw))[1]
    )
    assert main(["data", "prepare", str(sources), "--out", str(out), "--model", str(tiny_wan_dir), *ARGS]) == 3
    assert counting == {"videos": 0, "clips": 0, "prompts": 0}
    assert decoded == ["short.mp4"]  # corrupt.mp4 fails already when probed
    assert {p: p.stat().st_mtime_ns for p in (out / "latents").rglob("*.safetensors")} == mtimes
    assert "f17: 5 clips (0 encoded, 5 already prepared)" in capsys.readouterr().out

    # a damaged file and a deleted file are encoded again, nothing else
    damaged, deleted = ds.records[0], ds.records[1]
    before = ds.load(damaged)["latents"]
    (out / damaged.file).write_bytes(b"broken")
    (out / deleted.file).unlink()
    assert main(["data", "prepare", str(sources), "--out", str(out), "--model", str(tiny_wan_dir), *ARGS]) == 3
    assert counting["clips"] == 2
    again = PreparedDataset(out)
    assert len(again) == 10 and validate_dataset(out).ok
    redone = next(r for r in again.records if r.id == damaged.id)
    assert redone.sha256 == sha256_file(out / redone.file)
    torch.testing.assert_close(again.load(redone)["latents"], before, atol=1e-5, rtol=1e-5)


def test_interrupted_run_keeps_finished_clips(sources, tiny_wan_dir, tmp_path, monkeypatch, counting) -> None:
    out = tmp_path / "ds"
    adapter = get_adapter("wan")
    counted = adapter.encode_videos

    def dies_on_third(pipe, x):
        if counting["videos"] >= 2:
            raise KeyboardInterrupt
        return counted(pipe, x)

    monkeypatch.setattr(adapter, "encode_videos", dies_on_third)
    # Ctrl-C: one line and exit 130 (the CLI), the finished clips kept
    assert main(["data", "prepare", str(sources), "--out", str(out), "--model", str(tiny_wan_dir), *ARGS]) == 130
    finished = PreparedDataset(out).records
    assert len(finished) == 4  # two batches of two clips were written before the interruption
    with open(out / "manifest.jsonl", "a") as fh:  # and an append cut off mid-line
        fh.write('{"id": "sample_00')
    monkeypatch.setattr(adapter, "encode_videos", counted)
    counting.update(clips=0)
    assert main(["data", "prepare", str(sources), "--out", str(out), "--model", str(tiny_wan_dir), *ARGS]) == 3
    assert counting["clips"] == 6  # only the remaining clips
    assert len(PreparedDataset(out)) == 10 and validate_dataset(out).ok


def test_csv_and_jsonl_inputs(sources, tiny_wan_dir, tmp_path, capsys) -> None:
    videos = tmp_path / "data" / "videos"
    videos.mkdir(parents=True)
    for name in ("sample_0000.mp4", "sample_0001.mp4", "clip.webm"):
        shutil.copy(sources / name, videos / name)
    table = tmp_path / "data" / "train.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])  # Hugging Face imagefolder-style aliases
        writer.writerow(["videos/sample_0000.mp4", "a red circle, in a csv"])
        writer.writerow(["videos/clip.webm", "a webm clip"])
        writer.writerow(["videos/gone.mp4", "a file that is not there"])
        writer.writerow(["videos/sample_0001.mp4", ""])
    items, skips = collect_inputs(table)
    assert [i.source for i in items] == ["videos/sample_0000.mp4", "videos/clip.webm", "videos/gone.mp4"]
    assert [s.source for s in skips] == ["videos/sample_0001.mp4"] and "missing caption" in skips[0].reason
    out = tmp_path / "from_csv"
    args = [a for a in ARGS if a not in ("9,17",)]
    args[args.index("--lengths") + 1 : args.index("--lengths") + 1] = ["9"]
    assert main(["data", "prepare", str(table), "--out", str(out), "--model", str(tiny_wan_dir), *args]) == 3
    assert "skipped videos/gone.mp4: unreadable" in capsys.readouterr().out
    assert [r.caption for r in PreparedDataset(out).records] == ["a red circle, in a csv", "a webm clip"]

    jsonl = tmp_path / "data" / "meta.jsonl"
    rows = [{"clip": "videos/sample_0001.mp4", "desc": "a jsonl caption", "prompt": "not this one"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [i.caption for i in collect_inputs(jsonl, video_column="clip", caption_column="desc")[0]] == [
        "a jsonl caption"
    ]
    out2 = tmp_path / "from_jsonl"
    cmd = ["data", "prepare", str(jsonl), "--out", str(out2), "--model", str(tiny_wan_dir), *args]
    assert main([*cmd, "--video-column", "clip", "--caption-column", "desc"]) == 0
    assert PreparedDataset(out2).records[0].source == "videos/sample_0001.mp4"
    # a column that does not exist is a usage error naming the file and the columns
    assert main([*cmd, "--video-column", "clip", "--caption-column", "title"]) == 2
    assert "meta.jsonl: no caption column 'title'; columns are ['clip', 'desc', 'prompt']" in capsys.readouterr().err


def test_usage_errors(sources, tiny_wan_dir, tmp_path, capsys) -> None:
    base = ["data", "prepare", str(sources), "--out", str(tmp_path / "o"), "--model", str(tiny_wan_dir)]
    assert main([*base, "--family", "wan", "--lengths", "16", "--height", "32", "--width", "48"]) == 2
    assert "num_frames=16 is not of the form 4k+1" in capsys.readouterr().err
    assert main([*base, "--family", "wan", "--lengths", "17", "--height", "40", "--width", "48"]) == 2
    assert "height=40 must be a positive multiple of 16" in capsys.readouterr().err
    assert (
        main([*base[:2], str(tmp_path / "missing"), *base[3:], "--family", "wan", "--height", "32", "--width", "48"])
        == 2
    )
    assert "input not found" in capsys.readouterr().err
    assert main([*base, "--input", str(sources), "--family", "wan", "--height", "32", "--width", "48"]) == 2
    assert "give the input once" in capsys.readouterr().err


def test_resampling_cropping_and_clip_plans(tmp_path) -> None:
    # frame i has brightness 8 * i: which source frames were picked can be read back
    frames = np.stack([np.full((24, 40, 3), 8 * i, np.uint8) for i in range(30)])
    path = write_video(tmp_path / "ramp.mp4", frames, fps=30, crf=0)
    picked, fps = load_resampled(path, 16, 32, fps=12)
    assert fps == 30 and len(picked) == 12  # 30 frames at 30 fps = 1 s -> 12 frames at 12 fps
    index = np.round(picked[:, 8, 16, 0] / 8).astype(int)
    np.testing.assert_array_equal(index, np.floor(np.arange(12) * 2.5 + 0.5).astype(int))
    assert len(load_resampled(path, 16, 32, fps=60)[0]) == 60  # upsampling repeats frames
    assert len(load_resampled(path, 16, 32, fps=12, max_frames=5)[0]) == 5

    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 45:55] = 255  # a centred bar survives the centre crop
    cropped = resize_center_crop(image, 32, 32)
    assert cropped.shape == (32, 32, 3) and cropped[:, 16].min() > 200 and cropped[:, 0].max() < 30

    assert list(clip_starts(40, 17, "start", None, None)) == [0]
    assert list(clip_starts(40, 17, "middle", None, None)) == [11]
    assert list(clip_starts(40, 17, "sliding", None, None)) == [0, 17]
    assert list(clip_starts(40, 17, "sliding", 8, 2)) == [0, 8]
    assert list(clip_starts(10, 17, "start", None, None)) == []
    assert clip_id("a/x.mp4", 17, 0) != clip_id("b/x.mp4", 17, 0)
    assert clip_id("a/x y.mp4", 65, 12).startswith("x_y_") and clip_id("a/x y.mp4", 65, 12).endswith("_f65_s00012")


def test_sliding_clips_and_gif_source(sources, tiny_wan_dir, tmp_path) -> None:
    out = tmp_path / "slide"
    args = [
        "--family",
        "wan",
        "--lengths",
        "9",
        "--height",
        str(H),
        "--width",
        str(W),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--clip-mode",
        "sliding",
        "--stride",
        "4",
    ]
    table = tmp_path / "one.jsonl"
    table.write_text(json.dumps({"video": str(sources / "anim.gif"), "caption": "a gif"}) + "\n")
    assert main(["data", "prepare", "--input", str(table), "--out", str(out), "--model", str(tiny_wan_dir), *args]) == 0
    records = PreparedDataset(out).records
    n = len(read_video(sources / "anim.gif")[0])
    assert [r.start_frame for r in records] == list(range(0, n - 9 + 1, 4))
    assert len({r.id for r in records}) == len(records)


@pytest.mark.parametrize("family", ["wan22", "hunyuan"])
def test_other_families(family, sources, request, tmp_path) -> None:
    """Wan2.2 (two transformers, both released) and HunyuanVideo (three text tensors incl. a mask)."""
    model = request.getfixturevalue(f"tiny_{family}_dir")
    table = tmp_path / "one.jsonl"
    table.write_text(json.dumps({"video": str(sources / "sample_0000.mp4"), "caption": "a red circle"}) + "\n")
    out = tmp_path / family
    args = ["--family", family, "--lengths", "9", "--height", "32", "--width", "32", "--device", "cpu"]
    assert main(["data", "prepare", str(table), "--out", str(out), "--model", str(model), *args]) == 0
    ds = PreparedDataset(out)
    adapter = get_adapter(family)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    tensors = ds.load(ds.records[0])
    text = adapter.encode_prompts(pipe, ["a red circle"])
    assert set(tensors) == {"latents", *text} and ds.info["text_keys"] == sorted(text)
    for key, value in text.items():
        assert tensors[key].dtype == value.dtype
        torch.testing.assert_close(tensors[key], value[0])
    assert tensors["latents"].shape == (4, 3, 4, 4)  # tiny VAEs: 4 channels; 9 frames -> 3; 32 px -> 4
    assert validate_dataset(out).ok


def test_variable_frame_rate_resamples_by_timestamp(tmp_path) -> None:
    """Frames shown at 0, 0.10, 0.15, 0.40, 0.50 s; at 10 fps each output time takes the nearest frame."""
    from fractions import Fraction

    import av

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate([0, 100, 150, 400, 500]):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames, _ = load_resampled(path, 16, 16, fps=10)
    # t = 0.0 0.1 0.2 0.3 0.4 0.5 -> frames 0 1 2 3 3 4 (0.3 s is nearer 0.40 than 0.15); by index it would be 0..4
    np.testing.assert_array_equal(np.round(frames[:, 8, 8, 0] / 40), [0, 1, 2, 3, 3, 4])


def test_input_layouts_and_their_errors(tmp_path) -> None:
    # finetrainers' prompt.txt + videos.txt, line by line (trailing blank lines ignored)
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "videos.txt").write_text("videos/a.mp4\nvideos/b.mp4\n\n")
    (ft / "prompt.txt").write_text("a red circle\n\n")
    with pytest.raises(ValueError, match="prompt.txt has 1 lines but videos.txt 2"):
        collect_inputs(ft)
    (ft / "prompt.txt").write_text("   \na red  circle\n")
    items, skips = collect_inputs(ft)
    assert [(i.source, i.caption) for i in items] == [("videos/b.mp4", "a red circle")]
    assert skips[0].source == "videos/a.mp4" and "line 1 of prompt.txt is empty" in skips[0].reason
    # folder layout: recursive, hidden folders ignored, multi-line captions joined
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for rel in ("sub/x.mp4", ".cache/y.mp4", "z.MOV"):
        (folder / rel).write_bytes(b"")
    (folder / "sub" / "x.txt").write_text("two\nlines\n")
    (folder / "z.txt").write_text("upper case extension")
    items, skips = collect_inputs(folder)
    assert [(i.source, i.caption) for i in items] == [("sub/x.mp4", "two lines"), ("z.MOV", "upper case extension")]
    assert not skips
    # tables: no usable column, bad JSON, unsupported file
    (tmp_path / "t.csv").write_text("clip,words\na.mp4,hello\n")
    with pytest.raises(
        ValueError, match=r"t.csv: no video column among \['clip', 'words'\]; name one with --video-column"
    ):
        collect_inputs(tmp_path / "t.csv")
    (tmp_path / "t.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not valid JSON"):
        collect_inputs(tmp_path / "t.jsonl")
    (tmp_path / "t.yaml").write_text("video: a.mp4")
    with pytest.raises(ValueError, match="unsupported metadata file"):
        collect_inputs(tmp_path / "t.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        collect_inputs(empty)


def test_prepare_with_an_in_memory_pipeline(sources, tmp_path) -> None:
    """The demo passes its own pipeline: prepare uses it as is and leaves its transformer alone."""
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan")
    table = tmp_path / "one.jsonl"
    table.write_text(json.dumps({"video": str(sources / "sample_0002.mp4"), "caption": "a blue square"}) + "\n")
    opts = PrepareOptions(
        input=table,
        out=tmp_path / "ds",
        model="tiny-in-memory",
        family="wan",
        lengths=(9,),
        height=32,
        width=32,
        fps=16.0,
        dtype="float32",
    )
    summary = prepare_dataset(opts, pipe=pipe)
    assert summary.exit_code == 0 and summary.encoded[9] == 1
    assert pipe.transformer is not None
    assert PreparedDataset(tmp_path / "ds").info["model"] == "tiny-in-memory"


def test_offload_on_cpu_is_a_logged_no_op(tiny_wan_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_sample_dataset(tmp_path / "v", num_videos=1, num_frames=20, size=(64, 64), fps=16, seed=4)
    caplog.set_level("INFO", logger="radial_lora")
    summary = prepare_dataset(
        PrepareOptions(
            input=tmp_path / "v",
            out=tmp_path / "d",
            model=str(tiny_wan_dir),
            family="wan",
            lengths=(17,),
            height=64,
            width=64,
            offload=True,
        )
    )
    assert summary.exit_code == 0 and sum(summary.encoded.values()) == 1
    assert any("nothing to offload to on cpu" in r.getMessage() for r in caplog.records)


def test_two_prepares_into_one_folder_one_refused(sources: Path, tiny_wan_dir: Path, tmp_path: Path) -> None:
    """Two real `data prepare` processes into one --out: the second starts while the first holds the folder (held
    still with SIGSTOP once its lock file names it), exits 75 naming the folder and the first's pid, host and start
    time, and writes nothing; the first finishes alone: each clip listed once, `validate` content."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from radial_lora.data.dataset import manifest_rows
    from radial_lora.locks import EXIT_BUSY, LOCK_NAME

    out = tmp_path / "ds"
    cmd = [str(Path(sys.executable).with_name("radial-lora")), "data", "prepare", str(sources), "--out", str(out)]
    cmd += ["--model", str(tiny_wan_dir), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.monotonic() + 120
        while f'"pid": {first.pid},' not in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).is_file() else ""):
            assert first.poll() is None and time.monotonic() < end, "the first prepare did not take the folder"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        before = sorted(p.name for p in out.iterdir())
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == EXIT_BUSY, second.stderr[-2000:]
        (line,) = [x for x in second.stderr.splitlines() if "error:" in x]
        assert line.startswith(
            f"radial-lora data: error: {out} is in use by radial-lora data prepare (pid {first.pid} on "
            f"{socket.gethostname()}, started 20"
        )
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 3, err[-2000:]  # done; the fixture's bad inputs were skipped
    records, duplicates = manifest_rows(out / "manifest.jsonl")
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert not duplicates and len(lines) == len(records) == 10  # 5 good videos x 2 lengths, each once
    assert validate_dataset(out).ok
