"""End-to-end training on the tiny Wan model and a prepared sample dataset (CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from launch import torchrun_train
from radial_lora import lora
from radial_lora.data.dataset import PreparedDataset
from radial_lora.data.video_io import read_video
from radial_lora.locks import EXIT_BUSY, LOCK_NAME
from radial_lora.models.registry import get_adapter
from radial_lora.train import checkpoint as ckpt
from radial_lora.train import trainer
from radial_lora.train.components import LOG_FILE
from radial_lora.train.flow_matching import heldout_loss
from tiny_config import THREE_STEPS_CHECKPOINTED, quick_config

SAMPLING = ('validation.sample_prompts=["a red fox in snow"]', "validation.sample_steps=2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


_cfg = quick_config


def _train_clips_loss(model_dir: Path, dataset: Path, lora_dir: Path | None) -> float:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    ds = PreparedDataset(dataset)
    return heldout_loss(get_adapter("wan"), pipe.transformer, ds.records, timesteps=(500,), dataset=ds).mean


def test_quick_config_trains_and_loss_goes_down(tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_wan_dir,
        tiny_wan_dataset,
        out,
        "train.steps=16",
        "checkpoint.every=5",
        "validation.every=8",
        "validation.max_clips=2",
        "validation.timesteps=[500]",
        "optimizer.lr=5e-3",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 16 and result.last_step == 16
    assert result.heldout is not None and set(result.heldout["per_bucket"]) == {"9", "17"}
    # The LoRA, loaded by the stock pipeline, fits the (fixed-noise) training clips better than the base model.
    before = _train_clips_loss(tiny_wan_dir, tiny_wan_dataset, None)
    after = _train_clips_loss(tiny_wan_dir, tiny_wan_dataset, out)
    assert after < 0.97 * before, (before, after)
    meta = lora.read_lora_metadata(out)
    assert meta["family"] == "wan" and meta["trained_lengths"] == [9, 17] and meta["steps"] == 16
    assert meta["attention"] == {"pattern": "radial", "decay": 0.2, "block_size": 16, "dense_layers": 1}
    assert meta["rank"] == 8 and meta["base_length"] == 9
    comfy = load_file(out / lora.COMFYUI_FILENAME)
    assert any(k.startswith("diffusion_model.blocks.0.self_attn.q.") for k in comfy)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [15, 16]  # keep_last 2
    log = (out / LOG_FILE).read_text()
    assert "step 16/16" in log and "without text_encoder, tokenizer, vae" in log  # training loads no encoders
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "losses.json").read_text()) == result.losses


def test_nan_stops_and_resume_reproduces_uninterrupted_run(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = (
        "train.steps=8",
        "checkpoint.every=3",
        "validation.every=0",
        "logging.tensorboard=false",
        "lora.dropout=0.1",
        "schedule.warmup_steps=2",
    )
    reference = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "a", *extra))

    cfg = _cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "b", *extra)
    real_loss, calls = trainer.fm.flow_matching_loss, {"n": 0}

    def poisoned(pred, x0, noise, given=0):
        calls["n"] += 1
        loss = real_loss(pred, x0, noise, given)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(trainer.fm, "flow_matching_loss", poisoned)
    with pytest.raises(trainer.TrainingDiverged, match="step 7") as err:
        trainer.train(cfg)
    assert "step_000006" in str(err.value)
    ids = {r.id for r in PreparedDataset(tiny_wan_dataset).records}
    named = re.search(r"clips ([^)]*)\)", str(err.value)).group(1).split(", ")
    assert len(named) == cfg.train.batch_size and set(named) <= ids  # the step's clips, by id
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3, 6]
    assert not (tmp_path / "b" / lora.LORA_FILENAME).exists()
    monkeypatch.setattr(trainer.fm, "flow_matching_loss", real_loss)

    resumed = trainer.train(cfg, resume="latest")
    assert resumed.losses == reference.losses  # bit-identical curve, steps 1..8
    a, b = load_file(tmp_path / "a" / lora.LORA_FILENAME), load_file(tmp_path / "b" / lora.LORA_FILENAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The two-process runs below are compared with one process doing the same per-forward work: one sample per
# forward, two forwards per optimizer step (one process: 2 accumulation steps; two: 1 each). Each gradient is
# then a sum of the same two terms (g1/2 + g2/2 against (g1 + g2)/2, exact for powers of two), so losses and
# weights must agree bit for bit: a difference is a bug, not rounding.
ONE_PROCESS = ("train.batch_size=2", "train.grad_accum=2")
TWO_PROCESSES = ("train.batch_size=2", "train.grad_accum=1")


def _assert_same_lora(one: Path, two: Path) -> None:
    a, b = load_file(one / lora.LORA_FILENAME), load_file(two / lora.LORA_FILENAME)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} LoRA tensors differ, e.g. {differ[0]}"


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    common = [
        "train.steps=3",
        "schedule.warmup_steps=0",
        "checkpoint.every=0",
        "validation.every=0",
        "logging.tensorboard=false",
        "train.consistency_weight=0.0",
    ]
    single = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "one", *common, *ONE_PROCESS))
    cfg = _cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "two", *common, *TWO_PROCESSES, *SAMPLING)  # main samples
    torchrun_train(cfg.to_dict(), tmp_path / "ddp.json")
    assert "2 procs = 2 data x 1 sequence; 1 micro x 1 accum" in (tmp_path / "two" / LOG_FILE).read_text()
    assert [p.name for p in (tmp_path / "two" / "samples").iterdir()] == ["step_000003"]  # the last step only
    assert len(list((tmp_path / "two" / "samples" / "step_000003").glob("f17_000_*.mp4"))) == 1
    assert json.loads((tmp_path / "two" / "losses.json").read_text()) == single.losses
    _assert_same_lora(tmp_path / "one", tmp_path / "two")


def test_gradient_checkpointing_and_dense_pattern_run(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    common = ("train.steps=2", "checkpoint.every=0", "validation.every=0", "logging.tensorboard=false")
    plain = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "a", *common))
    gc = trainer.train(
        _cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "b", *common, "train.gradient_checkpointing=true")
    )
    torch.testing.assert_close(torch.tensor(gc.losses), torch.tensor(plain.losses), rtol=1e-6, atol=1e-7)
    dense = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "c", *common, "radial.pattern=dense"))
    assert dense.losses[0] != plain.losses[0]  # the radial mask really changes the 17-frame attention
    assert lora.read_lora_metadata(tmp_path / "c")["attention"]["pattern"] == "dense"


def test_consistency_reference_is_the_frozen_dense_base_model() -> None:
    """Inside the trainer's base-model context: LoRA off, dense attention, no graph - the stock model."""
    from radial_lora.models.radial import apply_radial_attention
    from radial_lora.models.tiny import build_tiny_pipeline

    stock = build_tiny_pipeline("wan").transformer
    tr = build_tiny_pipeline("wan").transformer
    params = lora.add_lora(tr, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    ctrl = apply_radial_attention(tr, dense_layers=0, block_size=4)
    gen = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 5, 8, 8, generator=gen), torch.randn(1, 6, 32, generator=gen)
    t = torch.tensor([400.0])
    with torch.no_grad():
        want = stock(x, t, e, return_dict=False)[0]
    with trainer._base_model(tr, ctrl), ctrl.training_mode():
        base = tr(x, t, e, return_dict=False)[0]
        assert not base.requires_grad
    torch.testing.assert_close(base, want, rtol=1e-5, atol=1e-6)
    with ctrl.training_mode():
        adapted = tr(x, t, e, return_dict=False)[0]
    assert adapted.requires_grad and (adapted - want).abs().max() > 1e-3


