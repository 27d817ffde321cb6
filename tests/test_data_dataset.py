"""Prepared-dataset reader and validator on hand-built datasets (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from radial_lora.cli import main
from radial_lora.data.dataset import FORMAT, PreparedDataset, Record, read_manifest
from radial_lora.data.validate import validate_dataset
from radial_lora.files import sha256_file

H, W, C = 32, 48, 4


def _write_clip(root: Path, cid: str, bucket: int, source: str, latents: torch.Tensor) -> Record:
    rel = f"latents/f{bucket}/{cid}.safetensors"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents, "prompt_embeds": torch.ones(6, 8)}, str(root / rel))
    return Record(
        id=cid,
        bucket=bucket,
        source=source,
        caption=f"a red circle {cid}",
        start_frame=0,
        fps=16.0,
        height=H,
        width=W,
        num_frames=bucket,
        latent_shape=tuple(latents.shape),
        file=rel,
        sha256=sha256_file(root / rel),
    )


def make_dataset(root: Path, sources: int = 5, lengths: tuple[int, ...] = (9, 17)) -> Path:
    """Each source gives one clip per length; latents [C, 1+(F-1)//4, H/8, W/8] of N(0, 1) values."""
    root.mkdir(parents=True)
    info = {
        "format": FORMAT,
        "family": "wan",
        "model": "tiny",
        "height": H,
        "width": W,
        "fps": 16.0,
        "lengths": list(lengths),
        "vae_temporal_factor": 4,
        "vae_spatial_factor": 8,
        "text_keys": ["prompt_embeds"],
    }
    (root / "dataset.json").write_text(json.dumps(info))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for s in range(sources):
        for n in lengths:
            latents = torch.randn(C, 1 + (n - 1) // 4, H // 8, W // 8, generator=gen)
            rows.append(_write_clip(root, f"src{s}_f{n}", n, f"video{s}.mp4", latents))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows))
    return root


def test_reader_buckets_records_and_load(tmp_path) -> None:
    ds = PreparedDataset(make_dataset(tmp_path / "ds"))
    assert len(ds) == 10 and ds.info["lengths"] == [9, 17]
    assert list(ds.buckets) == [9, 17] and [len(v) for v in ds.buckets.values()] == [5, 5]
    record = ds.buckets[17][2]
    assert record.latent_shape == (C, 5, 4, 6) and record.source == "video2.mp4"
    tensors = ds.load(record, verify=True)
    assert tensors["latents"].shape == (C, 5, 4, 6) and tensors["latents"].dtype == torch.float32
    assert torch.equal(tensors["prompt_embeds"], torch.ones(6, 8))


def test_split_by_source_is_deterministic(tmp_path) -> None:
    ds = PreparedDataset(make_dataset(tmp_path / "ds", sources=10))
    train, held = ds.split(0.2, seed=1)
    assert len(train) + len(held) == len(ds)
    assert len({r.source for r in held}) == 2
    assert not {r.source for r in train} & {r.source for r in held}
    # every clip of a held-out source is held out, in every bucket
    assert all(len([r for r in held if r.source == s]) == 2 for s in {r.source for r in held})
    assert ds.split(0.2, seed=1) == (train, held)
    assert len({frozenset(r.source for r in ds.split(0.2, seed=k)[1]) for k in range(6)}) > 1  # seed matters
    assert ds.split(0.0) == (ds.records, [])
    tiny = PreparedDataset(make_dataset(tmp_path / "tiny", sources=2))
    assert len({r.source for r in tiny.split(0.01)[1]}) == 1 and len({r.source for r in tiny.split(0.99)[0]}) == 1
    with pytest.raises(ValueError, match="holdout_fraction"):
        ds.split(1.0)


def test_manifest_tolerates_a_cut_off_last_line_only(tmp_path) -> None:
    root = make_dataset(tmp_path / "ds")
    manifest = root / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text + '{"id": "half-writ')
    assert len(read_manifest(manifest)) == 10
    manifest.write_text('{"id": "broken\n' + text)
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: not valid JSON"):
        read_manifest(manifest)


