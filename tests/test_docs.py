"""Every `bash` block of README.md and docs/*.md runs, on the shipped tiny model, as the README says to try it.

The commands run in order in one working directory (README first, then docs/ by name), so a block may use
what an earlier one wrote, as a reader following the pages would. What changes, and only this (README, "The
job, end to end"): model ids -> ``builtin:tiny-wan-base`` (image-to-video ids: a random tiny
``WanImageToVideoPipeline``, and ``photo.png`` a grey picture); pixel sizes -> 32x32; 81/161/321 frames -> 17/33/65;
a few steps (``--steps 2``, ``train.steps=2``, small LoRA, no periodic checkpoints, validation or samples;
``evaluate`` on one held-out clip);
multi-GPU launchers -> the ``radial-lora`` command they launch, on one process (``train.sequence_parallel=1``,
no ``--sequence-parallel``); ``/data/clips`` -> sample videos; ``mask`` and ``plan`` run as written (arithmetic
at the real size). A required option missing from a documented command is not added: that command fails
here, as it would for a reader.
``text`` blocks are synopses (brackets, placeholders) and are not run; nor are lines of other programs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radial_lora.cli import main
from radial_lora.data.sample import write_sample_dataset
from radial_lora.models.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = "builtin:tiny-wan-base"
MODEL_IDS = {"PATH_OR_HUB_ID", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
TINY_I2V = "tiny-wan-i2v"  # a random tiny WanImageToVideoPipeline the test saves in its working directory
I2V_MODEL_IDS = {"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"}
FRAMES = {81: 17, 161: 33, 321: 65}
SIZE = 32
LAUNCHERS = ("accelerate", "torchrun")
TRAIN_SHRINK = (
    "train.steps=2",
    "train.batch_size=1",
    "train.grad_accum=1",
    "lora.rank=4",
    "lora.alpha=4",
    "checkpoint.every=0",
    "validation.every=0",
    "validation.sample_prompts=[]",
    "train.gradient_checkpointing=false",
    "optimizer.fused=false",
    "model.dtype=float32",
    "train.sequence_parallel=1",
    "train.offload_checkpoints=false",
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def bash_commands(page: Path) -> list[tuple[int, str]]:
    """``(line, command)`` for each ``radial-lora`` command of the page's bash blocks (continuations joined)."""
    text = page.read_text(encoding="utf-8")
    out = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text[: block.start()].count("\n") + 2
        lines = block.group(1).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            words = shlex.split(line, comments=True)
            if words and (words[0] == "radial-lora" or words[0] in LAUNCHERS):
                out.append((first + start, line))
    return out


def _tiny_model(word: str) -> str:
    """A documented model id as the tiny model of its task; any other word unchanged."""
    return TINY if word in MODEL_IDS else TINY_I2V if word in I2V_MODEL_IDS else word


def _frames(text: str) -> str:
    return ",".join(str(FRAMES.get(int(n), int(n))) if n.isdigit() else n for n in text.split(","))


def tiny_argv(words: list[str]) -> list[str]:
    """The argv after ``radial-lora``, with the substitutions of the module docstring."""
    if words[0] in LAUNCHERS:
        words = words[words.index("$(which") + 1 :] if "$(which" in words else words
        words = ["radial-lora", *words[1:]] if words[0] == "radial-lora)" else words
    if words[1] in ("mask", "plan"):  # arithmetic at the real size: milliseconds
        return words[1:]
    argv = [_tiny_model(w) for w in words[1:]]
    if "--sequence-parallel" in argv:  # one process here
        i = argv.index("--sequence-parallel")
        del argv[i : i + 2]
    for i, w in enumerate(argv[:-1]):
        nxt = argv[i + 1]
        if w in ("--height", "--width"):
            argv[i + 1] = str(SIZE)
        elif w in ("--frames", "--lengths"):
            argv[i + 1] = _frames(nxt)
        elif w == "--size":
            argv[i + 1] = f"{SIZE}x{SIZE}"
        elif w == "--set":
            key, _, value = nxt.partition("=")
            if key in ("resolution.height", "resolution.width"):
                argv[i + 1] = f"{key}={SIZE}"
            elif key == "model.id":
                argv[i + 1] = f"{key}={_tiny_model(value)}"
    if argv[0] == "train":
        argv += [x for kv in _train_overrides(argv) for x in ("--set", kv)]
    if argv[0] in ("generate", "evaluate"):
        for flag, value in (("--steps", "2"), ("--height", str(SIZE)), ("--width", str(SIZE))):
            if flag not in argv:
                argv += [flag, value]
        if argv[0] == "evaluate" and "--heldout-max-clips" not in argv:
            argv += ["--heldout-max-clips", "1"]
    return argv


def _train_overrides(argv: list[str]) -> list[str]:
    """The config's model, lengths and sizes mapped to the tiny model, then the few-steps settings; the
    command's own ``--set`` values (already mapped) stay in force where they set the same key."""
    cfg = json.loads((ROOT / argv[argv.index("--config") + 1]).read_text())
    own = {argv[i + 1].partition("=")[0] for i, w in enumerate(argv) if w == "--set"}
    mapped = {
        "model.id": _tiny_model(cfg["model"]["id"]),
        "data.lengths": json.dumps([FRAMES.get(n, n) for n in cfg["data"].get("lengths", [])]),
        "data.base_length": str(FRAMES.get(cfg["data"].get("base_length", 81), cfg["data"].get("base_length"))),
        "resolution.height": str(SIZE),
        "resolution.width": str(SIZE),
    }
    return [f"{k}={v}" for k, v in mapped.items() if k not in own] + list(TRAIN_SHRINK)


def test_every_page_has_its_commands_found() -> None:
    found = {p.name: len(bash_commands(p)) for p in PAGES}
    assert found["README.md"] >= 7 and found["LORA_LENGTH_EXTENSION.md"] >= 5 and found["TRAINING.md"] >= 4, found


def test_documented_commands_run_on_the_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    write_sample_dataset(tmp_path / "clips", num_videos=6, num_frames=36, size=SIZE, seed=3)
    save_tiny_pipeline("wan-i2v", tmp_path / TINY_I2V)  # docs/IMAGE_TO_VIDEO.md's model, in miniature
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(tmp_path / "photo.png")  # its --image
    ran = []
    for page in PAGES:
        for line, command in bash_commands(page):
            words = [str(tmp_path / "clips") if w == "/data/clips" else w for w in shlex.split(command, comments=True)]
            argv = tiny_argv(words)
            code = main(argv)
            assert code == 0, f"{page.name}:{line}: `{command}` exited {code} (ran as: radial-lora {shlex.join(argv)})"
            ran.append(f"{page.name}:{line}")
    assert len(ran) >= 16, ran
    assert (tmp_path / "runs" / "wan14b_2x" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs" / "eval" / "report.md").is_file() and (tmp_path / "mask.png").is_file()
    assert (tmp_path / "runs" / "quick" / "lora" / "pytorch_lora_weights.safetensors").is_file()
