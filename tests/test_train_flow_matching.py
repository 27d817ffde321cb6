"""Flow-matching objective: formulas, scheduler units, reproducible sampling, held-out loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from radial_lora import lora
from radial_lora.models.registry import get_adapter
from radial_lora.models.tiny import build_tiny_pipeline
from radial_lora.train import flow_matching as fm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shift_formula_and_endpoints() -> None:
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(fm.shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(fm.shift_sigmas(s, 1.0), s)
    with pytest.raises(ValueError, match="shift"):
        fm.shift_sigmas(s, 0.0)


def test_noising_and_target() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=gen), torch.randn(2, 4, 3, 2, 2, generator=gen)
    xt = fm.add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    # The target is the time derivative of x_t along the straight path.
    s, h = torch.tensor([0.3, 0.3]), 1e-3
    deriv = (fm.add_noise(x0, noise, s + h) - fm.add_noise(x0, noise, s)) / h
    torch.testing.assert_close(deriv, fm.flow_target(x0, noise), rtol=1e-3, atol=1e-3)
    assert fm.flow_matching_loss(fm.flow_target(x0, noise), x0, noise) == 0
    torch.testing.assert_close(
        fm.per_sample_loss(torch.zeros_like(x0), x0, noise).mean(),
        fm.flow_matching_loss(torch.zeros_like(x0), x0, noise),
    )


def test_timestep_units_match_diffusers_scheduler() -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(10)
    sigmas = sched.sigmas[:-1]
    torch.testing.assert_close(fm.sigma_to_timestep(sigmas), sched.timesteps)
    # The scheduler's training sigmas are our shift formula applied to its unshifted grid.
    shifted, plain = FlowMatchEulerDiscreteScheduler(shift=5.0), FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.testing.assert_close(fm.shift_sigmas(plain.sigmas, 5.0), shifted.sigmas, rtol=1e-5, atol=1e-6)


def test_sampling_reproducible_and_distributed() -> None:
    a = fm.sample_sigmas(4000, scheme="uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    b = fm.sample_sigmas(4000, scheme="uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1
    # Median of U(0,1) is 0.5 -> shifted median 0.75.
    assert abs(a.median().item() - 0.75) < 0.03
    ln = fm.sample_sigmas(
        4000, scheme="logit_normal", logit_mean=1.0, logit_std=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert abs(ln.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    with pytest.raises(ValueError, match="logit_normal"):
        fm.sample_sigmas(2, scheme="beta")


def test_clip_noise_depends_only_on_clip_timestep_seed() -> None:
    a = fm.clip_noise("clip-1", 500, (4, 3, 2, 2))
    assert torch.equal(a, fm.clip_noise("clip-1", 500.0, (4, 3, 2, 2)))
    assert not torch.equal(a, fm.clip_noise("clip-1", 700, (4, 3, 2, 2)))
    assert not torch.equal(a, fm.clip_noise("clip-2", 500, (4, 3, 2, 2)))
    assert not torch.equal(a, fm.clip_noise("clip-1", 500, (4, 3, 2, 2), seed=1))


def _clips() -> list[tuple[str, int, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            f"c{i}",
            frames,
            {
                "latents": torch.randn(4, 1 + (frames - 1) // 4, 4, 4, generator=gen),
                "encoder_hidden_states": torch.randn(5, 32, generator=gen),
            },
        )
        for i, frames in enumerate((5, 9, 9))
    ]


def test_heldout_loss_deterministic_and_per_bucket() -> None:
    adapter = get_adapter("wan")
    tr = build_tiny_pipeline("wan").transformer
    clips = _clips()
    r1 = fm.heldout_loss(adapter, tr, clips, timesteps=(250, 750), seed=0)
    r2 = fm.heldout_loss(adapter, tr, list(reversed(clips)), timesteps=(250, 750), seed=0)
    assert r1.per_clip == r2.per_clip and r1.count == 3
    assert set(r1.per_bucket) == {5, 9}
    assert r1.per_bucket[9] == pytest.approx((r1.per_clip["c1"] + r1.per_clip["c2"]) / 2)
    assert r1.mean == pytest.approx(sum(r1.per_clip.values()) / 3)
    assert set(r1.per_timestep) == {250.0, 750.0}
    # Recompute one entry by hand.
    cid, _, t = clips[0]
    x0 = t["latents"][None]
    noise = fm.clip_noise(cid, 250, x0.shape[1:])[None]
    xt = fm.add_noise(x0, noise, torch.tensor([0.25]))
    with torch.no_grad():
        pred = tr(xt, torch.tensor([250.0]), t["encoder_hidden_states"][None], return_dict=False)[0]
    one = fm.flow_matching_loss(pred, x0, noise).item()
    single = fm.heldout_loss(adapter, tr, [clips[0]], timesteps=(250,))
    assert single.mean == pytest.approx(one, rel=1e-6)
    # A different model scores differently on the same inputs; the train/eval mode is restored.
    _ = lora.add_lora(tr, rank=2, dropout=0.1)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    tr.train()
    r3 = fm.heldout_loss(adapter, tr, clips, timesteps=(250, 750), seed=0)
    assert tr.training
    assert r3.mean != pytest.approx(r1.mean)
    assert r3.mean == fm.heldout_loss(adapter, tr, clips, timesteps=(250, 750), seed=0).mean  # dropout off


def test_heldout_loss_bad_input() -> None:
    adapter = get_adapter("wan")
    tr = build_tiny_pipeline("wan").transformer
    with pytest.raises(ValueError, match="timesteps"):
        fm.heldout_loss(adapter, tr, _clips(), timesteps=(0,))
    with pytest.raises(ValueError, match="no clips"):
        fm.heldout_loss(adapter, tr, [])
    with pytest.raises(ValueError, match="Records"):
        fm.heldout_loss(adapter, tr, ["nope"])


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_sampling_in_a_range_is_the_truncated_distribution(scheme: str) -> None:
    """A Wan2.2 expert's noise levels: the full distribution conditioned on its range, one draw per sample."""
    kw = dict(scheme=scheme, shift=3.0, logit_mean=0.5, logit_std=0.8)
    full = fm.sample_sigmas(40000, generator=torch.Generator().manual_seed(0), **kw)
    for lo, hi in ((0.0, 0.875), (0.875, 1.0)):
        got = fm.sample_sigmas(8000, generator=torch.Generator().manual_seed(1), sigma_range=(lo, hi), **kw)
        again = fm.sample_sigmas(8000, generator=torch.Generator().manual_seed(1), sigma_range=(lo, hi), **kw)
        assert torch.equal(got, again) and got.dtype == torch.float32
        assert got.min() >= lo and got.max() <= hi
        want = full[(full >= lo) & (full < hi)]
        for q in (0.1, 0.5, 0.9):
            assert abs(got.quantile(q).item() - want.quantile(q).item()) < 0.01, (lo, hi, q)
    with pytest.raises(ValueError, match="empty"):
        fm.sample_sigmas(2, sigma_range=(0.5, 0.5))
