"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

``OUTPUT/checkpoints/step_000500/`` holds the LoRA (a normal ``pytorch_lora_weights.safetensors``, usable
on its own), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (python, numpy, torch and CUDA generator
states of every process) and ``state.json`` (step, data sampler position, loss history). The directory
is assembled under a temporary name and renamed into place, so an interrupted save never leaves a
half checkpoint that ``--resume latest`` could pick up. Only LoRA parameters are stored, never the base.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radial_lora.lora import LORA_FILENAME, save_lora

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states (python, numpy, torch CPU, CUDA if present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: str) -> Path:
    """``"latest"`` -> newest complete checkpoint of the run; else a checkpoint directory path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}; start without --resume"
            )
        return found[-1][1]
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: {p / STATE_FILE} not found; pass a checkpoints/step_XXXXXX dir")
    return p


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    lora_state: Mapping[str, torch.Tensor],
    lora_config: Mapping[str, Any],
    metadata: Mapping[str, Any],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    rng_states: list[dict[str, Any]],
    trainer_state: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step_XXXXXX`` (temp dir, then rename) and delete all but the newest ``keep_last``."""
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_lora(tmp, lora_state, metadata, lora_config=lora_config)
        torch.save(dict(optimizer_state), tmp / "optimizer.pt")
        torch.save(dict(scheduler_state), tmp / "scheduler.pt")
        torch.save(list(rng_states), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote: lora_state, optimizer, scheduler, rng (list), state."""
    p = Path(path)
    from radial_lora.lora import load_lora_state

    missing = [
        n for n in (LORA_FILENAME, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE) if not (p / n).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {p} is incomplete: missing {missing}")
    return {
        "lora_state": load_lora_state(p),
        "optimizer": torch.load(p / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch.load(p / "scheduler.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(p / "rng.pt", map_location="cpu", weights_only=False),
        "state": json.loads((p / STATE_FILE).read_text(encoding="utf-8")),
    }
