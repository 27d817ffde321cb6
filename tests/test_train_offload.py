"""CPU offload of the checkpointed block inputs (train.offload_checkpoints): same gradients as plain
checkpointing, and (on a GPU) a lower device peak."""

from __future__ import annotations

import pytest
import torch

from radial_lora import lora
from radial_lora.models import apply_radial_attention, build_tiny_pipeline, get_adapter
from radial_lora.train import offload
from radial_lora.train.config import ConfigError, load_config
from tiny_config import QUICK

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grads(transformer: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 5, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    out = get_adapter("wan").predict(
        transformer,
        latents.to(device),
        torch.tensor([500.0], device=device),
        {"encoder_hidden_states": text.to(device)},
    )
    (out.float() ** 2).mean().backward()
    return out.detach().cpu(), [p.grad.detach().cpu() for p in transformer.parameters() if p.requires_grad]


def _model(device: torch.device, offload_to: str | None) -> torch.nn.Module:
    transformer = build_tiny_pipeline("wan").transformer.to(device)
    params = lora.add_lora(transformer, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator(device=p.device).manual_seed(1))
    apply_radial_attention(transformer, block_size=16)
    kwargs = {} if offload_to is None else offload.checkpoint_offloading(offload_to)
    transformer.enable_gradient_checkpointing(**kwargs)
    return transformer.train()


def test_offloaded_checkpoint_gives_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offload path proper (a distinct target device, here "cpu:0"): every stream input is moved and
    moved back, and the output and LoRA gradients equal plain checkpointing's exactly."""
    moved = []
    original = offload.offloaded_checkpoint

    def counting(function, *args, offload_to, **kwargs):
        moved.append(sum(offload._is_stream(a) for a in args))
        return original(function, *args, offload_to=offload_to, **kwargs)

    monkeypatch.setattr(offload, "offloaded_checkpoint", counting)
    cpu = torch.device("cpu")
    want = _grads(_model(cpu, None), cpu)
    got = _grads(_model(cpu, "cpu:0"), cpu)
    assert moved == [0, 1]  # block 0's input has no gradient path (frozen patch embedding); block 1's has
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_offload_needs_gradient_checkpointing() -> None:
    with pytest.raises(ConfigError, match="train.offload_checkpoints: .*gradient_checkpointing=true"):
        load_config(QUICK, ["train.offload_checkpoints=true"])
    assert load_config(QUICK, ["train.offload_checkpoints=true", "train.gradient_checkpointing=true"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_moves_the_saved_block_inputs_off_the_gpu() -> None:
    """What forward leaves on the GPU for backward drops by the offloaded stream inputs (7 of 8 blocks)."""
    cuda, layers = torch.device("cuda"), 8
    held = {}
    for target in (None, "cpu"):
        transformer = build_tiny_pipeline("wan", num_layers=layers).transformer.to(cuda)
        lora.add_lora(transformer, rank=4)
        apply_radial_attention(transformer, block_size=128)
        kwargs = {} if target is None else offload.checkpoint_offloading(target)
        transformer.enable_gradient_checkpointing(**kwargs)
        latents = torch.randn(1, 4, 21, 60, 104, device=cuda)
        text = {"encoder_hidden_states": torch.randn(1, 6, 32, device=cuda)}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = get_adapter("wan").predict(transformer, latents, torch.tensor([500.0], device=cuda), text)
        torch.cuda.synchronize()
        held[target] = torch.cuda.memory_allocated() - base
        out.float().square().mean().backward()
    stream = 21 * 30 * 52 * 32 * 4  # one block input [1, S, 32] float32
    assert held[None] - held["cpu"] >= 0.9 * (layers - 1) * stream, (held, stream)