def test_hunyuan_trains_and_exports(tiny_hunyuan_dir: Path, tmp_path: Path) -> None:
    """The HunyuanVideo path: joint text+video radial attention, stock LoRA loading, fused ComfyUI export."""
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset

    write_sample_dataset(tmp_path / "videos", num_videos=3, num_frames=20, size=(64, 64), fps=16, seed=1)
    prepare_dataset(
        PrepareOptions(
            input=tmp_path / "videos",
            out=tmp_path / "ds",
            model=str(tiny_hunyuan_dir),
            family="hunyuan",
            lengths=(9, 17),
            height=64,
            width=64,
            fps=16,
            dtype="float32",
        )
    )
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_hunyuan_dir,
        tmp_path / "ds",
        out,
        "model.family=hunyuan",
        "train.steps=3",
        "data.holdout=0.0",
        "checkpoint.every=0",
        "validation.every=0",
        "logging.tensorboard=false",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = lora.read_lora_metadata(out)
    assert meta["family"] == "hunyuan" and meta["attention"]["decay"] == 0.95
    pipe = DiffusionPipeline.from_pretrained(tiny_hunyuan_dir)
    keys_before = {n for n, _ in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(out)
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters() if n not in keys_before)
    comfy = load_file(out / lora.COMFYUI_FILENAME)
    hidden, mlp = 32, 64  # tiny: 2 heads x 16, mlp_ratio 2
    assert comfy["diffusion_model.single_blocks.0.linear1.lora_B.weight"].shape[0] == 3 * hidden + mlp


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    """FSDP (base and LoRA sharded over 2 gloo processes): the same losses, LoRA, held-out loss and checkpoint
    as one process, bit for bit, with gradient checkpointing, consistency loss and validation on; a sharded
    checkpoint resumes exactly."""
    common = THREE_STEPS_CHECKPOINTED
    single = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "one", *common, *ONE_PROCESS))
    cfg = _cfg(
        tiny_wan_dir,
        tiny_wan_dataset,
        tmp_path / "two",
        *common,
        *TWO_PROCESSES,
        "train.distributed=fsdp",
        "train.gradient_checkpointing=true",
        *SAMPLING,
    )
    cfg_path = tmp_path / "fsdp.json"
    torchrun_train(cfg.to_dict(), cfg_path)
    log = (tmp_path / "two" / LOG_FILE).read_text()
    assert "2 procs = 2 data x 1 sequence; 1 micro x 1 accum" in log
    here, total = map(int, re.search(r"FSDP: transformer sharded over 2 processes, (\d+) of (\d+)", log).groups())
    assert here <= total // 2 + 1000, (here, total)  # each process holds about half of the base
    # Samples: every process ran the sharded forward, the main one wrote; training was not disturbed.
    for step in (2, 3):
        (video,) = (tmp_path / "two" / "samples" / f"step_{step:06d}").glob("f17_000_*.mp4")
        assert read_video(video)[0].shape == (17, 64, 64, 3)
    heldout = float(re.search(r"step 2 held-out loss ([\d.]+)", log).group(1))
    assert heldout == float(f"{single.heldout['mean']:.6f}")  # the log prints 6 decimals
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert two == single.losses
    _assert_same_lora(tmp_path / "one", tmp_path / "two")
    # The checkpoint holds full (gathered) tensors: the same file layout and numbers as a one-process run.
    opt_one = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_000002")["optimizer"]
    opt_two = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "step_000002")["optimizer"]
    assert opt_one["state"].keys() == opt_two["state"].keys()
    for i, st in opt_one["state"].items():
        assert type(opt_two["state"][i]["exp_avg"]) is torch.Tensor
        assert torch.equal(opt_two["state"][i]["exp_avg"], st["exp_avg"])
        assert torch.equal(opt_two["state"][i]["exp_avg_sq"], st["exp_avg_sq"])
    # Resume the sharded run from step 2: step 3 comes out as in the uninterrupted run.
    resumed = {**cfg.to_dict(), "output_dir": str(tmp_path / "three")}
    torchrun_train(resumed, cfg_path, "--resume", str(tmp_path / "two" / "checkpoints" / "step_000002"))
    assert json.loads((tmp_path / "three" / "losses.json").read_text()) == two
    _assert_same_lora(tmp_path / "two", tmp_path / "three")


