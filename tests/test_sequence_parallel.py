"""Ulysses sequence parallelism: the token-split transformer and training on 2 (and 2 x 2) gloo processes
against one process on the same config and data.

Not bit for bit: the split changes summation orders (the LoRA gradients are summed over processes), so the
comparisons are to float32 tolerance; a resumed split run must reproduce the uninterrupted one exactly. AdamW
runs with a large eps here: its default 1e-8 turns rounding-level differences of ~zero gradients into
differences of a whole step's sign, while with eps 1e-3 a step is proportional to its gradient and the LoRA
comparison measures the gradients."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun, torchrun_train
from radial_lora import lora
from radial_lora.parallel import ParallelLayout, check_layout
from radial_lora.train import trainer
from radial_lora.train.components import LOG_FILE
from radial_lora.train.config import ConfigError
from tiny_config import THREE_STEPS_CHECKPOINTED, quick_config

WORKER = Path(__file__).parent / "workers" / "sequence_parallel_parity.py"
COMMON = (
    *THREE_STEPS_CHECKPOINTED,
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.gradient_checkpointing=true",
    "optimizer.eps=1e-3",
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layout_arithmetic_and_errors() -> None:
    layout = ParallelLayout(world=8, rank=5, sequence=4)
    assert (layout.data, layout.data_rank, layout.sequence_rank) == (2, 1, 1)
    assert layout.describe() == "8 procs = 2 data x 4 sequence"
    with pytest.raises(ValueError, match=r"degree 3 does not divide the 8 processes; use one of \[1, 2, 4, 8\]"):
        check_layout(8, 3)


def test_one_process_cannot_split_the_sequence(tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path) -> None:
    cfg = quick_config(tiny_wan_dir, tiny_wan_dataset, tmp_path / "run", "train.sequence_parallel=2")
    with pytest.raises(ConfigError, match="train.sequence_parallel: .*degree 2 does not divide the 1 processes"):
        trainer.train(cfg)


@pytest.mark.slow
def test_split_transformer_matches_whole_for_every_family_kind(
    tiny_wan_dir: Path, tiny_hunyuan_dir: Path, tmp_path: Path
) -> None:
    """Outputs and LoRA gradients of the token-split tiny Wan, HunyuanVideo (padded text), Wan2.1-I2V (image
    latents on channels, CLIP tokens in cross-attention) and HunyuanVideo 1.5 (two padded text streams and the
    masked image tokens joined inside the transformer; its image-to-video model with the SigLIP tokens valid) and
    HunyuanVideo-I2V (image latents on channels; the image's latent as frame 0, whose tokens each shard's blocks
    must modulate as timestep 0) transformers,
    with and without gradient checkpointing, equal the whole transformer's to float32 rounding; so do the
    losses of 3 LoRA training steps and videos generated with ``sequence_parallel=2`` (uint8 frames within
    one level of the one-process videos)."""
    torchrun(str(WORKER), str(tmp_path / "report.json"), str(tiny_wan_dir), str(tiny_hunyuan_dir), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    families = ("wan", "hunyuan", "wan-i2v", "hunyuan15", "hunyuan15-i2v", "hunyuan-i2v", "hunyuan-i2v-replace")
    keys = [f + suffix for f in families for suffix in ("", "_checkpointing")]
    for key in [k for k in keys if not (k.startswith("hunyuan-i2v") and k.endswith("_checkpointing"))]:
        r = report[key]
        assert r["out_diff"] <= 1e-6 * r["out_scale"] + 1e-7, (key, r)
        assert r["grad_diff"] <= 2e-6 * r["grad_scale"] + 1e-7, (key, r)
        assert r["grads"] > 0 and r["calls"]["sparse"] > 0 and r["calls"]["dense"] > 0, (key, r)
    assert report["disabled_diff"] == 0.0  # the hooks come off cleanly
    assert (
        "video tokens of this call (7 latent frames x 3 x 3 after patching) (63) to divide by 2"
        in (report["indivisible_error"])
    )
    assert "attention heads (3) to divide by 2; degrees that work for this model: [1, 3]" in report["heads_error"]
    for family in ("wan", "hunyuan"):  # three AdamW steps of the LoRA: the same losses, split or whole
        t = report[f"train_{family}"]
        torch.testing.assert_close(torch.tensor(t["split"]), torch.tensor(t["whole"]), rtol=1e-5, atol=1e-7)
        assert t["whole"][0] != t["whole"][2]  # the LoRA moved
    for family in ("wan", "hunyuan"):
        g = report[f"generate_{family}"]
        assert g["videos"] == 2 and g["processes"] == "2 procs = 1 data x 2 sequence", g
        assert g["max_diff"] <= 1 and g["mean_diff"] < 0.01, g
        assert report[f"generate_{family}_other"] == 0  # the second process renders, its partner writes


@pytest.fixture(scope="module")
def one_process(tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The reference: one process, one sample per forward, 2 forwards per step (checkpoints and validation
    do not touch the weights or the noise, so every split run below compares with it)."""
    out = tmp_path_factory.mktemp("one") / "run"
    return trainer.train(quick_config(tiny_wan_dir, tiny_wan_dataset, out, *COMMON)), out


