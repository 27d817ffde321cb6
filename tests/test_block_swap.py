"""Block swap (train.blocks_to_swap): outputs and LoRA gradients equal no swapping exactly, with gradient
checkpointing and with offloaded checkpoints; the prefetch order; training runs and the config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radial_lora import lora
from radial_lora.models import apply_radial_attention, build_tiny_pipeline, get_adapter
from radial_lora.train import offload, trainer
from radial_lora.train.block_swap import enable_block_swap
from radial_lora.train.config import ConfigError, load_config
from tiny_config import QUICK, quick_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _model(layers: int, offload_to: str | None) -> torch.nn.Module:
    transformer = build_tiny_pipeline("wan", num_layers=layers).transformer
    params = lora.add_lora(transformer, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    apply_radial_attention(transformer, block_size=16)
    kwargs = {} if offload_to is None else offload.checkpoint_offloading(offload_to)
    transformer.enable_gradient_checkpointing(**kwargs)
    return transformer.train()


def _step(transformer: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 5, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    cond = {"encoder_hidden_states": text}
    out = get_adapter("wan").predict(transformer, latents, torch.tensor([500.0]), cond)
    (out.float() ** 2).mean().backward()
    return out.detach(), [p.grad for p in transformer.parameters() if p.requires_grad]


@pytest.mark.parametrize("offload_to", [None, "cpu:0"])
def test_swapped_blocks_give_the_same_outputs_and_gradients(offload_to: str | None) -> None:
    """4 blocks, the last 2 swapped: every block's weights are real copies installed and released around it
    (also on a CPU), and the output and the 64 LoRA gradients equal no swapping bit for bit."""
    want = _step(_model(4, offload_to))
    model = _model(4, offload_to)
    swap = enable_block_swap(model, 2, CPU)
    got = _step(model)
    assert torch.equal(got[0], want[0])
    assert len(got[1]) == len(want[1]) == 64 and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    # forward: block 2 prefetched while block 1 runs, block 3 while block 2 runs; the last block is fetched
    # again for backward, whose recompute runs 3 then 2 (each prefetching the one before it)
    assert swap.log == [
        ("prefetch", 2), ("install", 2), ("prefetch", 3), ("release", 2), ("install", 3), ("release", 3),
        ("prefetch", 3), ("install", 3), ("prefetch", 2), ("release", 3), ("install", 2), ("release", 2),
    ]  # fmt: skip
    assert swap.current is None  # nothing left installed after backward
    frozen = [p for b in model.blocks[2:] for p in b.parameters() if not p.requires_grad]
    assert frozen and all(p.device == CPU for p in frozen)


def test_no_grad_forward_swaps_without_a_backward_prefetch() -> None:
    model = _model(3, None)
    swap = enable_block_swap(model, 1, CPU)
    with torch.no_grad():
        _step_out = get_adapter("wan").predict(
            model, torch.randn(1, 4, 5, 8, 8), torch.tensor([500.0]), {"encoder_hidden_states": torch.randn(1, 6, 32)}
        )
    assert _step_out.shape == (1, 4, 5, 8, 8)
    assert swap.log == [("prefetch", 2), ("install", 2), ("release", 2)]


def test_swap_count_must_leave_a_block() -> None:
    with pytest.raises(ValueError, match=r"train.blocks_to_swap=2: the transformer has 2 blocks; swap 1 to 1"):
        enable_block_swap(_model(2, None), 2, CPU)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.blocks_to_swap=1"], "train.blocks_to_swap: needs train.gradient_checkpointing=true"),
        (
            ["train.blocks_to_swap=1", "train.gradient_checkpointing=true", "train.distributed=fsdp"],
            "train.blocks_to_swap: does not combine with train.distributed='fsdp'",
        ),
        (
            ["train.blocks_to_swap=1", "train.gradient_checkpointing=true", "train.sequence_parallel=2"],
            "train.blocks_to_swap: does not combine with train.sequence_parallel > 1",
        ),
        (["train.blocks_to_swap=-1"], "train.blocks_to_swap: -1 must be >= 0"),
    ],
)
def test_config_errors_name_the_key(settings: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(QUICK, settings)


def test_training_with_swap_equals_training_without(tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path) -> None:
    """Three optimizer steps (with offloaded checkpoints and the consistency loss's no-grad base forward):
    the same losses and LoRA as without swapping."""
    common = ("train.steps=3", "train.gradient_checkpointing=true", "train.offload_checkpoints=true",
              "train.consistency_weight=0.1", "checkpoint.every=0", "logging.tensorboard=false")  # fmt: skip
    runs = {}
    for swap in (0, 1):
        out = tmp_path / f"swap{swap}"
        cfg = quick_config(tiny_wan_dir, tiny_wan_dataset, out, *common, f"train.blocks_to_swap={swap}")
        runs[swap] = (trainer.train(cfg).losses, lora.load_lora_state(out))
    assert runs[1][0] == runs[0][0]
    assert runs[1][1].keys() == runs[0][1].keys()
    assert all(torch.equal(runs[1][1][k], runs[0][1][k]) for k in runs[0][1])