@pytest.mark.slow
def test_quick_test_config_is_one_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`radial-lora train --config configs/lora_quick_test.json` on a fresh checkout: it makes its sample data,
    trains to the end, and writes a LoRA that the stock pipeline named in its metadata loads."""
    from radial_lora.cli import main
    from tiny_config import QUICK

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(QUICK)]) == 0
    out = tmp_path / "runs" / "quick" / "lora"
    log = (out / LOG_FILE).read_text()
    assert "has no prepared dataset: writing 8 sample videos" in log and "step 60/60" in log
    assert (tmp_path / "runs" / "quick" / "dataset" / "dataset.json").is_file()
    meta = lora.read_lora_metadata(out)
    assert meta["steps"] == 60 and meta["trained_lengths"] == [17, 33] and meta["base_length"] == 17
    assert meta["base_model_name"] == "builtin:tiny-wan-base" and len(meta["transformer_config_sha256"]) == 64
    pipe = DiffusionPipeline.from_pretrained(meta["base_model"])
    before = {n for n, _ in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(out)
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters() if n not in before)
    # The same command again would train over the finished run: refused, naming the ways on.
    capsys.readouterr()
    assert main(["train", "--config", str(QUICK)]) == 2
    assert "runs/quick/lora already holds a training run" in capsys.readouterr().err
    # A real config stays strict: no dataset is an error that names the command making one.
    other = ["--set", "output_dir=runs/other", "--set", "data.if_missing=error", "--set", "data.path=nowhere"]
    assert main(["train", "--config", str(QUICK), *other]) == 2
    assert "radial-lora data prepare VIDEOS --out nowhere --model builtin:tiny-wan-base" in capsys.readouterr().err


def test_resume_warns_about_settings_that_change_results(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    common = ("checkpoint.every=0", "validation.every=0", "logging.tensorboard=false")
    out = tmp_path / "run"
    trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, "train.steps=2", *common))
    caplog.set_level("WARNING", logger="radial_lora")
    result = trainer.train(
        _cfg(tiny_wan_dir, tiny_wan_dataset, out, "train.steps=3", "optimizer.lr=1e-3", *common), resume="latest"
    )
    assert result.last_step == 3
    warned = [r.getMessage() for r in caplog.records if "resuming with" in r.getMessage()]
    assert len(warned) == 2 and "train.steps = 3" in warned[1] and "used 2" in warned[1]
    assert warned[0].startswith("resuming with optimizer =") and '"lr": 0.001' in warned[0]
    assert json.loads((out / "config.previous.json").read_text())["train"]["steps"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3
    caplog.clear()
    trainer.train(
        _cfg(tiny_wan_dir, tiny_wan_dataset, out, "train.steps=3", "optimizer.lr=1e-3", *common), resume="latest"
    )  # the same settings again: nothing to say
    assert not [r for r in caplog.records if "resuming with" in r.getMessage()]


def test_lora_init_does_not_depend_on_what_was_loaded(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a component whose initialisation draws random numbers (as a text encoder's can) must not change
    the run: the LoRA's initial weights come from train.seed, not from what loading left in the RNG. (The
    quick config's curve changed when training stopped loading the text encoder, before this was so.)"""
    from radial_lora.models.wan import WanAdapter

    common = ("train.steps=3", "checkpoint.every=0", "validation.every=0", "logging.tensorboard=false")
    plain = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "a", *common))
    real = WanAdapter.load_pipeline

    def loading_that_draws(self, *args, **kwargs):
        torch.rand(1000)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WanAdapter, "load_pipeline", loading_that_draws)
    drawn = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "b", *common))
    assert drawn.losses == plain.losses
    _assert_same_lora(tmp_path / "a", tmp_path / "b")


