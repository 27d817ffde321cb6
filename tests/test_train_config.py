"""Training config: shipped configs validate, bad values are reported by dotted key, overrides work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radial_lora.cli import main
from radial_lora.demo import DEFAULT_CONFIG as DEMO_CONFIG
from radial_lora.train.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_override

CONFIGS = [*sorted((Path(__file__).parents[1] / "configs").glob("*.json")), DEMO_CONFIG]  # the demo's is package data
MINIMAL = {"model": {"id": "m"}, "data": {"path": "d", "lengths": [161], "base_length": 81}}


def test_every_shipped_config_validates() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "lora_length_extension.json",
        "lora_quick_test.json",
        "lora_production.json",
        "lora_hunyuan_4x.json",
        "demo_tiny_4x.json",
    } <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, TrainConfig)
        assert max(cfg.data.lengths) > cfg.data.base_length
    paper = load_config(Path(__file__).parents[1] / "configs" / "lora_length_extension.json")
    assert (paper.data.lengths, paper.data.base_length, paper.lora.rank, paper.radial.dense_layers) == (
        [161],
        81,
        128,
        2,
    )
    assert (paper.radial.decay, paper.train.steps, paper.train.batch_size) == (0.2, 2500, 8)
    hy = load_config(Path(__file__).parents[1] / "configs" / "lora_hunyuan_4x.json")
    assert (hy.data.lengths, hy.train.steps, hy.radial.decay, hy.model.family) == ([509], 1200, 0.95, "hunyuan")
    for path in CONFIGS:  # real models render validation samples at their target length; the CPU ones stay fast
        v, lengths = load_config(path).validation, load_config(path).data.lengths
        fast = path.name in ("lora_quick_test.json", "demo_tiny_4x.json")
        assert (v.sample_prompts == []) if fast else (len(v.sample_prompts) == 2 and v.sample_lengths == [max(lengths)])


def test_toml_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('output_dir = "o"\n[model]\nid = "m"\n[data]\npath = "d"\nlengths = [17]\nbase_length = 9\n')
    cfg = load_config(toml, ["train.steps=7", "optimizer.betas=[0.8,0.9]", "model.id=/x/y", "lora.alpha=null"])
    assert (cfg.train.steps, cfg.optimizer.betas, cfg.model.id, cfg.lora.alpha) == (7, [0.8, 0.9], "/x/y", None)
    assert cfg.optimizer.lr == 1e-4 and cfg.radial.dense_layers == 2  # defaults
    assert parse_override("a.b=3") == (["a", "b"], 3)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.steps")


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"train": {"stepz": 3}}, "train.stepz"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"data": {"path": "d", "lengths": [160], "base_length": 81}}, r"data.lengths\[0\]"),
        ({"data": {"path": "d", "lengths": [81], "base_length": 81}}, "data.lengths"),
        ({"data": {"path": "d", "lengths": [161], "base_length": 80}}, "data.base_length"),
        ({"data": {"path": "d", "lengths": [161, 321], "weights": [1.0], "base_length": 81}}, "data.weights"),
        ({"resolution": {"height": 700}}, "resolution.height"),
        ({"radial": {"pattern": "sparse"}}, "radial.pattern"),
        ({"radial": {"backend": "triton"}}, "radial.backend"),
        ({"optimizer": {"name": "adamw8bit"}}, "optimizer.name"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({"train": {"batch_size": 6, "grad_accum": 4}}, "train.batch_size"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"train": {"distributed": "zero3"}}, "train.distributed"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"schedule": {"warmup_steps": -1}}, "schedule.warmup_steps"),
        ({"validation": {"timesteps": [0]}}, "validation.timesteps"),
        ({"model": {"id": ""}}, "model.id"),
        ({"model": {"id": "m", "family": "sora"}}, "model.family"),
        ({"model": {"id": "m", "family": "wan22", "expert": "medium"}}, "model.expert"),
        ({"model": {"id": "m", "family": "wan", "expert": "low"}}, "model.expert"),
        ({"model": {"id": "m", "family": "hunyuan", "expert": "high"}}, "model.expert"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_values_name_the_key(patch: dict, key: str) -> None:
    data = json.loads(json.dumps(MINIMAL))
    for section, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section].update(value)
        else:
            data[section] = value
    with pytest.raises(ConfigError, match=key):
        config_from_dict(data)


def test_expert_is_for_wan22_only() -> None:
    data = json.loads(json.dumps(MINIMAL))
    for family, expert in (("wan22", "low"), ("wan22", "high"), (None, "low"), ("wan", None)):
        data["model"] = {"id": "m", "family": family, "expert": expert}
        assert config_from_dict(data).model.expert == expert  # no family yet: checked once it is detected
    data["model"] = {"id": "m", "family": "wan", "expert": "low"}
    with pytest.raises(ConfigError, match="model.expert: 'low' is only for model.family 'wan22'"):
        config_from_dict(data)


def test_cli_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL))
    assert main(["train", "--config", str(path), "--set", "train.grad_clip=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.grad_clip" in err and str(path) in err
    assert main(["train", "--config", str(path), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["lengths"] == [161]
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2


def test_config_imports_no_model_library() -> None:
    """Checking a config (`train --check`, every run's first step) must not wait for peft, transformers or
    diffusers to import: the names it validates against live in radial_lora.constants."""
    import subprocess
    import sys

    code = (
        "import sys, radial_lora.train.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'transformers', 'diffusers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
