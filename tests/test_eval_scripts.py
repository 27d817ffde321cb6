"""The GPU flow scripts: syntax (bash -n) and the commands they run, with stub executables on PATH."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "scripts" / "train_lora_length_extension.sh", ROOT / "scripts" / "evaluate_lora_comprehensive.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    assert "set -euo pipefail" in script.read_text()


def _stubs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """`radial-lora` and `accelerate` stubs that append their arguments to calls.log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("radial-lora", "accelerate", "nvidia-smi"):
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def test_full_flow_commands(tmp_path: Path) -> None:
    env, log = _stubs(tmp_path)
    env.update(
        VIDEOS="/data/clips",
        RUN_DIR=str(tmp_path / "run"),
        NUM_GPUS="4",
        LENGTHS="161,321",
        LORA="ignored",
        TRAIN_SET="train.steps=10 lora.rank=64",
    )
    done = subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:3] for c in calls] == [
        ["radial-lora", "data", "prepare"],
        ["radial-lora", "data", "validate"],
        ["accelerate", "launch", "--num_processes"],
        ["radial-lora", "evaluate", "--model"],
    ]
    assert "--lengths 161,321" in calls[0] and "--num_processes 4" in calls[2]
    assert "--set data.lengths=[161,321] " in calls[2] and calls[2].endswith("--set train.steps=10 --set lora.rank=64")
    assert f"--lora {tmp_path}/run/lora " in calls[3] and f"--dataset {tmp_path}/run/dataset" in calls[3]


def test_missing_required_env(tmp_path: Path) -> None:
    env, _ = _stubs(tmp_path)
    env.pop("VIDEOS", None)
    done = subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "VIDEOS" in done.stderr
    env.pop("MODEL", None)
    done = subprocess.run(["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "MODEL" in done.stderr
