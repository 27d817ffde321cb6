"""The demo end to end (``radial-lora demo --quick``) on the shipped tiny base, and its report logic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radial_lora.cli import main
from radial_lora.demo import ASSET, BASE, DOUBLE, QUAD, QUICK, VARIANTS, DemoOptions, goals, run_demo, summarise_runs


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
    assert main(["demo", "--out", str(out), "--quick", "--seeds", "2"]) == 0
    assert str(out / "REPORT.md") in capsys.readouterr().out
    report = (out / "REPORT.md").read_text()
    info = json.loads((out / "demo.json").read_text())

    # Every Table 2 row at 1x, 2x and 4x: a sample score in [0, 1] and a finite held-out loss, in the report.
    assert set(info["sample_scores"]) == set(VARIANTS) and set(info["heldout_loss"]) == set(VARIANTS)
    for variant in VARIANTS:
        for n in (BASE, DOUBLE, QUAD):
            score, loss = info["sample_scores"][variant][str(n)], info["heldout_loss"][variant][str(n)]
            assert 0.0 <= score <= 1.0 and math.isfinite(loss) and loss > 0
            assert f"{loss:.4f}" in report
        assert info["seeds"][variant] == (2 if variant.startswith("lora") else 0)
    # RIFLEx leaves the trained length alone: its 1x loss is the original model's, exactly.
    assert info["heldout_loss"]["base_riflex"][str(BASE)] == info["heldout_loss"]["base_dense"][str(BASE)]
    assert info["heldout_loss"]["base_riflex"][str(QUAD)] != info["heldout_loss"]["base_dense"][str(QUAD)]
    # Radial rows compute fewer attention FLOPs at 4x than dense rows.
    flops = info["attention_flops"]
    assert flops["lora_radial"][str(QUAD)] < flops["lora_dense"][str(QUAD)] == flops["base_riflex"][str(QUAD)]
    assert set(info["vae_roundtrip"]) == {str(n) for n in (BASE, DOUBLE, QUAD)}
    # Motion of every row and of the real held-out clips at every length, relative to the real clips.
    for key in ("motion_ratio", "failure_rates"):
        assert set(info[key]) == {*VARIANTS, "real"}
        assert all(set(info[key][v]) == {str(n) for n in (BASE, DOUBLE, QUAD)} for v in info[key])
    for by_len in info["failure_rates"].values():
        for rates in by_len.values():
            assert set(rates) == {"frozen", "looping", "degrading"} and all(0.0 <= x <= 1.0 for x in rates.values())
    assert info["motion_ratio"]["real"] == {str(n): 1.0 for n in (BASE, DOUBLE, QUAD)}
    assert all(info["real_motion"][str(n)] > 0 for n in (BASE, DOUBLE, QUAD))  # the real clips move
    assert all(x is None or x >= 0 for v in VARIANTS for x in info["motion_ratio"][v].values())
    # The report leads with the verdicts, then motion, samples, loss, cost.
    heads = [report.index(h) for h in ("## What held", "## Motion at length", "## Samples", "## Held-out", "## Cost")]
    assert heads == sorted(heads)
    for goal in info["goals"]:
        assert f"**{'held' if goal['held'] else 'did NOT hold'}**: {goal['claim']}" in report

    # Both LoRAs for each of the two seeds, their training losses, and the side-by-side timing.
    for variant in ("lora_radial", "lora_dense"):
        runs = [info["train"][f"{variant}_seed{s}"] for s in (0, 1)]
        for s, run in enumerate(runs):
            assert (out / "lora" / f"{variant}_seed{s}" / "pytorch_lora_weights.safetensors").is_file()
            assert len(run["losses"]) == QUICK.train_steps and all(math.isfinite(x) for x in run["losses"])
        assert runs[0]["losses"] != runs[1]["losses"]  # a different seed is a different run
        assert info["sample_spread"][variant][str(QUAD)] >= 0.0
    assert "--seeds 2" in report and "±" in report
    assert info["config"]["radial"]["pattern"] == "radial"
    t = info["timing"]
    assert t["tokens"] == 17 * 16 and t["steps_timed"] == QUICK.timing_steps
    assert t["dense_step_s"] > 0 and t["radial_step_s"] > 0
    assert 0.3 < t["mask_density"] < 0.6  # the 4x mask is really sparse

    # Generated 4x videos of every row (same prompt, seed) and their frame strips.
    for variant in VARIANTS:
        video = out / info["videos"][variant][0]
        assert video.is_file() and video.stat().st_size > 0
        strip = Image.open(out / info["strips"][variant][0])
        assert strip.width > strip.height
        assert info["videos"][variant][0] in report and info["strips"][variant][0] in report

    # A rerun resumes: finished steps are skipped (no LoRA is trained again), the numbers are the same.
    lora_file = out / "lora" / "lora_radial_seed0" / "pytorch_lora_weights.safetensors"
    lora_mtime = lora_file.stat().st_mtime_ns
    assert run_demo(DemoOptions(out=out, quick=True, seeds=2)) == out / "REPORT.md"
    assert lora_file.stat().st_mtime_ns == lora_mtime
    again = json.loads((out / "demo.json").read_text())
    for key in ("heldout_loss", "sample_scores", "timing", "vae_roundtrip"):
        assert again[key] == info[key]


RATES = ("frozen", "looping", "degrading")


def _per_seed(scores: dict[str, dict[int, list[float]]]) -> dict:
    """collect()'s shape from ``{variant: {frames: [all-right score per seed]}}`` (parts = the same value)."""
    return {
        v: {
            str(n): {
                "score": [dict.fromkeys(("all", "colour", "shape", "direction", "speed"), x) for x in xs],
                "loss": [1.0 + 0.01 * i for i in range(len(xs))],
                "flops": [1.0],
                "motion": [  # motion ratio = the score, no failures
                    {"motion_ratio": x, "motion_ratio_quarters": [x] * 4, "failure_rates": dict.fromkeys(RATES, 0.0)}
                    for x in xs
                ],
            }
            for n, xs in by_len.items()
        }
        for v, by_len in scores.items()
    }


