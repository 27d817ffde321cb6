"""Captions read as written (issue 16): CSV parsed as CSV, byte-order marks and bad encodings, separators that
are text, zero-width captions, list captions, repeated rows, ``.TXT`` beside ``.MP4``; and a run with no usable
clip fails. The files are written the way users' tools write them (Excel-style CSV, Notepad's UTF-16)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from radial_lora.cli import main
from radial_lora.data.prepare import collect_inputs
from radial_lora.data.video_io import write_video


def _options(src: Path, out: Path, model: Path, **kw):
    """Prepare options for the tiny Wan at 32x32, 16 fps."""
    from radial_lora.data.prepare import PrepareOptions

    return PrepareOptions(input=src, out=out, model=str(model), family="wan", height=32, width=32, fps=16.0, **kw)


def _video(path: Path) -> Path:
    write_video(path, np.zeros((9, 16, 16, 3), np.uint8), 16.0)
    return path


def test_csv_quoted_newlines_and_commas_belong_to_the_caption(tmp_path: Path) -> None:
    table = tmp_path / "meta.csv"
    with open(table, "w", newline="", encoding="utf-8") as fh:  # what csv.writer / Excel write
        w = csv.writer(fh)
        w.writerow(["video", "caption"])
        w.writerow(["a.mp4", "first line\nsecond line"])
        w.writerow(["b.mp4", "a fox, running, in snow"])
        w.writerow(["c.mp4", "line\u2028separator is text"])
    with open(table, "a", encoding="utf-8") as fh:
        fh.write("d.mp4,an unquoted, comma\n")  # one field too many
    items, skips = collect_inputs(table)
    assert [(i.source, i.caption) for i in items] == [
        ("a.mp4", "first line second line"),
        ("b.mp4", "a fox, running, in snow"),
        ("c.mp4", "line separator is text"),
    ]
    (skip,) = skips
    assert skip.source == "d.mp4" and skip.reason.startswith("bad row: meta.csv:6 has 3 fields, the header 2")


def test_jsonl_line_separator_inside_a_caption_is_one_row(tmp_path: Path) -> None:
    table = tmp_path / "meta.jsonl"
    rows = [{"video": "a.mp4", "caption": "one\u2028two"}, {"video": "b.mp4", "caption": "three\u2029four"}]
    table.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items, skips = collect_inputs(table)
    assert [i.caption for i in items] == ["one two", "three four"] and not skips


@pytest.mark.parametrize(
    ("encoding", "bom"), [("utf-16", b""), ("utf-8-sig", b""), ("utf-16-be", b"\xfe\xff"), ("utf-32", b"")]
)
def test_captions_with_a_byte_order_mark_decode(tmp_path: Path, encoding: str, bom: bytes) -> None:
    _video(tmp_path / "clip.mp4")
    (tmp_path / "clip.txt").write_bytes(bom + "Über den Fluß, café".encode(encoding))  # Notepad "Unicode"
    items, skips = collect_inputs(tmp_path)
    assert [i.caption for i in items] == ["Über den Fluß, café"] and not skips


def test_undecodable_captions_skip_that_video_naming_file_and_byte(tmp_path: Path) -> None:
    _video(tmp_path / "latin.mp4")
    (tmp_path / "latin.txt").write_bytes("un café à Paris".encode("cp1252"))
    _video(tmp_path / "nobom.mp4")
    (tmp_path / "nobom.txt").write_bytes("sixteen".encode("utf-16-le"))  # UTF-16 without its mark
    _video(tmp_path / "good.mp4")
    (tmp_path / "good.txt").write_text("a good caption", encoding="utf-8")
    items, skips = collect_inputs(tmp_path)
    assert [i.source for i in items] == ["good.mp4"]
    reasons = {s.source: s.reason for s in skips}
    assert reasons["latin.mp4"].startswith("unreadable caption: ")
    assert (
        "latin.txt: not valid utf-8 at byte 6 (0xe9); it may be Latin-1 or cp1252: save it as UTF-8"
        in reasons["latin.mp4"]
    )
    assert "contains NUL characters" in reasons["nobom.mp4"]
    latin_table = tmp_path / "meta.csv"
    latin_table.write_bytes("video,caption\ngood.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"meta.csv: not valid utf-8 at byte 26 \(0xe9\)"):
        collect_inputs(latin_table)


def test_zero_width_list_and_repeated_captions_and_upper_case_txt(tmp_path: Path) -> None:
    _video(tmp_path / "Upper.MP4")
    (tmp_path / "Upper.TXT").write_text("shouted extension", encoding="utf-8")
    _video(tmp_path / "blank.mp4")
    (tmp_path / "blank.txt").write_text("\u200b\u200d\ufeff \n", encoding="utf-8")
    items, skips = collect_inputs(tmp_path)
    assert [(i.source, i.caption) for i in items] == [("Upper.MP4", "shouted extension")]
    assert [(s.source, s.reason) for s in skips] == [("blank.mp4", "missing caption: blank.txt is empty")]

    table = tmp_path / "meta.json"
    rows = [
        {"video": "a.mp4", "caption": ["one", "two"]},
        {"video": "b.mp4", "caption": "first"},
        {"video": "b.mp4", "caption": "second"},
        {"video": "c.mp4", "caption": "same"},
        {"video": "c.mp4", "caption": "same"},
    ]
    table.write_text(json.dumps(rows), encoding="utf-8")
    items, skips = collect_inputs(table)
    assert [(i.source, i.caption) for i in items] == [("b.mp4", "first"), ("c.mp4", "same")]
    assert [s.reason for s in skips] == [
        "caption is a list of 2 in meta.json row 1; give one string per row (a row per caption)",
        "listed twice: meta.json row 3 repeats meta.json row 2 with another caption; the first is kept",
        "listed twice: meta.json row 5 repeats meta.json row 4 with the same caption; the first is kept",
    ]


def test_no_usable_clip_fails_and_impossible_fps_is_refused(
    tiny_wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "in" / "broken.txt").write_text("a caption", encoding="utf-8")
    args = ["data", "prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--model", str(tiny_wan_dir)]
    args += ["--family", "wan", "--lengths", "9", "--height", "32", "--width", "32", "--device", "cpu"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "no clip was prepared: the dataset is empty" in out and "skipped broken.mp4: unreadable" in out
    for fps in ("nan", "inf", "0"):
        assert main([*args, "--fps", fps]) == 2
        assert f"--fps {float(fps)} must be a positive number" in capsys.readouterr().err


def test_rerun_notices_edited_captions_replaced_videos_and_contradicting_settings(
    tiny_wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never stale: a rerun re-encodes exactly the clips whose caption or video changed, and refuses settings
    that contradict the dataset's."""
    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.data.sample import write_sample_dataset

    src = tmp_path / "in"
    write_sample_dataset(src, num_videos=3, num_frames=9, size=32, fps=16.0, seed=1)
    out = tmp_path / "ds"
    args = ["data", "prepare", str(src), "--out", str(out), "--model", str(tiny_wan_dir), "--family", "wan"]
    args += ["--lengths", "9", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    first = {r.source: r for r in PreparedDataset(out).records}
    assert main(args) == 0 and "(0 encoded, 3 already prepared)" in capsys.readouterr().out

    (src / "sample_0000.txt").write_text("an edited caption\n", encoding="utf-8")
    write_sample_dataset(tmp_path / "other", num_videos=2, num_frames=9, size=32, fps=16.0, seed=9)
    (tmp_path / "other" / "sample_0001.mp4").replace(src / "sample_0001.mp4")  # same name, new video
    assert main(args) == 0
    assert "(2 encoded, 1 already prepared)" in capsys.readouterr().out
    now = {r.source: r for r in PreparedDataset(out).records}
    assert len(now) == 3 and now["sample_0000.mp4"].caption == "an edited caption"
    assert now["sample_0001.mp4"].sha256 != first["sample_0001.mp4"].sha256
    assert now["sample_0002.mp4"] == first["sample_0002.mp4"]

    for flag, value in (("--dtype", "bfloat16"), ("--clip-mode", "sliding"), ("--max-clips", "1")):
        changed = [*args, flag, value] if flag != "--dtype" else [*args[:-1], value]
        assert main(changed) == 2
        assert f"prepared with {flag[2:].replace('-', '_')}=" in capsys.readouterr().err


def test_validate_flags_an_unfinished_run_and_absurd_latents(
    tiny_wan_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file, save_file

    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset
    from radial_lora.data.validate import validate_dataset
    from radial_lora.files import sha256_file

    src = tmp_path / "in"
    write_sample_dataset(src, num_videos=2, num_frames=9, size=32, fps=16.0, seed=2)
    out = tmp_path / "ds"
    opts = _options(src, out, tiny_wan_dir, lengths=(9,))
    prepare_dataset(opts)
    assert validate_dataset(out).ok
    assert json.loads((out / "dataset.json").read_text())["finished"] is True

    # A latent scaled by 1e30 with a consistent checksum (rewritten by something else): flagged.
    ds = PreparedDataset(out)
    record = ds.records[0]
    tensors = load_file(out / record.file)
    tensors["latents"] = tensors["latents"] * 1e30
    save_file(tensors, str(out / record.file))
    manifest = out / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["sha256"] = sha256_file(out / record.file)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_dataset(out)
    assert not report.ok and any("far beyond what a VAE gives" in p and record.id in p for p in report.problems)

    # A run stopped part-way (Ctrl-C in the middle of encoding) leaves "finished": false, which validate reports.
    from radial_lora.data import prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_encode_and_write", interrupted)
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PrepareOptions(**{**opts.__dict__, "out": partial}))
    assert json.loads((partial / "dataset.json").read_text())["finished"] is False
    assert any("did not finish" in p for p in validate_dataset(partial).problems)


def test_os_errors_and_interrupts_are_one_line_and_bad_names_are_skipped(
    tiny_wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from radial_lora.data import prepare as prepare_module
    from radial_lora.data.sample import write_sample_dataset

    src = tmp_path / "in"
    write_sample_dataset(src, num_videos=1, num_frames=9, size=32, fps=16.0, seed=3)
    bad_name = os.fsdecode(b"caf\xe9.mp4")  # a Latin-1 name on a UTF-8 system
    _video(src / bad_name)
    (src / os.fsdecode(b"caf\xe9.txt")).write_text("a caption", encoding="utf-8")
    items, skips = collect_inputs(src)
    assert [i.source for i in items] == ["sample_0000.mp4"]
    assert [(s.source, s.reason) for s in skips] == [("caf\\xe9.mp4", "file name is not valid UTF-8: rename it")]

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    base = ["data", "prepare", str(src), "--model", str(tiny_wan_dir), "--family", "wan", "--lengths", "9"]
    base += ["--height", "32", "--width", "32", "--device", "cpu", "--dtype", "float32"]
    assert main([*base, "--out", str(blocker)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("radial-lora data: error: ") and "--out / output_dir must be a folder" in err
    assert "Traceback" not in err

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ds" / "latents"))

    monkeypatch.setattr(prepare_module, "save_file", full_disk)
    assert main([*base, "--out", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "the disk is full: free space, then run the same command" in err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "save_file", ctrl_c)
    assert main([*base, "--out", str(tmp_path / "ds")]) == 130
    assert "interrupted; everything finished is kept" in capsys.readouterr().err


def test_captions_past_the_text_encoders_limit_warn_once(tiny_wan_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from radial_lora.data.prepare import SourceItem, warn_long_captions
    from radial_lora.models import get_adapter

    adapter = get_adapter("wan")
    pipe = adapter.load_pipeline(tiny_wan_dir, skip=("transformer",))
    limit = adapter.max_sequence_length
    items = [
        SourceItem("short.mp4", Path("short.mp4"), "a red circle"),
        SourceItem("long.mp4", Path("long.mp4"), " ".join(["circle"] * (limit + 40))),
        SourceItem("longer.mp4", Path("longer.mp4"), " ".join(["circle"] * (limit + 90))),
    ]
    with caplog.at_level("WARNING"):
        assert warn_long_captions(items, adapter, pipe, "meta.csv") == 2
    (record,) = [r for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert f"2 caption(s) are longer than the text encoder's {limit} tokens" in record.getMessage()
    assert "longer.mp4" in record.getMessage()


def test_a_corrupt_stretch_loses_only_the_clips_that_overlap_it(tiny_wan_dir: Path, tmp_path: Path) -> None:
    """Bytes overwritten in the middle of an H.264 file (as a bad disk or a cut download leaves it): the plain
    decoder stops there; prepare decodes on past it and keeps every clip that does not touch the damage."""
    import av

    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.data.prepare import prepare_dataset, resampled_count, resampled_frames

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    with av.open(str(src / "clip.mp4"), "w") as c:  # a key frame every second, as cameras and phones write
        stream = c.add_stream("libx264", rate=16, options={"crf": "30", "g": "16", "keyint_min": "16"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i, img in enumerate((rng.random((160, 32, 32, 3)) * 255).astype(np.uint8)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    (src / "clip.txt").write_text("noise", encoding="utf-8")
    data = bytearray((src / "clip.mp4").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (src / "clip.mp4").write_bytes(bytes(data))
    with pytest.raises(av.InvalidDataError):  # what a plain decode does: stop at the damage
        with av.open(str(src / "clip.mp4")) as c:
            for _ in c.decode(video=0):
                pass

    frames = list(resampled_frames(src / "clip.mp4", 32, 32, 16.0))
    bad = [i for i, f in enumerate(frames) if f is None]
    assert len(frames) == 160 == resampled_count(src / "clip.mp4", 16.0)
    assert bad and 20 < bad[0] and bad[-1] < 150 and len(bad) < 80  # damage in the middle, not the ends

    opts = _options(src, tmp_path / "ds", tiny_wan_dir, lengths=(17,), clip_mode="sliding")
    summary = prepare_dataset(opts)
    starts = sorted(r.start_frame for r in PreparedDataset(tmp_path / "ds").records)
    every = list(range(0, 160 - 17 + 1, 17))
    lost = [s for s in every if any(s <= b < s + 17 for b in bad)]
    assert starts == [s for s in every if s not in lost] and lost and starts[-1] > bad[-1]
    (skip,) = summary.skipped
    assert skip.reason.startswith(f"damaged: {len(lost)} of 17 frames overlap damaged frames")


def test_clips_are_cut_while_streaming_and_decoding_stops_when_done() -> None:
    from radial_lora.data.prepare import CutClips, cut_clips

    read = []

    def stream(n: int):
        for i in range(n):
            read.append(i)
            yield np.full((2, 2, 3), i % 256, np.uint8)

    seen = CutClips()
    clips = list(cut_clips(stream(1000), [9, 17], "sliding", 17, 2, None, seen))
    assert [(n, s) for n, s, _ in clips] == [(9, 0), (17, 0), (9, 17), (17, 17)]
    assert all(int(c[0, 0, 0, 0]) == s % 256 and len(c) == n for n, s, c in clips)
    assert len(read) == 34 and not seen.complete  # stopped after the last clip it needed
    read.clear()
    middle = list(cut_clips(stream(1000), [17], "middle", None, None, 1000, CutClips()))
    assert [(n, s) for n, s, _ in middle] == [(17, 491)] and len(read) == 508
    read.clear()
    short = CutClips()
    assert list(cut_clips(stream(12), [17], "start", None, None, None, short)) == []
    assert short.complete and short.frames == 12


def test_inputs_with_the_same_names_prepared_into_one_dataset_at_their_own_lengths(
    tiny_wan_dir: Path, tmp_path: Path
) -> None:
    """The demo's layout: the same specs rendered at two lengths in two folders (same file names, captions of
    their own length), each prepared at its length into one dataset. The second run keeps the first's clips."""
    from radial_lora.data.dataset import PreparedDataset
    from radial_lora.data.prepare import prepare_dataset
    from radial_lora.data.sample import write_sample_dataset

    for n in (9, 17):
        write_sample_dataset(tmp_path / f"f{n}", num_videos=2, num_frames=n, size=32, fps=16.0, seed=4)
    out = tmp_path / "ds"
    for n in (9, 17, 9):  # and a rerun of the first: nothing to do
        summary = prepare_dataset(_options(tmp_path / f"f{n}", out, tiny_wan_dir, lengths=(n,)))
    assert sum(summary.encoded.values()) == 0 and summary.reused[9] == 2
    ds = PreparedDataset(out)
    assert {b: len(r) for b, r in ds.buckets.items()} == {9: 2, 17: 2}
    assert ds.info["lengths"] == [9, 17] and ds.info["finished"] is True
