"""scripts/pretrain_tiny_base.py reads its phase checkpoints, its latent pool and ``--vae-from`` with
``torch.load(weights_only=True)`` (no file it reads may run code): every dict it saves must load that way, through
the script's own functions, and a pickled payload must not run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import EMAModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_base", ROOT / "scripts" / "pretrain_tiny_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stepped(model: torch.nn.Module, **kw) -> torch.optim.AdamW:
    """An AdamW that has taken one step (so its state holds tensors, as the script's checkpoints do)."""
    opt = torch.optim.AdamW(model.parameters(), **kw)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return opt


def test_phase_checkpoints_and_pool_load_as_weights_only(script, tmp_path: Path) -> None:
    comp = script.build_components(0)
    vae, transformer = comp["vae"], comp["transformer"]
    # phase 1 / 4 / 5b checkpoints: weights, optimizer, progress, (phase 1) the torch RNG
    opt = _stepped(vae, lr=1e-3, weight_decay=0.0)
    state = {"step": 25, "history": [{"step": 25, "l1_ema": 0.5, "mse": 0.1, "kl": 0.01}]}
    script.atomic_torch_save(
        {"model": vae.state_dict(), "opt": opt.state_dict(), "state": state, "rng": torch.get_rng_state()},
        tmp_path / "vae.pt",
    )
    fresh = script.build_components(1)["vae"]
    saved = script.resume(tmp_path / "vae.pt", fresh, torch.optim.AdamW(fresh.parameters()), "vae")
    assert saved["state"] == state
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), vae.state_dict().values()))
    assert torch.load(tmp_path / "vae.pt", weights_only=True)["model"].keys() == vae.state_dict().keys()  # --vae-from
    # phases 3 / 5: the transformer with its EMA
    opt = _stepped(transformer, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMAModel(transformer.parameters(), decay=0.99)
    snapshot = {
        "model": transformer.state_dict(),
        "opt": opt.state_dict(),
        "state": {"step": 100, "history": [{"step": 100, "loss_ema": 0.3}]},
        "rng": torch.get_rng_state(),
        "ema": ema.state_dict(),
    }
    script.atomic_torch_save(snapshot, tmp_path / "transformer.pt")
    saved = script.resume(tmp_path / "transformer.pt", transformer, opt, "transformer")
    EMAModel(transformer.parameters(), decay=0.99).load_state_dict(saved["ema"])
    # phase 2: the latent pool (latent stats as the VAE config holds them)
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 0.9, 1.1, 1.2])
    pool = {
        "latents": torch.randn(2, 4, 5, 8, 8),
        "captions": ["a red circle", "a blue square"],
        "short": ["a red circle", "a blue square"],
        "embeds": {"": torch.zeros(4, 32), "a red circle": torch.ones(4, 32)},
        "latents_mean": vae.config.latents_mean,
        "latents_std": vae.config.latents_std,
    }
    script.atomic_torch_save(pool, tmp_path / "pool.pt")
    loaded = script.build_pool({"vae": fresh}, None, tmp_path / "pool.pt", 2, SimpleNamespace())
    assert loaded["captions"] == pool["captions"] and torch.equal(loaded["latents"], pool["latents"])
    assert list(fresh.config.latents_std) == [1.0, 0.9, 1.1, 1.2]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_payload_in_a_phase_checkpoint_does_not_run(script, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    vae = script.build_components(0)["vae"]
    script.atomic_torch_save({"model": vae.state_dict(), "state": _Payload(marker)}, tmp_path / "vae.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        script.resume(tmp_path / "vae.pt", vae, torch.optim.AdamW(vae.parameters()), "vae")
    assert not marker.exists()