def test_tables_average_seeds_and_goals_say_what_held() -> None:
    good = {BASE: [0.70], DOUBLE: [0.5], QUAD: [0.25]}
    scores = {v: good for v in ("base_dense", "base_radial", "base_riflex")}
    scores["lora_radial"] = {BASE: [0.70, 0.68], DOUBLE: [0.6, 0.6], QUAD: [0.70, 0.60]}
    scores["lora_dense"] = {BASE: [0.60, 0.60], DOUBLE: [0.5, 0.5], QUAD: [0.60, 0.70]}
    tables = summarise_runs(_per_seed(scores), prompts=24)
    assert tables["sample_scores"]["lora_radial"][str(QUAD)] == pytest.approx(0.65)
    assert tables["sample_spread"]["lora_radial"][str(QUAD)] == pytest.approx(np.std([0.7, 0.6], ddof=1))
    assert tables["heldout_loss"]["lora_radial"][str(BASE)] == pytest.approx(1.005)
    assert tables["seeds"] == {"base_dense": 0, "base_radial": 0, "base_riflex": 0, "lora_radial": 2, "lora_dense": 2}
    assert tables["motion_ratio"]["lora_radial"][str(QUAD)] == pytest.approx(0.65)  # motion = score here
    assert tables["failure_rates"]["lora_radial"][str(QUAD)] == {"frozen": 0.0, "looping": 0.0, "degrading": 0.0}
    tables["failure_rates"]["real"] = {str(QUAD): {"frozen": 0.0, "looping": 0.0, "degrading": 0.0}}
    # motion: 4x 0.65 < 0.8 fails; above the untuned 0.25; no failures; 1x 0.69 vs the base's 0.70
    assert [g["held"] for g in goals(tables, prompts=24)] == [False, True, True, True] + [True] * 5
    # A LoRA that loses 1x samples, and a dense LoRA far ahead at 4x: those goals fail, the others stay.
    scores["lora_radial"] = {**scores["lora_radial"], BASE: [0.5, 0.5]}
    scores["lora_dense"] = {**scores["lora_dense"], QUAD: [1.0, 1.0]}
    tables = summarise_runs(_per_seed(scores), prompts=24)
    tables["failure_rates"]["real"] = {str(QUAD): {"frozen": 0.0, "looping": 0.0, "degrading": 0.0}}
    verdicts = goals(tables, prompts=24)
    assert [g["held"] for g in verdicts] == [False, True, True, False, True, True, False, False, True]
    assert verdicts[7]["numbers"] == "0.50 vs 0.70"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json.*pretrain_tiny_base.py"):
        run_demo(DemoOptions(out=tmp_path / "d", quick=True, model=tmp_path / "nowhere"))
