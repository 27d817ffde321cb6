"""Image-to-video, the whole job on a tiny WanImageToVideoPipeline of the real classes (Wan2.1-I2V layout: CLIP
image encoder): data prepare caches each clip's image conditioning, train runs with caption dropout, the
consistency term and sample videos, the LoRA loads into the stock pipeline and changes its video, generate
takes --image, evaluate conditions on the held-out clips' first frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radial_lora.cli import main
from radial_lora.constants import FIRST_FRAME, IMAGE_EMBEDS, IMAGE_LATENTS
from radial_lora.data.dataset import PreparedDataset
from radial_lora.data.prepare import PrepareOptions, prepare_dataset
from radial_lora.data.sample import write_sample_dataset
from radial_lora.data.validate import validate_dataset
from radial_lora.lora import read_lora_metadata
from radial_lora.models import get_adapter
from radial_lora.train import trainer
from tiny_config import quick_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from radial_lora.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("i2v")
    model = save_tiny_pipeline("wan-i2v", root / "model")
    write_sample_dataset(root / "videos", num_videos=4, num_frames=20, size=(32, 32), fps=16, seed=0)
    opts = PrepareOptions(
        input=root / "videos", out=root / "data", model=str(model), lengths=(9, 17), height=32, width=32
    )
    prepare_dataset(opts)  # no family: read from the folder's model_index.json
    return {"root": root, "model": model, "data": root / "data"}


def test_prepare_caches_the_pipelines_own_conditioning(flow: dict[str, Path]) -> None:
    ds = PreparedDataset(flow["data"])
    assert ds.info["family"] == "wan-i2v" and ds.info["task"] == "i2v"
    report = validate_dataset(flow["data"])
    assert report.ok and not report.warnings, report.format()
    adapter = get_adapter("wan-i2v")
    pipe = adapter.load_pipeline(flow["model"], torch.float32, skip=adapter.denoiser_components)
    for record in ds.records:
        tensors = ds.load(record, verify=True)
        assert tensors[FIRST_FRAME].dtype == torch.uint8 and tuple(tensors[FIRST_FRAME].shape) == (32, 32, 3)
        again = adapter.encode_images(pipe, [tensors[FIRST_FRAME].numpy()], record.num_frames)
        assert torch.equal(tensors[IMAGE_LATENTS], again[IMAGE_LATENTS][0])  # what the pipeline builds, exactly
        assert torch.equal(tensors[IMAGE_EMBEDS], again[IMAGE_EMBEDS][0])
        assert tensors[IMAGE_LATENTS].shape == tensors["latents"].shape


def test_train_generate_evaluate(flow: dict[str, Path], tiny_wan_lora: Path, capsys: pytest.CaptureFixture) -> None:
    root = flow["root"]
    cfg = quick_config(
        flow["model"],
        flow["data"],
        root / "lora",
        "resolution.height=32",
        "resolution.width=32",
        "model.family=null",
        "train.steps=3",
        "schedule.warmup_steps=0",
        "logging.tensorboard=false",
        "train.consistency_weight=0.1",
        "train.caption_dropout=0.5",
        "validation.every=3",
        'validation.sample_prompts=["a red circle moves right"]',
        "validation.sample_steps=2",
        "radial.block_size=4",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    meta = read_lora_metadata(root / "lora")
    assert meta["family"] == "wan-i2v" and meta["task"] == "i2v"
    assert len(list((root / "lora" / "samples").rglob("*.mp4"))) == 1
    assert (root / "lora" / "comfyui_lora.safetensors").is_file()  # Wan's block names: the T2V key map

    # The stock pipeline loads the LoRA with load_lora_weights, and it changes the video.
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(flow["model"], torch_dtype=torch.float32)
    image = Image.fromarray(
        PreparedDataset(flow["data"]).load(PreparedDataset(flow["data"]).records[0])[FIRST_FRAME].numpy()
    )
    call = dict(
        prompt="a red circle",
        image=image,
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
    )
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(root / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    assert not torch.allclose(before, after)

    # generate --image: the sidecar names the image and its pixels' sha256.
    image.save(root / "first.png")
    first = str(root / "first.png")
    sizes = ["--height", "32", "--width", "32", "--steps", "2"]
    base = ["generate", "--model", str(flow["model"]), "--frames", "9", *sizes]
    lora = ["--lora", str(root / "lora")]
    assert main([*base, *lora, "--prompt", "a red circle", "--image", first, "--out", str(root / "gen")]) == 0
    (sidecar,) = (root / "gen").glob("*.json")
    settings = json.loads(sidecar.read_text())["settings"]
    assert settings["image"] == first and len(settings["image_sha256"]) == 64
    capsys.readouterr()
    # No image, or a text-to-video LoRA on this image-to-video model: one line each, exit 2.
    assert main([*base, "--prompt", "a red circle", "--out", str(root / "gen2")]) == 2
    assert "generates from an image: pass --image" in capsys.readouterr().err
    t2v_lora = ["--lora", str(tiny_wan_lora)]
    assert main([*base, *t2v_lora, "--prompt", "x", "--image", first, "--out", str(root / "gen3")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("radial-lora")]
    assert len(err) == 1 and "trained for the wan family (t2v), this model is wan-i2v (i2v)" in err[0]
    # a last frame for a model that starts from a first frame only
    assert main([*base, "--prompt", "x", "--image", first, "--last-image", first, "--out", str(root / "gen4")]) == 2
    assert "starts from a first frame only; drop --last-image" in capsys.readouterr().err

    # evaluate --dataset: the held-out clips' captions and first frames; real clips and motion per length.
    evaluate = ["evaluate", "--model", str(flow["model"]), *lora, "--lengths", "9,17", *sizes]
    evaluate += ["--dataset", str(flow["data"]), "--heldout-max-clips", "2", "--variants", "lora_radial"]
    assert main([*evaluate, "--block-size", "4", "--out", str(root / "eval")]) == 0
    results = json.loads((root / "eval" / "results.json").read_text())
    records = PreparedDataset(flow["data"]).buckets[17][:2]
    assert results["prompts"] == [r.caption for r in records]
    assert set(results["real"]) == {"9", "17"} and set(results["motion_ratio"]["lora_radial"]) == {"9", "17"}
    video = json.loads(next((root / "eval" / "videos").glob("lora_radial_f0017_p00.json")).read_text())
    first = PreparedDataset(flow["data"]).load(records[0])[FIRST_FRAME].numpy()
    assert video["settings"]["image_sha256"] == __import__("hashlib").sha256(first.tobytes()).hexdigest()


def test_ti2v_image_mode_prepares_and_trains(tmp_path: Path, flow: dict[str, Path]) -> None:
    """Wan2.2-TI2V-5B given an image (expand_timesteps): one latent frame of image conditioning per clip, a
    dataset validate accepts, two training steps with a finite loss, a LoRA recorded as wan22-i2v."""
    from radial_lora.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("wan22-i2v", tmp_path / "ti2v", expand_timesteps=True)
    opts = PrepareOptions(
        input=flow["root"] / "videos", out=tmp_path / "data", model=str(model), lengths=(9, 17), height=32, width=32
    )
    prepare_dataset(opts)
    ds = PreparedDataset(tmp_path / "data")
    tensors = ds.load(ds.buckets[17][0])
    assert tensors[IMAGE_LATENTS].shape[1] == 1 and tensors["latents"].shape[1] == 5
    assert validate_dataset(tmp_path / "data").ok
    cfg = quick_config(
        model,
        tmp_path / "data",
        tmp_path / "lora",
        "resolution.height=32",
        "resolution.width=32",
        "model.family=null",
        "train.steps=2",
        "schedule.warmup_steps=0",
        "logging.tensorboard=false",
        "checkpoint.every=0",
        "validation.every=0",
        "radial.block_size=4",
    )
    result = trainer.train(cfg)
    assert all(np.isfinite(result.losses)) and read_lora_metadata(tmp_path / "lora")["family"] == "wan22-i2v"


def test_first_last_frame_model(tmp_path: Path, flow: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """Wan2.1-FLF2V (WanImageToVideoPipeline with last_image): data prepare keeps each clip's last frame and builds
    the condition from both frames, exactly as encode_images does; train refuses the consistency term (no
    base-length clip inside a longer one) in one line and trains without it; generate takes --image and
    --last-image (and refuses a missing one); evaluate conditions on the held-out clips' first and last frames."""
    from radial_lora.constants import LAST_FRAME
    from radial_lora.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("wan-i2v", tmp_path / "flf2v", first_last=True)
    opts = PrepareOptions(
        input=flow["root"] / "videos", out=tmp_path / "data", model=str(model), lengths=(9, 17), height=32, width=32
    )
    prepare_dataset(opts)
    assert validate_dataset(tmp_path / "data").ok
    ds = PreparedDataset(tmp_path / "data")
    adapter = get_adapter("wan-i2v")
    pipe = adapter.load_pipeline(model, torch.float32, skip=adapter.denoiser_components)
    short, long = ds.buckets[9][0], next(r for r in ds.buckets[17] if r.source == ds.buckets[9][0].source)
    for record in (short, long):
        t = ds.load(record)
        again = adapter.encode_images(pipe, [t[FIRST_FRAME].numpy()], record.num_frames, [t[LAST_FRAME].numpy()])
        assert torch.equal(t[IMAGE_LATENTS], again[IMAGE_LATENTS][0]) and torch.equal(
            t[IMAGE_EMBEDS], again[IMAGE_EMBEDS][0]
        )
    assert not torch.equal(ds.load(short)[LAST_FRAME], ds.load(long)[LAST_FRAME])  # the last frame moves with length
    assert ds.image_condition(long).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="needs each video's last frame"):
        adapter.encode_images(pipe, [ds.load(short)[FIRST_FRAME].numpy()], 9)

    common = ["resolution.height=32", "resolution.width=32", "model.family=null", "train.steps=2"]
    common += ["schedule.warmup_steps=0", "logging.tensorboard=false", "checkpoint.every=0", "radial.block_size=4"]
    with pytest.raises(ValueError, match="first-last-frame model"):
        trainer.train(quick_config(model, tmp_path / "data", tmp_path / "c", *common, "train.consistency_weight=0.1"))
    cfg = quick_config(
        model,
        tmp_path / "data",
        tmp_path / "lora",
        *common,
        "train.consistency_weight=0",
        "validation.every=2",
        'validation.sample_prompts=["a red circle"]',
        "validation.sample_steps=2",
    )
    result = trainer.train(cfg)
    assert all(np.isfinite(result.losses)) and len(list((tmp_path / "lora" / "samples").rglob("*.mp4"))) == 1

    first, last = (Image.fromarray(ds.image_condition(long)[i]) for i in (0, 1))
    first.save(tmp_path / "first.png")
    last.save(tmp_path / "last.png")
    base = ["generate", "--model", str(model), "--frames", "9", "--height", "32", "--width", "32", "--steps", "2"]
    base += ["--lora", str(tmp_path / "lora"), "--prompt", "a red circle", "--image", str(tmp_path / "first.png")]
    assert main([*base, "--last-image", str(tmp_path / "last.png"), "--out", str(tmp_path / "gen")]) == 0
    (sidecar,) = (tmp_path / "gen").glob("*.json")
    settings = json.loads(sidecar.read_text())["settings"]
    assert settings["last_image"] == str(tmp_path / "last.png") and len(settings["last_image_sha256"]) == 64
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "gen2")]) == 2
    assert "generates between two frames: pass --last-image" in capsys.readouterr().err
    evaluate = ["evaluate", "--model", str(model), "--lora", str(tmp_path / "lora"), "--lengths", "9,17"]
    evaluate += ["--height", "32", "--width", "32", "--steps", "2", "--dataset", str(tmp_path / "data")]
    evaluate += ["--heldout-max-clips", "1", "--variants", "lora_radial", "--block-size", "4"]
    assert main([*evaluate, "--out", str(tmp_path / "eval")]) == 0
    (video,) = (tmp_path / "eval" / "videos").glob("lora_radial_f0017_p00.json")
    held = ds.image_condition(ds.buckets[17][0])
    assert (
        json.loads(video.read_text())["settings"]["last_image_sha256"]
        == __import__("hashlib").sha256(held[1].tobytes()).hexdigest()
    )
