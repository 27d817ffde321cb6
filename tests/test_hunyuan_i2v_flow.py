"""HunyuanVideo-I2V, the whole job on tiny HunyuanVideoImageToVideoPipelines of the real classes (a Llava text
encoder that reads the image): data prepare caches each clip's image latents and its image-and-prompt text,
train runs with caption dropout, the consistency term and a sample video, the LoRA loads into the stock
pipeline and changes its video, generate takes --image, evaluate conditions on the held-out first frames."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radial_lora.cli import main
from radial_lora.constants import FIRST_FRAME, IMAGE_LATENTS
from radial_lora.data.dataset import PreparedDataset
from radial_lora.data.prepare import PrepareOptions, prepare_dataset
from radial_lora.data.sample import write_sample_dataset
from radial_lora.data.validate import validate_dataset
from radial_lora.lora import read_lora_metadata
from radial_lora.models import get_adapter
from radial_lora.train import trainer
from tiny_config import quick_config

pytestmark = pytest.mark.slow
TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")


def _prepare(root: Path, kind: str) -> tuple[Path, Path]:
    from radial_lora.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("hunyuan-i2v", root / "model", image_condition_type=kind)
    if not (root.parent / "videos").is_dir():
        write_sample_dataset(root.parent / "videos", num_videos=4, num_frames=20, size=(32, 32), fps=16, seed=0)
    opts = PrepareOptions(
        input=root.parent / "videos", out=root / "data", model=str(model), lengths=(9, 17), height=32, width=32
    )
    prepare_dataset(opts)  # no family: read from the folder's model_index.json
    return model, root / "data"


def _train(model: Path, data: Path, out: Path, *extra: str) -> trainer.TrainResult:
    cfg = quick_config(
        model,
        data,
        out,
        "resolution.height=32",
        "resolution.width=32",
        "model.family=null",
        "schedule.warmup_steps=0",
        "logging.tensorboard=false",
        "radial.block_size=4",
        *extra,
    )
    return trainer.train(cfg)


@pytest.fixture(scope="module")
def concat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hyi2v") / "concat"
    model, data = _prepare(root, "latent_concat")
    return {"root": root, "model": model, "data": data}


def test_prepare_caches_the_image_and_the_text_that_reads_it(concat: dict[str, Path]) -> None:
    ds = PreparedDataset(concat["data"])
    assert ds.info["family"] == "hunyuan-i2v" and ds.info["task"] == "i2v"
    assert ds.info["text_keys"] == sorted(TEXT_KEYS) and ds.info["image_keys"] == sorted([IMAGE_LATENTS, FIRST_FRAME])
    report = validate_dataset(concat["data"])
    assert report.ok and not report.warnings, report.format()
    adapter = get_adapter("hunyuan-i2v")
    pipe = adapter.load_pipeline(concat["model"], torch.float32, skip=adapter.denoiser_components)
    texts = {}
    for record in ds.records:
        tensors = ds.load(record, verify=True)
        first = [tensors[FIRST_FRAME].numpy()]
        again = adapter.encode_images(pipe, first, record.num_frames)
        again |= adapter.encode_prompts_with_images(pipe, [record.caption], first)
        for key in (IMAGE_LATENTS, *TEXT_KEYS):  # what the pipeline builds, exactly (no transformer loaded)
            assert torch.equal(tensors[key], again[key][0].to(tensors[key].dtype)), key
        assert tensors[IMAGE_LATENTS].shape == tensors["latents"].shape
        texts.setdefault(record.source, []).append(tensors["encoder_hidden_states"])
    first, second = list(texts.values())[:2]
    assert torch.equal(first[0], first[1])  # one source's clips of both lengths: the same frame and caption
    assert not torch.equal(first[0], second[0])  # each source's text has its own image in it
    null = ds.null_text()
    assert torch.equal(null["encoder_hidden_states"], adapter.encode_prompts(pipe, [""])["encoder_hidden_states"][0])


def test_train_generate_evaluate(concat: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    root = concat["root"]
    result = _train(
        concat["model"],
        concat["data"],
        root / "lora",
        "train.steps=3",
        "train.consistency_weight=0.1",
        "train.caption_dropout=0.5",
        "validation.every=3",
        'validation.sample_prompts=["a red circle moves right"]',
        "validation.sample_steps=2",
    )
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    meta = read_lora_metadata(root / "lora")
    assert meta["family"] == "hunyuan-i2v" and meta["task"] == "i2v"
    assert len(list((root / "lora" / "samples").rglob("*.mp4"))) == 1
    assert (root / "lora" / "comfyui_lora.safetensors").is_file()  # HunyuanVideo's block names

    # The stock pipeline loads the LoRA with load_lora_weights, and it changes the video.
    from diffusers import HunyuanVideoImageToVideoPipeline

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(concat["model"], torch_dtype=torch.float32)
    ds = PreparedDataset(concat["data"])
    image = Image.fromarray(ds.load(ds.records[0])[FIRST_FRAME].numpy())
    call = dict(prompt="a red circle", image=image, num_frames=9, height=32, width=32, num_inference_steps=2)
    before = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    pipe.load_lora_weights(str(root / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert not torch.allclose(before, after)

    args = ["--model", str(concat["model"]), "--height", "32", "--width", "32", "--steps", "2"]
    gen = ["generate", *args, "--frames", "9", "--lora", str(root / "lora"), "--prompt", "a red circle"]
    capsys.readouterr()
    assert main([*gen, "--out", str(root / "gen")]) == 2  # no image: one line saying what to pass
    assert "generates from an image: pass --image" in capsys.readouterr().err

    # evaluate renders through generate, each video from a held-out clip's first frame (its sidecar says which)
    evaluate = ["evaluate", *args, "--lora", str(root / "lora"), "--lengths", "9,17", "--block-size", "4"]
    evaluate += ["--dataset", str(concat["data"]), "--heldout-max-clips", "1", "--variants", "lora_radial"]
    assert main([*evaluate, "--out", str(root / "eval")]) == 0
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["family"] == "hunyuan-i2v" and set(results["real"]) == {"9", "17"}
    assert set(results["motion_ratio"]["lora_radial"]) == {"9", "17"}
    assert all(c["heldout_loss"] is None or np.isfinite(c["heldout_loss"]) for c in results["cells"])
    video = json.loads((root / "eval" / "videos" / "lora_radial_f0017_p00.json").read_text())
    held = np.asarray(ds.image_condition(ds.buckets[17][0]))
    assert video["settings"]["image_sha256"] == hashlib.sha256(held.tobytes()).hexdigest()


def test_token_replace_prepares_and_trains(concat: dict[str, Path]) -> None:
    """HunyuanVideo-I2V's token-replace layout: one latent frame of image per clip, its image tokens a quarter of
    576 in the text; a dataset validate accepts and two training steps with a finite loss."""
    root = concat["root"].parent / "replace"
    model, data = _prepare(root, "token_replace")
    ds = PreparedDataset(data)
    tensors = ds.load(ds.buckets[17][0])
    assert tensors[IMAGE_LATENTS].shape[1] == 1 and tensors["latents"].shape[1] == 5
    assert tensors["encoder_hidden_states"].shape[0] == 576 // 4 + 256 - 4
    assert validate_dataset(data).ok
    result = _train(model, data, root / "lora", "train.steps=2", "checkpoint.every=0", "validation.every=0")
    assert all(np.isfinite(result.losses)) and read_lora_metadata(root / "lora")["family"] == "hunyuan-i2v"
