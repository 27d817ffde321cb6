"""The radial block mask: bit-exact against the reference fixtures and the spec, fast, validated."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from radial_lora import attention_cost, mask_density, mask_sparsity, radial_block_mask
from radial_lora.geometry import latent_geometry
from spec_mask import spec_radial_mask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "radial_masks_reference.npz"  # see fixtures/README.md


def _reference_masks() -> dict[str, np.ndarray]:
    assert FIXTURES.exists(), f"reference masks missing: {FIXTURES}"
    z = np.load(FIXTURES)
    out = {}
    for key in z.files:
        if key.endswith("_shape"):
            continue
        shape = tuple(int(s) for s in z[key + "_shape"])
        out[key] = np.unpackbits(z[key])[: shape[0] * shape[1]].reshape(shape).astype(bool)
    return out


def test_matches_reference_fixtures_bit_for_bit():
    refs = _reference_masks()
    assert len(refs) == 3
    for key, ref in refs.items():
        model, f, t, d = key.split("_")
        mask = radial_block_mask(int(f[1:]), int(t[1:]), decay_factor=float(d[1:]), model_type=model)
        assert mask.dtype == torch.bool
        assert tuple(mask.shape) == ref.shape, key
        assert np.array_equal(mask.numpy(), ref), f"{key}: {(mask.numpy() != ref).sum()} blocks differ"


@pytest.mark.parametrize(
    "frames,tokens,decay,model,text,block",
    [
        (9, 300, 0.8, "hunyuan", 77, 64),  # text tokens, T not a multiple of B
        (20, 100, 1.0, "wan", 0, 32),
        (33, 64, 0.5, "hunyuan", 10, 16),  # deep frequency thinning (d up to 32)
        (17, 1000, 0.3, "wan", 5, 128),
        (40, 16, 1.0, "wan", 0, 16),  # one block per frame, the demo's geometry
        (25, 48, 2.0, "wan", 0, 32),  # decay > 1 widens bands
        (6, 7, 1.0, "wan", 3, 5),  # odd tiny sizes: blocks straddle frames
    ],
)
def test_matches_literal_spec_transcription(frames, tokens, decay, model, text, block):
    expected = spec_radial_mask(frames, tokens, block_size=block, decay=decay, model=model, text=text)
    got = radial_block_mask(
        frames, tokens, block_size=block, decay_factor=decay, model_type=model, num_text_tokens=text
    )
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_shape_text_and_border_rows_are_dense():
    f, t, b, x = 7, 50, 32, 20
    m = radial_block_mask(f, t, block_size=b, model_type="hunyuan", num_text_tokens=x)
    nb = math.ceil((f * t + x) / b)
    assert m.shape == (nb, nb)
    border = (f * t) // b
    assert m[border:, :].all() and m[:, border:].all()


def test_wan_sink_column_and_diagonal_always_kept():
    f, t, b = 24, 64, 64  # one block per frame
    m = radial_block_mask(f, t, block_size=b, decay_factor=0.2, model_type="wan")
    assert m[:, 0].all(), "every frame attends the first latent frame (attention sink)"
    assert m.diagonal().all()
    hun = radial_block_mask(f, t, block_size=b, decay_factor=0.2, model_type="hunyuan")
    assert not hun[:, 0].all(), "HunyuanVideo has no sink"
    # Energy decay: far frame pairs keep fewer blocks than near ones.
    near = sum(bool(m[i, i - 1]) for i in range(1, f)) / (f - 1)
    far = sum(bool(m[i, i - 13]) for i in range(13, f)) / (f - 13)
    assert near == 1.0 and far < near


def test_all_true_when_one_block_covers_everything():
    m = radial_block_mask(5, 16, block_size=128)
    assert m.shape == (1, 1) and bool(m.all())


def test_paper_configurations_have_the_papers_sparsity():
    # Wan2.1 161 frames 720p and HunyuanVideo 509 frames 720p (the speed is benchmarks/mask.py's business).
    wan = radial_block_mask(41, 3600, decay_factor=0.2, model_type="wan")
    hun = radial_block_mask(128, 3600, decay_factor=0.95, model_type="hunyuan")
    assert wan.shape == (1154, 1154) and hun.shape == (3600, 3600)
    assert 0.15 < mask_density(wan) < 0.2
    assert mask_sparsity(hun) > 0.85  # the paper reports ~88% sparsity at 4x for HunyuanVideo


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=0, tokens_per_frame=4), "num_frames"),
        (dict(num_frames=3, tokens_per_frame=-1), "tokens_per_frame"),
        (dict(num_frames=3, tokens_per_frame=4, block_size=0), "block_size"),
        (dict(num_frames=3, tokens_per_frame=4, model_type="cogvideo"), "wan, hunyuan"),
        (dict(num_frames=3, tokens_per_frame=4, decay_factor=0.0), "decay_factor"),
        (dict(num_frames=3, tokens_per_frame=4, num_text_tokens=-2), "num_text_tokens"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        radial_block_mask(**kwargs)


def test_density_weighs_partial_blocks_and_flops():
    m = torch.tensor([[True, False], [False, True]])
    assert mask_density(m) == 0.5
    # seq 5, block 4: blocks of 4 and 1 tokens -> kept pairs 16 + 1 of 25
    assert mask_density(m, seq_len=5, block_size=4) == pytest.approx(17 / 25)
    cost = attention_cost(m, 5, head_dim=8, num_heads=2, block_size=4)
    assert cost.dense_flops == 4 * 2 * 8 * 25
    assert cost.radial_flops == pytest.approx(cost.dense_flops * 17 / 25)
    assert cost.ideal_speedup == pytest.approx(25 / 17)
    with pytest.raises(ValueError, match="seq_len"):
        mask_density(m, seq_len=100, block_size=4)


def test_latent_geometry():
    g = latent_geometry(161, 720, 1280)
    assert (g.latent_frames, g.tokens_per_frame, g.video_tokens) == (41, 3600, 41 * 3600)
    with pytest.raises(ValueError, match="num_frames=160"):
        latent_geometry(160, 720, 1280)
    with pytest.raises(ValueError, match="height=100"):
        latent_geometry(81, 100, 1280)
