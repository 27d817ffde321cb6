"""RIFLEx on the real diffusers RoPE modules: only the chosen temporal component changes, to the value the
formula gives for the requested length, and only while the context is open."""

from __future__ import annotations

import math

import pytest
import torch

from radial_lora.models import get_adapter
from radial_lora.models.riflex import (
    default_component,
    intrinsic_component,
    pipeline_ropes,
    riflex,
    riflex_frequency,
    rope_periods,
)
from radial_lora.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_intrinsic_component_matches_the_reference_choice_for_hunyuanvideo() -> None:
    # HunyuanVideo: theta 256, 16 temporal channels, trained at 129 frames = 33 latent frames; thu-ml/RIFLEx uses k=4
    assert [round(p, 1) for p in rope_periods(256.0, 16)[:5]] == [6.3, 12.6, 25.1, 50.3, 100.5]
    assert intrinsic_component(256.0, 16, 33) == 4
    # Wan2.1 (head 128: 44 temporal channels, theta 10000) at 81 frames = 21 latent frames: period 22.1
    assert intrinsic_component(10000.0, 44, 21) == 4
    assert riflex_frequency(256.0, 16, 4, 129) == pytest.approx(0.9 * 2 * math.pi / 129)
    assert riflex_frequency(256.0, 16, 4, 33) == 256.0 ** (-6 / 16)  # a covered length keeps its frequency
    with pytest.raises(ValueError, match="outside the temporal RoPE"):
        riflex_frequency(256.0, 16, 9, 10)


def _latents(pipe, family: str, latent_frames: int) -> torch.Tensor:
    channels = pipe.transformer.config.in_channels
    return torch.randn(1, channels, latent_frames, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_only_component_k_changes_to_the_formula_value(family: str) -> None:
    pipe = build_tiny_pipeline(family)
    adapter = get_adapter(family)
    (rope,) = pipeline_ropes(adapter, pipe)
    k = default_component(rope, base_frames=17)  # 5 latent frames
    latent_frames = 17  # 4x: 65 frames
    x = _latents(pipe, family, latent_frames)
    cos0, sin0 = (t.clone() for t in rope.module(x))
    with riflex([rope], k):
        cos1, sin1 = rope.module(x)
    cos2, sin2 = rope.module(x)  # the hook is gone
    assert torch.equal(cos2, cos0) and torch.equal(sin2, sin0)
    d = cos0.shape[-1]
    c0, c1, s1 = cos0.reshape(-1, d), cos1.reshape(-1, d), sin1.reshape(-1, d)
    changed = (c1 != c0).any(dim=0).nonzero().flatten().tolist()
    assert changed == [2 * (k - 1), 2 * (k - 1) + 1]
    theta = 0.9 * 2 * math.pi / latent_frames
    assert theta < rope.base ** (-2 * (k - 1) / rope.dim)  # it does lower the frequency
    t = torch.arange(c0.shape[0], dtype=torch.float64) // (c0.shape[0] // latent_frames)
    for col in changed:
        torch.testing.assert_close(c1[:, col], torch.cos(t * theta).to(c1.dtype), rtol=0, atol=1e-6)
        torch.testing.assert_close(s1[:, col], torch.sin(t * theta).to(s1.dtype), rtol=0, atol=1e-6)
    others = [c for c in range(d) if c not in changed]
    assert torch.equal(c1[:, others], c0[:, others]) and torch.equal(s1[:, others], sin0.reshape(-1, d)[:, others])


def test_riflex_is_a_no_op_at_the_training_length_and_changes_the_output_beyond() -> None:
    pipe = build_tiny_pipeline("wan")
    adapter = get_adapter("wan")
    ropes = pipeline_ropes(adapter, pipe)
    k = default_component(ropes[0], base_frames=17)
    text = torch.randn(1, 8, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    step = torch.tensor([500.0])
    for latent_frames, same in ((5, True), (17, False)):
        x = _latents(pipe, "wan", latent_frames)
        with torch.no_grad():
            plain = pipe.transformer(x, step, text, return_dict=False)[0]
            with riflex(ropes, k):
                extended = pipe.transformer(x, step, text, return_dict=False)[0]
        assert torch.equal(plain, extended) == same
