"""The demo end to end (``radial-lora demo --quick``) on the shipped tiny base, and its report logic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radial_lora.cli import main
from radial_lora.demo import ASSET, BASE, DOUBLE, QUAD, QUICK, DemoOptions, render_report, run_demo


def test_shipped_base_is_a_wan_pipeline_with_unit_latents() -> None:
    index = json.loads((ASSET / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    vae = json.loads((ASSET / "vae" / "config.json").read_text())
    std = np.asarray(vae["latents_std"])
    assert len(std) == vae["z_dim"] and np.all(std > 0)
    card = (ASSET / "README.md").read_text()
    assert "pretrain_tiny_base.py" in card


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    assert str(out / "REPORT.md") in capsys.readouterr().out
    report = (out / "REPORT.md").read_text()
    info = json.loads((out / "demo.json").read_text())

    # Held-out loss of every variant at 1x, 2x and 4x: finite, positive, and printed in the report.
    for variant in ("base_dense", "base_radial", "lora_radial"):
        for n in (BASE, DOUBLE, QUAD):
            value = info["heldout"][variant][str(n)]
            assert math.isfinite(value) and value > 0
            assert f"{value:.4f}" in report
    base4, lora4 = info["heldout"]["base_radial"][str(QUAD)], info["heldout"]["lora_radial"][str(QUAD)]
    assert ("lowers the held-out loss" in report) == (lora4 < base4)
    assert ("does NOT beat the base" in report) == (lora4 >= base4)

    # The LoRA, its training losses, and the side-by-side timing.
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(info["train"]["losses"]) == QUICK.train_steps
    assert all(math.isfinite(x) for x in info["train"]["losses"])
    t = info["timing"]
    assert t["tokens"] == 17 * 16 and t["steps_timed"] == QUICK.timing_steps
    assert t["dense_step_s"] > 0 and t["radial_step_s"] > 0
    assert 0.3 < t["mask_density"] < 0.6  # the 4x mask is really sparse
    assert t["attention_flops_radial"] < t["attention_flops_dense"]

    # Generated 4x videos of base and LoRA (same prompt, seed) and their frame strips.
    for variant in ("base_radial", "lora_radial"):
        video = out / info["videos"][variant][0]
        assert video.is_file() and video.stat().st_size > 0
        strip = Image.open(out / info["strips"][variant][0])
        assert strip.width > strip.height
        assert info["videos"][variant][0] in report and info["strips"][variant][0] in report

    # A rerun resumes: finished steps are skipped (the LoRA is not trained again), the report is rewritten.
    lora_mtime = (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert run_demo(DemoOptions(out=out, quick=True)) == out / "REPORT.md"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == lora_mtime
    again = json.loads((out / "demo.json").read_text())
    assert again["heldout"] == info["heldout"] and again["timing"] == info["timing"]


def _info(base4: float, lora4: float) -> dict:
    heldout = {v: {BASE: 1.0, DOUBLE: 1.1, QUAD: base4} for v in ("base_dense", "base_radial")}
    heldout["lora_radial"] = {BASE: 1.01, DOUBLE: 1.05, QUAD: lora4}
    timing = dict(
        frames=QUAD,
        latent_frames=17,
        tokens_per_frame=16,
        tokens=272,
        block_size=16,
        decay=0.2,
        mask_density=0.47,
        dense_layers=1,
        layers=4,
        steps_timed=2,
        batch=2,
        dense_step_s=1.0,
        radial_step_s=0.8,
        speedup=1.25,
        attention_flops_dense=4.0,
        attention_flops_radial=2.0,
    )
    config = {"lora": {"rank": 4}, "data": {"lengths": [17, 65], "weights": [1, 3]}, "train": {"batch_size": 2}}
    return dict(
        heldout=heldout,
        timing=timing,
        config=config,
        prompts=["a red circle moves right"],
        videos={},
        strips={},
        train={"steps": 2, "losses": [1.0, 0.9]},
        times={"train": {"seconds": 1.0}},
    )


@pytest.mark.parametrize(("base4", "lora4", "says"), [(2.0, 1.5, "lowers"), (2.0, 2.5, "does NOT beat")])
def test_report_says_honestly_whether_the_lora_wins(base4: float, lora4: float, says: str, tmp_path: Path) -> None:
    text = render_report(DemoOptions(out=tmp_path), QUICK, _info(base4, lora4))
    assert says in text
    assert f"{100 * (lora4 - base4) / base4:+.1f}%" in text
    assert "+1.0%" in text  # the 1x change vs the base is reported too (1.00 -> 1.01)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json.*pretrain_tiny_base.py"):
        run_demo(DemoOptions(out=tmp_path / "d", quick=True, model=tmp_path / "nowhere"))