def _close_lora(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / lora.LORA_FILENAME), load_file(b_dir / lora.LORA_FILENAME)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_sequence_parallel_training_matches_one_process_and_resumes(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, one_process: tuple
) -> None:
    single, single_dir = one_process
    cfg = quick_config(
        tiny_wan_dir,
        tiny_wan_dataset,
        tmp_path / "sp",
        *COMMON,
        "train.sequence_parallel=2",
        'validation.sample_prompts=["a red fox in snow"]',
        "validation.sample_steps=2",
    )
    cfg_path = tmp_path / "sp.json"
    torchrun_train(cfg.to_dict(), cfg_path)
    log = (tmp_path / "sp" / LOG_FILE).read_text()
    assert "2 procs = 1 data x 2 sequence; 2 micro x 2 accum" not in log  # one sample per forward, as one process
    assert "2 procs = 1 data x 2 sequence; 1 micro x 2 accum" in log
    losses = json.loads((tmp_path / "sp" / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-7)
    heldout = float(re.search(r"step 2 held-out loss ([\d.]+)", log).group(1))
    assert abs(heldout - single.heldout["mean"]) < 1e-5
    _close_lora(single_dir, tmp_path / "sp")
    assert len(list((tmp_path / "sp" / "samples" / "step_000003").glob("f17_000_*.mp4"))) == 1
    # Resume the split run from step 2: step 3 as in the uninterrupted split run, exactly.
    resumed = {**cfg.to_dict(), "output_dir": str(tmp_path / "resumed")}
    torchrun_train(resumed, cfg_path, "--resume", str(tmp_path / "sp" / "checkpoints" / "step_000002"))
    assert json.loads((tmp_path / "resumed" / "losses.json").read_text()) == losses
    a, b = load_file(tmp_path / "sp" / lora.LORA_FILENAME), load_file(tmp_path / "resumed" / lora.LORA_FILENAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_over_a_data_by_sequence_mesh_matches_one_process(
    tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path, one_process: tuple
) -> None:
    """4 processes = 2 data x 2 sequence, the base and LoRA sharded by FSDP2 over all four: the same run as one
    process (2 samples per step, one per forward)."""
    extra = ("train.grad_accum=1", "checkpoint.every=0", "validation.every=0")
    single, single_dir = one_process
    cfg = quick_config(
        tiny_wan_dir,
        tiny_wan_dataset,
        tmp_path / "mesh",
        *COMMON,
        *extra,
        "train.sequence_parallel=2",
        "train.distributed=fsdp",
    )
    torchrun_train(cfg.to_dict(), tmp_path / "mesh.json", nproc=4)
    log = (tmp_path / "mesh" / LOG_FILE).read_text()
    assert "4 procs = 2 data x 2 sequence; 1 micro x 1 accum" in log
    assert "FSDP: transformer sharded over 4 processes" in log
    losses = json.loads((tmp_path / "mesh" / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-7)
    _close_lora(single_dir, tmp_path / "mesh")