def test_caption_dropout_trains_the_chosen_samples_on_the_empty_caption(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dropped samples (own hash stream, ~p of them) get exactly the dataset's empty-caption tensors, the
    others keep theirs; noise and timesteps do not move; and prepare wrote that embedding with the pipeline."""
    drops = [trainer.caption_dropped(0, step, i, 0.25) for step in range(200) for i in range(4)]
    assert 0.2 < sum(drops) / len(drops) < 0.3 and drops == [
        trainer.caption_dropped(0, step, i, 0.25) for step in range(200) for i in range(4)
    ]
    assert not any(trainer.caption_dropped(0, s, 0, 0.0) for s in range(50))

    ds = PreparedDataset(tiny_wan_dataset)
    null = ds.null_text()
    pipe = DiffusionPipeline.from_pretrained(tiny_wan_dir)
    expected = get_adapter("wan").encode_prompts(pipe, [""])
    assert sorted(null) == sorted(expected)
    assert torch.equal(null["encoder_hidden_states"], expected["encoder_hidden_states"][0])

    seen: list[torch.Tensor] = []
    real_flow_step = trainer.fm.flow_step

    def spy(adapter, model, latents, text, sigmas, noise, *a, **k):
        seen.append(text["encoder_hidden_states"].detach().clone())
        return real_flow_step(adapter, model, latents, text, sigmas, noise, *a, **k)

    monkeypatch.setattr(trainer.fm, "flow_step", spy)
    steps = 6
    cfg = _cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "run", f"train.steps={steps}", "train.caption_dropout=0.5")
    trainer.train(cfg)
    empty = null["encoder_hidden_states"]
    flags = [trainer.caption_dropped(cfg.train.seed, s, i, 0.5) for s in range(1, steps + 1) for i in range(2)]
    rows = [row for batch in seen[:steps] for row in batch]
    assert len(rows) == len(flags) and any(flags) and not all(flags)
    assert [torch.equal(row, empty) for row in rows] == flags


def test_caption_dropout_needs_the_null_text_file(tiny_wan_dataset: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_wan_dataset, copy)
    (copy / "null_text.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="null_text.safetensors is missing.*re-run `radial-lora data prepare`"):
        PreparedDataset(copy).null_text()


def test_consistency_also_holds_base_length_clips_to_the_base(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base-length clip is its own prefix: its steps carry a consistency term too (the LoRA vs the frozen base
    on the same input under dense attention); before this it was 0 on every base-length step."""
    seen: list[tuple[int, float]] = []
    real = trainer.train_step

    def spy(cfg, rt, data, m, step):
        stats = real(cfg, rt, data, m, step)
        seen.append((stats.bucket, stats.consistency))
        return stats

    monkeypatch.setattr(trainer, "train_step", spy)
    cfg = _cfg(
        tiny_wan_dir,
        tiny_wan_dataset,
        tmp_path / "run",
        "train.steps=8",
        "train.consistency_weight=1.0",
        "optimizer.lr=5e-3",
    )
    trainer.train(cfg)
    base_steps = [c for b, c in seen if b == cfg.data.base_length]
    assert base_steps and all(c > 0 for c in base_steps)
    assert any(b > cfg.data.base_length and c > 0 for b, c in seen)


def test_training_checks_every_clip_before_the_first_step(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    """A latent changed after prepare (same shape, still loadable) or a manifest bucket that does not match the
    latent frames stops the run before any step, naming the clip; data.verify=false skips the check."""
    import shutil

    from safetensors.torch import load_file, save_file

    data = tmp_path / "ds"
    shutil.copytree(tiny_wan_dataset, data)
    record = PreparedDataset(data).records[0]
    tensors = load_file(data / record.file)
    tensors["latents"] = tensors["latents"] * 1e30  # absurd, but a valid file of the right shape
    save_file(tensors, str(data / record.file))
    cfg = _cfg(tiny_wan_dir, data, tmp_path / "run", "train.steps=2")
    with pytest.raises(ValueError, match=rf"clip {re.escape(record.id)}: .* does not match its manifest checksum"):
        trainer.train(cfg)
    assert not (tmp_path / "run" / "losses.json").exists()

    shutil.rmtree(data)
    shutil.copytree(tiny_wan_dataset, data)
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["bucket"] = 9 if rows[0]["bucket"] == 17 else 17  # a clip filed under the other length
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ValueError, match=rf"clip {re.escape(rows[0]['id'])}: bucket \d+ frames needs \d+ latent frames"
    ):
        trainer.train(_cfg(tiny_wan_dir, data, tmp_path / "run2", "train.steps=2"))


# --- one writer per output folder, no silent overwrite, SIGKILL ----------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes (not the lock file: it names each holder)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def _start_train(cfg, tmp_path: Path, name: str) -> subprocess.Popen:
    """``radial-lora train --config`` on ``cfg`` as a process of its own (one torch thread, as this module)."""
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(cfg.to_dict()))
    cli = str(Path(sys.executable).with_name("radial-lora"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [cli, "train", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(check, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, f"no {what} after {timeout} s"
        time.sleep(0.005)


def _holds_lock(folder: Path, pid: int) -> bool:
    try:
        return json.loads((folder / LOCK_NAME).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_a_second_training_into_a_running_ones_folder_is_refused(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    """Two real processes: the second starts while the first holds output_dir (held still with SIGSTOP once its
    lock file names it, so they overlap for sure), stops with exit 75 naming the folder and the first's pid,
    host and start time, and writes nothing; the first then finishes alone."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_wan_dir, tiny_wan_dataset, out, "train.steps=3", "checkpoint.every=0", "validation.every=0")
    first = _start_train(cfg, tmp_path, "first")
    try:
        _wait_for(lambda: _holds_lock(out, first.pid), first, "the first run's lock")
        os.kill(first.pid, signal.SIGSTOP)
        before = _files(out)
        second = _start_train(cfg, tmp_path, "second")
        _, err = second.communicate(timeout=300)
        assert second.returncode == EXIT_BUSY, err[-2000:]
        (line,) = [x for x in err.splitlines() if "error:" in x]
        assert line.startswith(f"radial-lora train: error: {out} is in use by radial-lora train (pid {first.pid} on ")
        assert f" on {socket.gethostname()}, started 20" in line
        assert _files(out) == before  # the second run wrote nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert (out / LOG_FILE).read_text().count("training wan LoRA") == 1
    assert len(json.loads((out / "losses.json").read_text())) == 3


def test_a_rerun_without_resume_is_refused_and_overwrite_moves_the_old_run_aside(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    common = ("train.steps=2", "checkpoint.every=0", "validation.every=0", "logging.tensorboard=false")
    trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *common))
    old = _files(out)
    with pytest.raises(ValueError) as err:
        trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *common, "train.seed=1"))
    assert str(err.value) == (
        f"{out} already holds a training run (1 checkpoint(s) up to step_000002 and a final LoRA); continue it with "
        "--resume latest, train into another output_dir (--set output_dir=...), or pass --overwrite to move it into "
        f"{out}/previous/<time>/ (nothing is deleted)"
    )
    assert _files(out) == old  # untouched
    with pytest.raises(ValueError, match="give one of them"):
        trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *common), resume="latest", overwrite=True)

    new = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *common, "train.seed=1"), overwrite=True)
    (aside,) = (out / "previous").iterdir()
    assert _files(aside) == old  # every file of the old run, byte for byte
    assert "the earlier run in" in (out / LOG_FILE).read_text()
    assert load_file(out / lora.LORA_FILENAME).keys() == load_file(aside / lora.LORA_FILENAME).keys()
    assert (
        json.loads((out / "losses.json").read_text()) == new.losses != json.loads((aside / "losses.json").read_text())
    )
    # --resume latest sees only the new run's checkpoints, never the one moved aside
    assert ckpt.list_checkpoints(out) == [(2, out / "checkpoints" / "step_000002")]
    state, _ = ckpt.find_resume(out, "latest")
    assert state["state"]["losses"] == new.losses
    trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, out, *common), overwrite=True)  # twice in one second: kept
    assert len(list((out / "previous").iterdir())) == 2
    with pytest.raises(SystemExit):  # the CLI takes one of the two
        from radial_lora.cli import main

        main(["train", "--config", "x.json", "--resume", "latest", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_sigkill_then_resume_latest_is_bit_exact_and_leaves_no_lock(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    """A real process SIGKILLed mid-run (after its first checkpoint, before its end): the next run takes the
    folder (the kernel dropped the lock with the process) and ``--resume latest`` gives the LoRA and losses of an
    uninterrupted run bit for bit."""
    extra = ("train.steps=30", "checkpoint.every=3", "validation.every=0", "logging.tensorboard=false")
    extra += ("lora.dropout=0.1",)
    reference = trainer.train(_cfg(tiny_wan_dir, tiny_wan_dataset, tmp_path / "a", *extra))
    out = tmp_path / "b"
    cfg = _cfg(tiny_wan_dir, tiny_wan_dataset, out, *extra)
    proc = _start_train(cfg, tmp_path, "killed")
    try:
        _wait_for(lambda: ckpt.list_checkpoints(out), proc, "a checkpoint")
        os.kill(proc.pid, signal.SIGSTOP)
        assert not (out / lora.LORA_FILENAME).exists()  # still mid-run
        assert _holds_lock(out, proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _holds_lock(out, proc.pid)  # the file still names the dead holder: it is not the lock
    resumed = trainer.train(cfg, resume="latest")
    assert resumed.losses == reference.losses
    a, b = load_file(tmp_path / "a" / lora.LORA_FILENAME), load_file(out / lora.LORA_FILENAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_refuses_a_dataset_that_lists_a_clip_twice(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(tiny_wan_dataset, data)
    manifest = data / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines) + lines[0])  # what two `data prepare` runs at once used to leave
    first = json.loads(lines[0])["id"]
    pattern = rf"clip {re.escape(first)} is listed 2 times \(manifest.jsonl lines 1, {len(lines) + 1}\)"
    for verify in ("true", "false"):  # a cheap check: even without reading the files
        with pytest.raises(ValueError, match=pattern):
            trainer.train(_cfg(tiny_wan_dir, data, tmp_path / "run", "train.steps=1", f"data.verify={verify}"))
