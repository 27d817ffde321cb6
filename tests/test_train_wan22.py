"""Wan2.2 A14B expert LoRAs on the tiny two-expert pipeline: train one expert, load it into that expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from radial_lora import lora
from radial_lora.inference.generate import set_loras
from radial_lora.models import get_adapter
from radial_lora.models.wan import WanAdapter
from radial_lora.train import config as train_config
from radial_lora.train import trainer
from radial_lora.train.config import ConfigError
from tiny_config import quick_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wan22_dataset(tiny_wan22_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sample videos prepared for the tiny Wan2.2 pipeline, buckets of 9 and 17 frames at 64x64."""
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("wan22_dataset")
    write_sample_dataset(root / "videos", num_videos=3, num_frames=20, size=(64, 64), fps=16, seed=2)
    prepare_dataset(
        PrepareOptions(
            input=root / "videos",
            out=root / "ds",
            model=str(tiny_wan22_dir),
            family="wan22",
            lengths=(9, 17),
            height=64,
            width=64,
            fps=16,
            dtype="float32",
        )
    )
    return root / "ds"


def _cfg(model: Path, data: Path, out: Path, *extra: str) -> train_config.TrainConfig:
    common = [
        "train.steps=3",
        "train.batch_size=2",
        "data.holdout=0.0",
        "checkpoint.every=0",
        "validation.every=0",
        "logging.tensorboard=false",
        "optimizer.lr=5e-3",
        "schedule.warmup_steps=0",
    ]
    return quick_config(model, data, out, *common, *extra)


def _spy_predict(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Record (transformer, timesteps) of every forward the trainer makes."""
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []
    real = WanAdapter.predict

    def spy(
        self: WanAdapter,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        calls.append((transformer, timesteps.detach().clone()))
        return real(self, transformer, latents, timesteps, text)

    monkeypatch.setattr(WanAdapter, "predict", spy)
    return calls


def _lora_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if "lora_" in n]


def _latents(pipe: DiffusionPipeline) -> torch.Tensor:
    """A short denoising run: its 4 steps cross the 875 boundary, so both experts run."""
    return pipe(
        "a red square moving",
        num_frames=9,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_low_expert_lora_trains_transformer_2_and_loads_there(
    tiny_wan22_dir: Path, wan22_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_wan22_dir)
    adapter = get_adapter("wan22")
    boundary = adapter.boundary_timestep(pipe)
    assert boundary == 875.0
    high_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    calls = _spy_predict(monkeypatch)
    out = tmp_path / "low"
    sampling = ('validation.sample_prompts=["a red square moving"]', "validation.sample_steps=4")
    result = trainer.train(
        _cfg(tiny_wan22_dir, wan22_dataset, out, "model.family=wan22", "model.expert=low", *sampling), pipe=pipe
    )
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # Only the low-noise expert ran, and only at the timesteps WanPipeline gives it.
    assert calls and all(tr is pipe.transformer_2 for tr, _ in calls)
    ts = torch.cat([t for _, t in calls])
    assert ts.max() < boundary and ts.min() > 0
    # Only transformer_2 got (and trained) LoRA weights; the high-noise expert is untouched.
    assert not _lora_names(pipe.transformer)
    assert all(torch.equal(v, high_before[k]) for k, v in pipe.transformer.state_dict().items())
    trained = {n: p.detach().clone() for n, p in pipe.transformer_2.named_parameters() if "lora_B" in n}
    assert trained and all(p.abs().max() > 0 for p in trained.values())
    meta = lora.read_lora_metadata(out)
    assert meta["family"] == "wan22" and meta["expert"] == "low"
    # The last-step sample ran the whole two-expert pipeline: the base high expert, then the trained low one.
    (sidecar,) = (out / "samples" / "step_000003").glob("f17_000_*.json")
    info = json.loads(sidecar.read_text())
    assert info["settings"]["expert"] == "low" and info["attention"]["calls"]["sparse"] > 0
    assert sidecar.with_suffix(".mp4").is_file()
    assert meta["expert_timesteps"][0] == 0.0 and meta["expert_timesteps"][1] < boundary

    # generate's loader puts it into the stock pipeline's transformer_2, and the video changes.
    stock = DiffusionPipeline.from_pretrained(tiny_wan22_dir)
    stock.set_progress_bar_config(disable=True)
    base = _latents(stock)
    names = set_loras(stock, [(str(out), 1.0)])
    assert stock.get_list_adapters() == {"transformer_2": names}
    loaded = {
        n.replace(f".{names[0]}.", ".default."): p for n, p in stock.transformer_2.named_parameters() if "lora_B" in n
    }
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    with_lora = _latents(stock)
    assert (with_lora - base).abs().max() > 1e-4
    set_loras(stock, [])  # disabled again: back to the base video
    torch.testing.assert_close(_latents(stock), base)


def test_wan22_defaults_to_the_high_expert(
    tiny_wan22_dir: Path, wan22_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_wan22_dir)
    calls = _spy_predict(monkeypatch)
    out = tmp_path / "high"
    trainer.train(_cfg(tiny_wan22_dir, wan22_dataset, out, "model.family=null", "train.steps=2"), pipe=pipe)
    assert calls and all(tr is pipe.transformer for tr, _ in calls)
    assert torch.cat([t for _, t in calls]).min() >= 875.0
    assert _lora_names(pipe.transformer) and not _lora_names(pipe.transformer_2)
    assert lora.read_lora_metadata(out)["expert"] == "high"
    stock = DiffusionPipeline.from_pretrained(tiny_wan22_dir)
    names = set_loras(stock, [(str(out), 1.0)])
    assert stock.get_list_adapters() == {"transformer": names}


def test_expert_errors_name_the_key(
    tiny_wan_dir: Path, tiny_wan22_dir: Path, wan22_dataset: Path, tmp_path: Path
) -> None:
    # The family is auto-detected as plain Wan: one transformer, no expert to choose.
    cfg = _cfg(tiny_wan_dir, wan22_dataset, tmp_path / "x", "model.family=null", "model.expert=low")
    with pytest.raises(ConfigError, match="model.expert: 'low' is only for model.family 'wan22'"):
        trainer.train(cfg)
    with pytest.raises(ConfigError, match="model.expert"):
        _cfg(tiny_wan22_dir, wan22_dataset, tmp_path / "y", "model.family=wan22", "model.expert=mid")
    # A low-noise LoRA cannot go into a pipeline without transformer_2.
    wan = DiffusionPipeline.from_pretrained(tiny_wan_dir)
    lora.add_lora(wan.transformer, rank=2)
    lora.save_lora(tmp_path / "l", wan.transformer, {"family": "wan22", "expert": "low"})
    with pytest.raises(ValueError, match="low-noise expert"):
        set_loras(DiffusionPipeline.from_pretrained(tiny_wan_dir), [(str(tmp_path / "l"), 1.0)])