def test_reader_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        PreparedDataset(tmp_path)
    root = make_dataset(tmp_path / "ds")
    ds = PreparedDataset(root)
    record = ds.records[0]
    (root / record.file).unlink()
    with pytest.raises(FileNotFoundError, match=record.id):
        ds.load(record)
    (root / ds.records[1].file).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        ds.load(ds.records[1])


def test_validate_ok_and_bucket_summary(tmp_path, capsys) -> None:
    root = make_dataset(tmp_path / "ds")
    report = validate_dataset(root)
    assert report.ok, report.problems
    assert report.buckets[9].clips == 5 and len(report.buckets[17].sources) == 5
    assert abs(report.buckets[17].mean) < 0.2 and abs(report.buckets[17].std - 1) < 0.2
    assert main(["data", "validate", str(root)]) == 0
    assert "f17: 5 clips from 5 sources, latents [4, 5, 4, 6]" in capsys.readouterr().out


def test_validate_catches_tamper_nan_missing_and_bad_geometry(tmp_path, capsys) -> None:
    root = make_dataset(tmp_path / "ds")
    ds = PreparedDataset(root)
    r_tamper, r_nan, r_missing, r_shape = ds.records[0], ds.records[3], ds.records[5], ds.records[7]
    # 1. bytes changed after preparation: checksum
    data = bytearray((root / r_tamper.file).read_bytes())
    data[-1] ^= 0xFF
    (root / r_tamper.file).write_bytes(bytes(data))
    # 2. a NaN written with a matching checksum: only the value check can find it
    bad = ds.load(r_nan)["latents"].clone()
    bad[0, 0, 0, 0] = float("nan")
    save_file({"latents": bad, "prompt_embeds": torch.ones(6, 8)}, str(root / r_nan.file))
    # 3. a missing file
    (root / r_missing.file).unlink()
    # 4. a manifest row whose latent frames do not fit its frame count
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        if row["id"] == r_nan.id:
            row["sha256"] = sha256_file(root / r_nan.file)
        if row["id"] == r_shape.id:
            row["num_frames"] = row["bucket"] = 13
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = validate_dataset(root)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"clip {r_tamper.id}" in text and "sha256 differs" in text
    assert f"clip {r_nan.id}" in text and "1 NaN/Inf" in text
    assert f"clip {r_missing.id}" in text and "file missing" in text
    assert f"clip {r_shape.id}" in text and "bucket 13 is not in dataset.json" in text
    assert "expected [C, 4, 4, 6]" in text
    assert main(["data", "validate", str(root), "--max-problems", "2"]) == 1
    err = capsys.readouterr().err
    assert "problem(s); the first 2:" in err and err.count("\n  clip ") == 2


def test_validate_unusable_folders(tmp_path) -> None:
    assert not validate_dataset(tmp_path).ok
    root = make_dataset(tmp_path / "ds")
    (root / "manifest.jsonl").write_text("")
    report = validate_dataset(root)
    assert "lists no clips" in report.problems[0]
    assert main(["data", "validate", str(tmp_path / "nope")]) == 2


def test_validate_flags_a_clip_listed_twice_and_a_dataset_being_written(tmp_path, capsys) -> None:
    from launch import hold_lock

    root = make_dataset(tmp_path / "ds")
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines) + lines[2])  # two `data prepare` runs at once used to leave this
    cid = json.loads(lines[2])["id"]
    ds = PreparedDataset(root)
    assert len(ds.records) == len(lines) and ds.duplicates == {cid: [3, len(lines) + 1]}
    report = validate_dataset(root)
    assert report.problems == [
        f"clip {cid} is listed 2 times in the manifest (lines 3, {len(lines) + 1}): two `data prepare` runs wrote "
        "it at once, or it was edited; run `data prepare` again to write each clip once"
    ]
    with pytest.raises(ValueError, match=rf"clip {cid} is listed 2 times"):
        ds.verify(ds.records, files=False)
    assert main(["data", "validate", str(root)]) == 1
    assert f"clip {cid} is listed 2 times" in capsys.readouterr().err

    manifest.write_text("".join(lines))
    proc = hold_lock(root, "radial-lora data prepare", tmp_path / "held")
    try:
        (problem,) = validate_dataset(root).problems
        assert problem.startswith(f"{root} is being written now by radial-lora data prepare (pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait()
    assert validate_dataset(root).ok
