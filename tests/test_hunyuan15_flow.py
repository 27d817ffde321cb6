"""HunyuanVideo 1.5 text-to-video, the whole job on a tiny HunyuanVideo15Pipeline of the real classes: data
prepare caches both text encoders' outputs per clip (Qwen2.5-VL and the ByT5 glyph encoder), train runs with
sample videos and the ComfyUI export, the LoRA loads into the stock pipeline through
``transformer.load_lora_adapter`` (the pipeline has no ``load_lora_weights``) and changes its video, generate
sets guidance through the pipeline's guider, evaluate runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radial_lora.cli import main
from radial_lora.data.dataset import PreparedDataset
from radial_lora.data.prepare import PrepareOptions, prepare_dataset
from radial_lora.data.sample import write_sample_dataset
from radial_lora.data.video_io import read_video
from radial_lora.lora import LORA_FILENAME, read_lora_metadata
from radial_lora.models import apply_radial_attention, build_tiny_pipeline, detect_family, get_adapter
from radial_lora.train import trainer
from tiny_config import quick_config

pytestmark = pytest.mark.slow
SIZE = 64  # the 16x VAE: 4 x 4 latent tokens per frame (patch 1)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from radial_lora.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("hy15")
    model = save_tiny_pipeline("hunyuan15", root / "model")
    write_sample_dataset(root / "videos", num_videos=3, num_frames=20, size=(SIZE, SIZE), fps=16, seed=0)
    opts = PrepareOptions(
        input=root / "videos", out=root / "data", model=str(model), lengths=(9, 17), height=SIZE, width=SIZE
    )
    prepare_dataset(opts)  # no family: read from the folder's model_index.json
    return {"root": root, "model": model, "data": root / "data"}


def test_the_adapter_feeds_the_transformer_what_the_pipeline_does() -> None:
    """``predict`` on the adapter's text encoding equals the stock pipeline's first transformer call, bit for
    bit (both encoders, zero condition latents and image embeddings), and radial attention forced dense
    changes nothing."""
    pipe = build_tiny_pipeline("hunyuan15")
    adapter = get_adapter("hunyuan15")
    seen = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: tuple) -> None:
        seen.setdefault("x", (kwargs, out[0]))

    pipe.transformer.register_forward_hook(record, with_kwargs=True)
    pipe.guider.guidance_scale = 1.0  # one conditional pass
    pipe(prompt='a sign "hi"', num_frames=9, height=SIZE, width=SIZE, num_inference_steps=1, output_type="latent")
    kwargs, want = seen["x"]
    text = adapter.encode_prompts(pipe, ['a sign "hi"'])
    assert text["encoder_attention_mask_2"].sum() > 0  # the quoted glyph text reached ByT5
    latents = kwargs["hidden_states"][:, : pipe.transformer.config.out_channels]
    with torch.no_grad():
        got = adapter.predict(pipe.transformer, latents, kwargs["timestep"], text)
        assert torch.equal(got, want)
        controller = apply_radial_attention(pipe, block_size=4, backend="reference")
        with controller.force_dense():
            assert torch.equal(adapter.predict(pipe.transformer, latents, kwargs["timestep"], text), want)
    assert detect_family(pipe.transformer) == "hunyuan15"


def test_prepare_train_generate_evaluate(flow: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from diffusers import HunyuanVideo15Pipeline

    root = flow["root"]
    ds = PreparedDataset(flow["data"])
    assert ds.info["family"] == "hunyuan15"
    tensors = ds.load(ds.records[0], verify=True)
    assert {"encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2"} <= set(tensors)
    cfg = quick_config(
        flow["model"],
        flow["data"],
        root / "lora",
        f"resolution.height={SIZE}",
        f"resolution.width={SIZE}",
        "model.family=null",
        "train.steps=2",
        "schedule.warmup_steps=0",
        "logging.tensorboard=false",
        "validation.every=2",
        'validation.sample_prompts=["a red circle moves right"]',
        "validation.sample_steps=2",
        "radial.block_size=4",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    meta = read_lora_metadata(root / "lora")
    assert meta["family"] == "hunyuan15" and meta["attention"]["decay"] == 0.95 and meta["mlp_ratio"] == 2.0
    assert len(list((root / "lora" / "samples").rglob("*.mp4"))) == 1
    assert (root / "lora" / "comfyui_lora.safetensors").is_file()

    # The stock pipeline: no load_lora_weights; the transformer loads the diffusers-format file.
    pipe = HunyuanVideo15Pipeline.from_pretrained(flow["model"], torch_dtype=torch.float32)
    assert not hasattr(pipe, "load_lora_weights")
    call = dict(prompt="a red circle", num_frames=9, height=SIZE, width=SIZE, num_inference_steps=2)
    before = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    pipe.transformer.load_lora_adapter(str(root / "lora"), weight_name=LORA_FILENAME, prefix="transformer")
    after = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert not torch.allclose(before, after)

    base = ["generate", "--model", str(flow["model"]), "--frames", "9", "--height", str(SIZE), "--width", str(SIZE)]
    base += ["--steps", "2", "--prompt", "a red circle", "--prompt", "a blue square"]
    for guidance, out in (("1.0", "g1"), ("4.0", "g4")):  # --batch-size 2: one per call (the VAE's batch bug)
        args = [
            *base,
            "--guidance",
            guidance,
            "--batch-size",
            "2",
            "--lora",
            str(root / "lora"),
            "--out",
            str(root / out),
        ]
        assert main(args) == 0
    g1, _ = sorted((root / "g1").glob("*.json"))
    g4, _ = sorted((root / "g4").glob("*.json"))
    assert json.loads(g4.read_text())["settings"]["guidance"] == 4.0
    g1_video, g4_video = (read_video(p.with_suffix(".mp4"))[0] for p in (g1, g4))
    assert not np.array_equal(g1_video, g4_video)  # the guider's scale reached the denoising
    capsys.readouterr()
    (root / "prompts.txt").write_text("a red circle\n")

    assert (
        main(
            [
                "evaluate",
                "--model",
                str(flow["model"]),
                "--lora",
                str(root / "lora"),
                "--lengths",
                "9,17",
                "--height",
                str(SIZE),
                "--width",
                str(SIZE),
                "--steps",
                "2",
                "--prompts",
                str(root / "prompts.txt"),
                "--variants",
                "base_radial,lora_radial",
                "--block-size",
                "4",
                "--out",
                str(root / "eval"),
            ]
        )  # fmt: skip
        == 0
    )
    assert json.loads((root / "eval" / "results.json").read_text())["prompts"] == ["a red circle"]


def test_image_to_video_conditioning_is_the_pipelines_bit_for_bit() -> None:
    """``encode_images`` + ``predict`` give the transformer exactly what ``HunyuanVideo15ImageToVideoPipeline``
    gives it (condition latents and mask on channels, SigLIP tokens as image_embeds), and the same output."""
    from PIL import Image

    pipe = build_tiny_pipeline("hunyuan15-i2v")
    adapter = get_adapter("hunyuan15-i2v")
    frame = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    seen = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: tuple) -> None:
        seen.setdefault("x", (kwargs, out[0]))

    pipe.transformer.register_forward_hook(record, with_kwargs=True)
    pipe.guider.guidance_scale = 1.0
    pipe(image=Image.fromarray(frame), prompt="a red ball", num_frames=9, num_inference_steps=1, output_type="latent")
    kwargs, want = seen["x"]
    text = adapter.encode_prompts(pipe, ["a red ball"]) | adapter.encode_images(pipe, [frame], 9)
    channels = pipe.transformer.config.out_channels
    assert torch.equal(kwargs["hidden_states"][:, channels : 2 * channels], text["image_latents"])
    assert torch.equal(kwargs["image_embeds"], text["encoder_hidden_states_image"])
    with torch.no_grad():
        got = adapter.predict(pipe.transformer, kwargs["hidden_states"][:, :channels], kwargs["timestep"], text)
    assert torch.equal(got, want)
    assert detect_family(pipe) == "hunyuan15-i2v" and adapter.size_arguments(pipe, SIZE, SIZE) == {}
    with pytest.raises(ValueError, match="renders an image of 64x32 at its size bucket"):
        adapter.size_arguments(pipe, 32, 64)  # the pipeline takes no size: it must be the image's bucket


def test_image_to_video_prepare_train_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from PIL import Image

    from radial_lora.constants import FIRST_FRAME, IMAGE_EMBEDS, IMAGE_LATENTS
    from radial_lora.data.validate import validate_dataset
    from radial_lora.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("hunyuan15-i2v", tmp_path / "model")
    write_sample_dataset(tmp_path / "videos", num_videos=3, num_frames=20, size=(SIZE, SIZE), fps=16, seed=0)
    prepare_dataset(
        PrepareOptions(
            input=tmp_path / "videos", out=tmp_path / "data", model=str(model), lengths=(9, 17), height=SIZE, width=SIZE
        )
    )
    ds = PreparedDataset(tmp_path / "data")
    assert ds.info["family"] == "hunyuan15-i2v" and ds.info["task"] == "i2v"
    report = validate_dataset(tmp_path / "data")
    assert report.ok, report.format()
    tensors = ds.load(ds.records[0], verify=True)
    assert tensors[IMAGE_LATENTS].shape == tensors["latents"].shape and tensors[IMAGE_EMBEDS].shape == (16, 8)
    assert not tensors[IMAGE_LATENTS][:, 1:].any()  # the image on latent frame 0 only
    cfg = quick_config(
        model,
        tmp_path / "data",
        tmp_path / "lora",
        f"resolution.height={SIZE}",
        f"resolution.width={SIZE}",
        "model.family=null",
        "train.steps=2",
        "schedule.warmup_steps=0",
        "logging.tensorboard=false",
        "train.consistency_weight=0.1",
        "validation.every=2",
        'validation.sample_prompts=["a red circle moves right"]',
        "validation.sample_steps=2",
        "radial.block_size=4",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert read_lora_metadata(tmp_path / "lora")["task"] == "i2v"
    assert len(list((tmp_path / "lora" / "samples").rglob("*.mp4"))) == 1

    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(model, torch_dtype=torch.float32)
    image = Image.fromarray(tensors[FIRST_FRAME].numpy())
    call = dict(image=image, prompt="a red circle", num_frames=9, num_inference_steps=2, output_type="latent")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    pipe.transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name=LORA_FILENAME, prefix="transformer")
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    assert not torch.allclose(before, after)

    image.save(tmp_path / "first.png")
    base = ["generate", "--model", str(model), "--frames", "9", "--height", str(SIZE), "--width", str(SIZE)]
    base += ["--steps", "2", "--prompt", "a red circle", "--lora", str(tmp_path / "lora")]
    assert main([*base, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "gen")]) == 0
    (sidecar,) = (tmp_path / "gen").glob("*.json")
    assert json.loads(sidecar.read_text())["settings"]["image"] == str(tmp_path / "first.png")
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "gen2")]) == 2  # no image: one line
    assert "generates from an image: pass --image" in capsys.readouterr().err
    evaluate = ["evaluate", "--model", str(model), "--lora", str(tmp_path / "lora"), "--lengths", "9,17"]
    evaluate += ["--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--dataset", str(tmp_path / "data")]
    evaluate += ["--heldout-max-clips", "1", "--variants", "lora_radial", "--block-size", "4"]
    assert main([*evaluate, "--out", str(tmp_path / "eval")]) == 0  # conditioned on the held-out first frames
    assert set(json.loads((tmp_path / "eval" / "results.json").read_text())["real"]) == {"9", "17"}
