"""generate(): tiny Wan pipeline, two lengths, radial/dense, with and without a LoRA; sidecars; the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from radial_lora.cli import main
from radial_lora.data.video_io import read_video
from radial_lora.eval import metrics
from radial_lora.inference.generate import generate, load_model, parse_lora_spec, read_prompts
from radial_lora.locks import LOCK_NAME
from radial_lora.lora import lora_digest

PROMPT = "a red circle moves right"
COMMON = dict(height=32, width=32, steps=2, guidance=1.0, fps=8.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir: Path):
    return load_model(str(tiny_wan_dir))[0]


def test_lengths_lora_metadata_and_sidecar(pipe, tiny_wan_lora: Path, tmp_path: Path) -> None:
    out = {}
    for frames in (9, 17):
        (r,) = generate(
            pipe,
            [PROMPT],
            num_frames=frames,
            out_dir=tmp_path,
            loras=[(tiny_wan_lora, 1.0)],
            names=[f"lora_{frames}"],
            **COMMON,
        )
        out[frames] = r
        video, fps = read_video(r.video_path)
        assert video.shape == (frames, 32, 32, 3) and fps == pytest.approx(8.0)
        info = json.loads(r.sidecar_path.read_text())
        # The sidecar on disk describes this video (checked field by field, not through the writer's serializer).
        assert r.sidecar_path == r.video_path.with_suffix(".json")
        assert (info["format"], info["prompt"], info["index"], info["video"]) == (
            "radial-lora-generation/1",
            PROMPT,
            0,
            f"lora_{frames}.mp4",
        )
        assert set(info) >= {"settings", "settings_source", "wall_time_s", "peak_memory", "attention", "versions"}
        assert info["versions"]["torch"] and info["versions"]["diffusers"]
        s = info["settings"]
        # the LoRA's training metadata became the attention defaults
        assert (s["pattern"], s["decay_factor"], s["block_size"], s["dense_layers"]) == ("radial", 0.5, 4, 0)
        assert (
            info["settings_source"]["block_size"] == "lora" and info["settings_source"]["dense_timesteps"] == "default"
        )
        assert s["loras"] == [[str(tiny_wan_lora), 1.0]] and s["seed"] == 0 and s["num_frames"] == frames
        assert info["wall_time_s"] > 0 and info["peak_memory"]["bytes"] > 0
        a = info["attention"]
        assert a["latent_frames"] == 1 + (frames - 1) // 4 and a["tokens_per_frame"] == 4
        assert a["attention_flops"] == pytest.approx(a["effective_density"] * a["attention_flops_dense"])
        assert a["calls"] == {"sparse": 2 * 2, "dense": 0}  # 2 steps x 2 layers, all radial
    # 3 latent frames: sink + neighbours cover everything; 5 latent frames: distance-3 pairs are dropped
    assert out[9].info["attention"]["mask_density"] == 1.0
    assert out[17].info["attention"]["mask_density"] < 1.0


def test_radial_dense_lora_effects(pipe, tiny_wan_lora: Path, tmp_path: Path) -> None:
    def run(name: str, **kw) -> np.ndarray:
        args = {**COMMON, "steps": 1, "block_size": 4, "decay_factor": 0.5, **kw}
        return generate(pipe, [PROMPT], num_frames=17, out_dir=tmp_path, names=[name], **args)[0].frames

    lora = run("lora", pattern="radial", loras=[(tiny_wan_lora, 1.0)])
    dense, radial = run("dense", pattern="dense"), run("radial", pattern="radial")
    assert 20 < metrics.psnr(radial, dense) < math.inf  # sparse attention changes the video, a little
    # the base runs came after a LoRA run: the LoRA must not stay active
    assert metrics.psnr(lora, radial) < math.inf
    # a block as large as the sequence keeps every block: radial must equal dense exactly
    full = run("full", pattern="radial", block_size=1024)
    assert np.array_equal(full, dense)
    # scale 0 switches the LoRA off: the base model's video, bit for bit
    assert np.array_equal(run("lora0", pattern="radial", loras=[(tiny_wan_lora, 0.0)]), radial)


def test_cli_generate_and_skip_existing(tiny_wan_dir: Path, tiny_wan_lora: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na blue square\n\na green ball falls\n")
    argv = [
        "generate",
        "--model",
        str(tiny_wan_dir),
        "--prompts",
        str(prompts),
        "--frames",
        "9",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--lora",
        f"{tiny_wan_lora}:0.5",
        "--out",
        str(tmp_path / "out"),
        "--seed",
        "7",
        "--skip-existing",
        "--vae-tiling",
    ]
    assert main(argv) == 0
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    assert [p.stem for p in sidecars] == ["000_a-blue-square", "001_a-green-ball-falls"]
    infos = [json.loads(p.read_text()) for p in sidecars]
    assert [i["settings"]["seed"] for i in infos] == [7, 8]
    assert infos[0]["settings"]["loras"] == [[str(tiny_wan_lora), 0.5]]
    outputs = [p for p in (tmp_path / "out").iterdir() if p.name != LOCK_NAME]  # the lock names each run
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert main(argv) == 0  # everything reused: no file rewritten
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert infos[0]["settings"]["lora_sha256"] == [lora_digest(tiny_wan_lora)]
    # Other settings into the same --out would replace both videos: refused in one line, nothing touched.
    argv[argv.index("--steps") + 1] = "2"
    assert main(argv) == 2
    (error,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert error.startswith(f"radial-lora generate: error: {tmp_path / 'out'} already holds videos made with other")
    assert "(000_a-blue-square.mp4: steps 1 -> 2)" in error and "--overwrite" in error
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert main([*argv, "--overwrite"]) == 0
    (aside,) = (tmp_path / "out" / "previous").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == sorted(p.name for p in outputs)


def test_skip_existing_notices_a_changed_lora(pipe, tiny_wan_lora: Path, tmp_path: Path) -> None:
    from radial_lora.lora import load_lora_state, save_lora

    state = load_lora_state(tiny_wan_lora)
    save_lora(tmp_path / "lora", state, {"run": 1})
    kw = dict(
        num_frames=9,
        out_dir=tmp_path / "out",
        loras=[(tmp_path / "lora", 1.0)],
        skip_existing=True,
        block_size=4,
        **{**COMMON, "steps": 1},
    )
    first = generate(pipe, [PROMPT], **kw)[0]
    assert generate(pipe, [PROMPT], **kw)[0].reused
    save_lora(tmp_path / "lora", {k: 2 * v for k, v in state.items()}, {"run": 2})  # retrained at the same path
    old_bytes = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("000_*")}
    # Other settings (the LoRA's sha256) would replace the earlier video: refused, naming the file and the difference.
    with pytest.raises(ValueError, match=r"000_.*\.mp4: lora_sha256 .* --overwrite to move it into .*previous"):
        generate(pipe, [PROMPT], **kw)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("000_*")} == old_bytes
    again = generate(pipe, [PROMPT], **kw, overwrite=True)[0]
    assert not again.reused and again.info["settings"]["lora_sha256"] != first.info["settings"]["lora_sha256"]
    assert not np.array_equal(again.frames, first.frames)  # the new weights were loaded, not the cached adapter
    (aside,) = (tmp_path / "out" / "previous").iterdir()  # the earlier video and sidecar, byte for byte
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old_bytes


def test_cli_errors(tiny_wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", str(tiny_wan_dir), "--frames", "9", "--out", str(tmp_path)]
    assert main([*base, "--prompt", "x", "--lora", str(tmp_path / "missing")]) == 2
    assert "LoRA" in capsys.readouterr().err
    assert main(base) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--frames", "10", "--height", "32", "--width", "32"]) == 2
    assert "4k+1" in capsys.readouterr().err


def test_parse_lora_spec_and_prompts(tmp_path: Path) -> None:
    assert parse_lora_spec("out/lora") == ("out/lora", 1.0)
    assert parse_lora_spec("out/lora:0.75") == ("out/lora", 0.75)
    assert parse_lora_spec("C:/loras/x") == ("C:/loras/x", 1.0)
    (tmp_path / "p.json").write_text('["one", " two "]')
    assert read_prompts(tmp_path / "p.json") == ["one", "two"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of prompt strings"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_lora_metadata_defaults_and_precedence(tmp_path: Path) -> None:
    import torch

    from radial_lora.inference.generate import resolve_attention_settings
    from radial_lora.lora import lora_attention_settings, save_lora

    state = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2),
    }
    # the trainer's layout: settings under "attention" (decay spelled "decay")
    trained = save_lora(
        tmp_path / "a", state, {"attention": {"pattern": "radial", "decay": 0.3, "block_size": 64, "dense_layers": 2}}
    )
    other = save_lora(tmp_path / "b", state, {"pattern": "dense", "decay_factor": 0.9})
    plain = save_lora(tmp_path / "c", state, {"note": "no attention settings"})
    assert lora_attention_settings(trained) == {
        "pattern": "radial",
        "decay_factor": 0.3,
        "block_size": 64,
        "dense_layers": 2,
    }
    assert lora_attention_settings(plain) == {}
    settings, source = resolve_attention_settings({"block_size": 128}, [(str(trained), 1.0), (str(other), 1.0)])
    assert settings == {
        "pattern": "radial",
        "decay_factor": 0.3,
        "block_size": 128,
        "dense_layers": 2,
        "dense_timesteps": 0,
    }
    assert source == {
        "pattern": "lora",
        "decay_factor": "lora",
        "block_size": "user",
        "dense_layers": "lora",
        "dense_timesteps": "default",
    }


@pytest.mark.parametrize("family", ["hunyuan", "wan22"])
def test_other_families(family: str, tmp_path: Path) -> None:
    from radial_lora.models import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    (r,) = generate(pipe, [PROMPT], num_frames=17, out_dir=tmp_path, block_size=4, **{**COMMON, "steps": 1})
    assert r.frames.shape == (17, 32, 32, 3) and r.info["settings"]["family"] == family
    a = r.info["attention"]
    layers = 4 if family == "hunyuan" else 2  # HunyuanVideo: 2 double + 2 single blocks
    assert a["self_attention_layers"] == layers and a["calls"] == {"sparse": layers, "dense": 0}
    assert a["decay_factor"] == {"hunyuan": 0.95, "wan22": 0.8}[family] and 0 < a["mask_density"] < 1


def test_dense_layers_and_timesteps_accounting(pipe, tmp_path: Path) -> None:
    (r,) = generate(
        pipe,
        [PROMPT],
        num_frames=17,
        out_dir=tmp_path,
        block_size=4,
        decay_factor=0.5,
        dense_layers=1,
        dense_timesteps=1,
        **{**COMMON, "steps": 3},
    )
    a = r.info["attention"]
    # 3 steps x 2 layers: step 0 dense everywhere, then layer 0 dense and layer 1 radial
    assert a["calls"] == {"dense": 2 + 2, "sparse": 2}
    expected = (4 + 2 * a["mask_density"]) / 6  # four dense layer-steps, two radial
    assert a["effective_density"] == pytest.approx(expected)


def test_batched_generation_draws_each_prompts_own_noise(pipe, tmp_path: Path) -> None:
    """batch_size > 1 renders several prompts per pipeline call with one generator each: the videos match the
    one-at-a-time ones up to float rounding of the batched kernels (at most 2 of 255), the seeds and settings
    are the same, and the sidecar records the batch size (a rerun with another batch size renders again)."""
    prompts = ["a red circle moves right", "a blue square moves up", "a green triangle moves left"]
    kw = dict(num_frames=9, height=32, width=32, steps=2, guidance=3.0, negative_prompt="", block_size=16)
    one = generate(pipe, prompts, out_dir=tmp_path / "one", **kw)
    batched = generate(pipe, prompts, out_dir=tmp_path / "two", batch_size=2, **kw)
    for a, b in zip(one, batched):
        assert a.info["settings"]["seed"] == b.info["settings"]["seed"]
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2
        assert b.info["settings"]["batch_size"] == 2 and a.info["settings"]["batch_size"] == 1
    # Different noise per prompt: the same prompt twice in one batch gives two different videos.
    twice = generate(pipe, [prompts[0]] * 2, out_dir=tmp_path / "twice", batch_size=2, **kw)
    assert not np.array_equal(twice[0].frames, twice[1].frames)
    again = generate(pipe, prompts, out_dir=tmp_path / "two", batch_size=2, skip_existing=True, **kw)
    assert all(r.reused for r in again)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(pipe, prompts, out_dir=tmp_path / "bad", batch_size=0, **kw)


def test_cli_generate_riflex_records_its_component(tiny_wan_dir: Path, tmp_path: Path, capsys) -> None:
    """`generate --riflex` takes k from --base-frames (the tiny model: component 1 covers 9 frames' 3 latent
    frames); `--riflex-k` picks one; without either the sidecar says None."""
    common = ["generate", "--model", str(tiny_wan_dir), "--frames", "33", "--height", "32", "--width", "32"]
    common += ["--steps", "1", "--prompt", PROMPT]
    for extra, want in ((["--riflex", "--base-frames", "9"], 1), (["--riflex-k", "2"], 2), ([], None)):
        out = tmp_path / f"k{want}"
        assert main([*common, *extra, "--out", str(out)]) == 0
        (sidecar,) = out.glob("*.json")
        assert json.loads(sidecar.read_text())["settings"]["riflex_k"] == want
    capsys.readouterr()
    assert main([*common, "--riflex-k", "99", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "radial-lora generate: error: RIFLEx k=99 is outside the temporal RoPE's components 1..4" in err
