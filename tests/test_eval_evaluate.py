"""`radial-lora evaluate` on the tiny Wan model: report, plots, results.json numbers, held-out loss, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radial_lora.cli import main
from radial_lora.eval.evaluate import make_variants, parse_lengths
from radial_lora.files import from_jsonable
from radial_lora.locks import LOCK_NAME

LENGTHS = (9, 17)
VARIANTS = ("base_dense", "base_radial", "lora_dense", "lora_radial")


@pytest.fixture(scope="module")
def dataset_32(one_torch_thread, tiny_wan_dir: Path, tmp_path_factory) -> Path:
    """Prepared 9/17-frame buckets at 32x32 (4 tokens per latent frame), two sample videos."""
    from radial_lora.data.prepare import PrepareOptions, prepare_dataset
    from radial_lora.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("eval_data")
    write_sample_dataset(root / "videos", num_videos=2, num_frames=17, size=32, fps=16.0, seed=0)
    prepare_dataset(
        PrepareOptions(
            input=root / "videos",
            out=root / "ds",
            model=str(tiny_wan_dir),
            family="wan",
            lengths=LENGTHS,
            height=32,
            width=32,
            fps=16.0,
            dtype="float32",
        )
    )
    return root / "ds"


@pytest.fixture(scope="module")
def grid(one_torch_thread, tiny_wan_dir: Path, tiny_wan_lora: Path, dataset_32: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = [*_grid_args(tiny_wan_dir, tiny_wan_lora), "--dataset", str(dataset_32), "--heldout-max-clips", "2"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    return out


def _grid_args(model: Path, lora: Path) -> list[str]:
    """The evaluate command of the grid fixture and its rerun: 2 lengths, base and LoRA, 2 steps."""
    return [
        "evaluate",
        "--model",
        str(model),
        "--prompt",
        "a red circle moves right",
        "--lengths",
        "9,17",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--lora",
        str(lora),
    ]


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"results.json holds a bare {name}")

    return json.loads(text, parse_constant=refuse)


def _numbers(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, int | float | str) and not isinstance(value, bool):
        yield path, value


def test_results_json_complete_and_finite(grid: Path) -> None:
    raw = _strict((grid / "results.json").read_text())
    for path, value in _numbers(raw):
        if isinstance(value, str):
            # the only non-numbers allowed in numeric fields: "inf" for identical videos' PSNR
            assert value != "-inf" and (value != "inf" or "psnr" in path), path
        else:
            assert math.isfinite(value), path
    res = from_jsonable(raw)
    assert res["lengths"] == list(LENGTHS) and [v["name"] for v in res["variants"]] == list(VARIANTS)
    cells = {(c["variant"], c["length"]): c for c in res["cells"]}
    assert set(cells) == {(v, n) for v in VARIANTS for n in LENGTHS}
    for (variant, _), c in cells.items():
        assert c["wall_time_s"] > 0 and c["peak_memory_bytes"] > 0
        assert c["settings"]["block_size"] == 4 and c["settings"]["decay_factor"] == 0.5  # from the LoRA header
        a = c["attention"]
        assert a["attention_flops"] == pytest.approx(a["effective_density"] * a["attention_flops_dense"])
        assert c["reference"] == variant.replace("radial", "dense")
        assert all((grid / v).is_file() for v in c["videos"])
        if variant.endswith("dense"):  # dense vs itself: identical
            q = c["quality"]
            assert q["psnr"] == math.inf and q["ssim"] == pytest.approx(1.0) and q["psnr_drop"] == 0.0
            assert a["effective_density"] == 1.0
    for weights in ("base", "lora"):
        # 9 frames: the radial mask keeps every block, so radial equals dense exactly
        assert cells[(f"{weights}_radial", 9)]["quality"]["psnr"] == math.inf
        assert cells[(f"{weights}_radial", 9)]["attention"]["mask_density"] == 1.0
        # 17 frames: sparser mask, close to dense but not equal
        c17 = cells[(f"{weights}_radial", 17)]
        assert c17["attention"]["mask_density"] < 1.0
        assert 20 < c17["quality"]["psnr"] < math.inf and 0.5 < c17["quality"]["ssim"] < 1.0
        assert len(c17["quality"]["drift_psnr"]) == 4
    # held-out loss per length; with a full mask (9 frames) radial and dense agree
    h = res["heldout"]
    assert set(h) == set(VARIANTS) and set(h["base_radial"]["per_bucket"]) == {"9", "17"}
    assert h["base_radial"]["per_bucket"]["9"] == pytest.approx(h["base_dense"]["per_bucket"]["9"], rel=1e-5)
    assert h["lora_radial"]["per_bucket"]["9"] != pytest.approx(h["base_radial"]["per_bucket"]["9"], rel=1e-6)
    assert cells[("lora_radial", 17)]["heldout_loss"] == h["lora_radial"]["per_bucket"]["17"]
    # motion of every cell against the real held-out clips (decoded from their latents) of the same length
    assert set(res["real"]) == {"9", "17"} and all(r["motion"] > 0 for r in res["real"].values())
    assert set(res["failure_rates"]) == {*VARIANTS, "real"}
    for (variant, n), c in cells.items():
        m = c["motion"]
        assert len(m["per_video"]) == 1 and len(m["motion_quarters"]) == 4
        assert m["motion_ratio"] == pytest.approx(m["motion"] / res["real"][str(n)]["motion"])
        assert res["motion_ratio"][variant][str(n)] == m["motion_ratio"]
        assert set(m["failure_rates"]) == {"frozen", "looping", "degrading"}
        assert res["failure_rates"][variant][str(n)] == m["failure_rates"]


def test_report_and_pictures(grid: Path) -> None:
    report = (grid / "report.md").read_text()
    assert report.index("## Summary") < report.index("## 9 frames") < report.index("## 17 frames")
    assert "held-out loss under radial attention is" in report
    assert "| lora_radial |" in report and "## Held-out flow-matching loss" in report
    assert "## Motion at length" in report and "| real |" in report
    for png in ["metrics_vs_length.png", "radial_masks.png", "motion_over_time.png"] + [
        f"strips/{v}_f{n:04d}.png" for v in VARIANTS for n in LENGTHS
    ]:
        assert f"({png})" in report
        with Image.open(grid / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_rerun_reuses_cells(grid: Path, tiny_wan_dir: Path, tiny_wan_lora: Path, tiny_wan_dataset: Path) -> None:
    def videos() -> dict[Path, int]:  # the lock file aside: it names each run's holder
        return {p: p.stat().st_mtime_ns for p in (grid / "videos").iterdir() if p.name != LOCK_NAME}

    before = videos()
    argv = [*_grid_args(tiny_wan_dir, tiny_wan_lora), "--out", str(grid)]
    assert main(argv) == 0  # without --dataset: an analysis option, the cells are still reused
    assert videos() == before
    res = json.loads((grid / "results.json").read_text())
    assert all(c["reused"] for c in res["cells"]) and res["heldout"] == {}
    assert "held-out" not in (grid / "report.md").read_text()  # no dataset this time: no empty column


def test_lengths_and_variants_parsing(tmp_path: Path) -> None:
    assert parse_lengths("33,17,17", 81) == [17, 33]
    assert parse_lengths("1x,2x", 81) == [81, 161]
    with pytest.raises(ValueError, match="4k\\+1"):
        parse_lengths("20", 81)
    with pytest.raises(ValueError, match="neither"):
        parse_lengths("long", 81)
    with pytest.raises(ValueError, match="needs --lora"):
        make_variants(["lora_radial"])
    with pytest.raises(ValueError, match="unknown variant"):
        make_variants(["base_sparse"])
    assert [v.loras for v in make_variants(["base_dense", "lora2_radial"], None, ("x", 0.5))] == [(), (("x", 0.5),)]


def test_prompt_defaults(tmp_path: Path) -> None:
    import argparse

    from radial_lora.cli.evaluate import DEFAULT_PROMPTS
    from radial_lora.cli.generate import images_of, prompt_entries

    none = argparse.Namespace(prompt=None, prompts=None)
    assert prompt_entries(none, DEFAULT_PROMPTS) == [(p, None) for p in DEFAULT_PROMPTS]
    with pytest.raises(ValueError, match="--prompt"):
        prompt_entries(none)  # generate has no default
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    given = argparse.Namespace(prompt=["zero"], prompts=tmp_path / "p.txt")
    assert [p for p, _ in prompt_entries(given, DEFAULT_PROMPTS)] == ["zero", "one", "two"]
    assert images_of(prompt_entries(given)) is None
    # Image-to-video: a JSON file pairs prompts with images (relative to the file); --image fills the others.
    (tmp_path / "p.json").write_text('[{"prompt": "a", "image": "a.png"}, "b"]')
    paired = argparse.Namespace(prompt=None, prompts=tmp_path / "p.json", image=tmp_path / "all.png")
    assert prompt_entries(paired) == [("a", tmp_path / "a.png"), ("b", tmp_path / "all.png")]
    with pytest.raises(ValueError, match="prompt 1 .* has no image"):
        images_of(prompt_entries(argparse.Namespace(prompt=None, prompts=tmp_path / "p.json", image=None)))
    (tmp_path / "bad.json").write_text('[{"prompt": "a", "image": 3}]')
    with pytest.raises(ValueError, match="entry 0's image must be a path"):
        prompt_entries(argparse.Namespace(prompt=None, prompts=tmp_path / "bad.json"))


def test_base_length_comes_from_flag_lora_then_family(tiny_wan_dir: Path, tiny_wan_lora: Path, tmp_path: Path) -> None:
    import shutil

    from radial_lora import lora as lora_io
    from radial_lora.cli.generate import base_length

    assert base_length(33, (str(tiny_wan_lora), 1.0), None, "any") == (33, "--base-frames")
    # A radial-lora LoRA records the length it extends from.
    recorded = tmp_path / "recorded"
    shutil.copytree(tiny_wan_lora, recorded)
    state = lora_io.load_lora_state(recorded)
    meta = {**lora_io.read_lora_metadata(recorded), "base_length": 17}
    lora_io.save_lora(recorded, state, meta)
    assert base_length(None, (str(recorded), 1.0), None, "hub/id")[0] == 17
    # Without base_length: the family's default length (the LoRA's family, --family, the model folder's).
    assert base_length(None, (str(tiny_wan_lora), 1.0), None, "hub/id") == (
        81,
        "the wan default, family from the LoRA's metadata",
    )
    assert base_length(None, None, "hunyuan", "hub/id") == (129, "the hunyuan default, family from --family")
    value, source = base_length(None, None, None, str(tiny_wan_dir))
    assert value == 81 and "model_index.json" in source
    with pytest.raises(ValueError, match="--base-frames"):
        base_length(None, None, None, "some-org/some-model")


def test_riflex_variant_and_sample_scores(one_torch_thread, tiny_wan_dir: Path, tmp_path: Path) -> None:
    """base_riflex is the base under dense attention with RIFLEx: identical to base_dense at the training length
    (RIFLEx keeps a covered length's frequency), different beyond it; sample captions get a sample score.
    The tiny model's component 1 has a period of 6.3 latent frames: 9 frames (3) and 17 (5) are covered, 33 (9)
    is not."""
    from radial_lora.data.sample import caption_for, sample_specs
    from radial_lora.eval.evaluate import GridOptions, run_grid

    prompts = [caption_for(s) for s in sample_specs(2, seed=5)]
    opts = GridOptions(
        model=str(tiny_wan_dir),
        prompts=prompts,
        lengths=[9, 33],
        variants=make_variants(["base_dense", "base_riflex"]),
        out_dir=tmp_path / "eval",
        height=32,
        width=32,
        steps=2,
        guidance=1.0,
        base_frames=9,
    )
    results = run_grid(opts)
    cells = {(c["variant"], c["length"]): c for c in results["cells"]}
    assert cells["base_riflex", 9]["settings"]["riflex_k"] == 1
    assert cells["base_dense", 9]["settings"]["riflex_k"] is None

    def frames(cell):
        return [np.load(tmp_path / "eval" / Path(v).with_suffix(".npz"))["frames"] for v in cell["videos"]]

    assert all(np.array_equal(a, b) for a, b in zip(frames(cells["base_dense", 9]), frames(cells["base_riflex", 9])))
    assert not all(
        np.array_equal(a, b) for a, b in zip(frames(cells["base_dense", 33]), frames(cells["base_riflex", 33]))
    )
    for cell in cells.values():
        score = cell["sample_score"]
        assert score["n"] == 2 and len(score["per_prompt"]) == 2 and 0.0 <= score["all"] <= 1.0
    assert set(results["sample_scores"]) == {"base_dense", "base_riflex"}
    assert set(results["sample_scores"]["base_riflex"]) == {"9", "33"}
    assert "## Samples: do the videos show their captions?" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(ValueError, match="--base-frames"):
        run_grid(GridOptions(**{**opts.__dict__, "base_frames": None}))


def test_sample_scores_are_left_out_for_free_text_prompts(grid: Path) -> None:
    results = json.loads((grid / "results.json").read_text())
    assert results["sample_scores"] == {} and all(c["sample_score"] is None for c in results["cells"])


def test_other_settings_are_refused_and_overwrite_moves_the_evaluation_aside(
    grid: Path, tiny_wan_dir: Path, tiny_wan_lora: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(grid, out)
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    argv = [*_grid_args(tiny_wan_dir, tiny_wan_lora), "--out", str(out)]
    steps = argv.index("--steps") + 1
    argv[steps] = "3"
    capsys.readouterr()
    assert main(argv) == 2  # before the model loads: results.json says the videos were made with 2 steps
    (error,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert error == (
        f"radial-lora evaluate: error: {out} already holds an evaluation with other settings (steps 2 -> 3); choose "
        "another --out (a rerun with the same settings reuses its finished cells), or pass --overwrite to move it "
        f"into {out}/previous/<time>/ (nothing is deleted)"
    )
    # An interrupted evaluation has no results.json yet: the first cell of other settings is caught before it is
    # replaced, with the same way on (--overwrite moves OUT aside).
    (out / "results.json").unlink()
    assert main(argv) == 2
    (error,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"{out} already holds videos made with other settings (" in error and "steps 2 -> 3" in error
    assert f"--overwrite to move it into {out}/previous/<time>/" in error
    now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    assert now == {k: v for k, v in old.items() if k != Path("results.json")}  # nothing replaced

    (out / "results.json").write_bytes(old[Path("results.json")])
    assert main([*argv, "--overwrite"]) == 0
    (aside,) = (out / "previous").iterdir()
    assert {
        p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file() and p.name != LOCK_NAME
    } == old
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["steps"] == 3 and not any(c["reused"] for c in res["cells"])
