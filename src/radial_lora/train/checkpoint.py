"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically, read as data.

``OUTPUT/checkpoints/step_000500/`` holds

- ``pytorch_lora_weights.safetensors``: the LoRA (a normal LoRA file, usable on its own);
- ``optimizer.safetensors``: the optimizer state's tensors (keyed by parameter name), its structure and
  numbers (param groups, betas, step counts that are not tensors) as JSON in the header;
- ``scheduler.json``: the LR schedule's counters;
- ``rng.json``: the python, numpy, torch and CUDA generator states of every process (integers, hex bytes);
- ``state.json``: format, step, data sampler position, loss history, the sha256 of each file above, and its
  own (``state_sha256``, over the rest of its content). Written last.

Nothing is pickled, so loading a checkpoint someone else made cannot run their code. Before loading, every file
is checked against its recorded sha256: a truncated or damaged file is named, and ``--resume latest`` takes the
newest checkpoint that is whole (:func:`find_resume`). The directory is assembled under a temporary name and
renamed into place, so an interrupted save never leaves a half checkpoint behind; a checkpoint of the same step
already there (a damaged one passed over, or a later one when resuming from an earlier) moves to
``OUTPUT/previous/<time>/checkpoints/`` instead of being replaced. Only LoRA parameters are stored, never the base.

Checkpoints of radial-lora before this format (``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: pickles, no
checksums) are read with ``torch.load(weights_only=True)`` (tensors, numbers, and numpy's RNG arrays only); one
that holds anything else is refused, unloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from radial_lora.files import atomic_path, jsonable, set_aside, sha256_file, write_json_atomic
from radial_lora.lora import LORA_FILENAME, load_lora_state, save_lora

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.json"
CHECKPOINT_FORMAT = "radial-lora-checkpoint/2"
FILES = (LORA_FILENAME, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE)  # each with its sha256 in state.json
LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")  # format 1: pickles
_STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: a file missing, damaged, or not plain data. ``reason`` names the file."""

    def __init__(self, path: Path, reason: str, advice: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever the underlying error printed
        super().__init__(f"checkpoint {path}: {reason}; {advice}")
        self.reason = reason


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# --- generator states as JSON --------------------------------------------------------------------


def _hex(t: torch.Tensor) -> str:
    return t.contiguous().numpy().tobytes().hex()


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states (python, numpy, torch CPU, CUDA if present) as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"bit_generator": name, "keys": [int(k) for k in keys], "pos": int(pos)},
        "torch": _hex(torch.get_rng_state()),
    }
    state["numpy"] |= {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = [_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _rng_objects(state: Mapping[str, Any]) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor] | None]:
    """(python, numpy, torch, CUDA) states of one :func:`capture_rng_state` value, as the setters take them."""
    py, npy = state["python"], state["numpy"]
    python = (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"])
    numpy = (
        str(npy["bit_generator"]),
        np.array(npy["keys"], dtype=np.uint32),
        int(npy["pos"]),
        int(npy["has_gauss"]),
        float(npy["cached_gaussian"]),
    )

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)

    cuda = [tensor(s) for s in state["cuda"]] if "cuda" in state else None
    return python, numpy, tensor(state["torch"]), cuda


def restore_rng_state(state: Mapping[str, Any]) -> None:
    python, numpy, cpu, cuda = _rng_objects(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --- the optimizer state as safetensors + JSON ---------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON: tensors move to ``tensors`` (a reference stays), tuples, non-finite floats and dicts
    with other keys than strings are tagged so :func:`_decode` gives back exactly the same types."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (only tensors, numbers and strings)")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_optimizer(path: Path, state: Mapping[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(dict(state), tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "structure": structure})


def _load_optimizer(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        structure = json.loads((f.metadata() or {})["structure"])
    return _decode(structure, load_safetensors(path.read_bytes()))  # bytes, not a map of a file that may go


# --- finding, writing and reading checkpoints ----------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``state.json``), oldest first; not yet checked for damage."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(output_dir: str | os.PathLike, resume: str) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint to continue from, loaded (:func:`load_checkpoint` plus ``"path"``), and for ``"latest"``
    the newer checkpoints passed over because they are damaged (``"step_000600 (optimizer.safetensors: ...)"``).

    ``resume``: ``"latest"`` (the newest whole checkpoint of ``output_dir``) or a checkpoint directory."""
    if resume != "latest":
        p = Path(resume)
        if not (p / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: {p / STATE_FILE} not found; pass a checkpoints/step_XXXXXX dir"
            )
        return {**load_checkpoint(p), "path": p}, []
    root = Path(output_dir) / CHECKPOINT_DIR
    found = list_checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root}; start without --resume")
    skipped: list[str] = []
    for _, p in reversed(found):
        try:
            return {**load_checkpoint(p), "path": p}, skipped
        except CheckpointError as exc:
            skipped.append(f"{p.name} ({exc.reason})")
    raise ValueError(
        f"--resume latest: no whole checkpoint in {root}: {'; '.join(skipped)}; start afresh with --overwrite "
        "(the damaged checkpoints move aside, kept)"
    )


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
    """Write ``checkpoints/step_XXXXXX`` (temp dir, then rename) and delete all but the newest ``keep_last``.

    ``rng_states``: one :func:`capture_rng_state` per process."""
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_lora(tmp, lora_state, metadata, lora_config=lora_config)
        save_optimizer(tmp / OPTIMIZER_FILE, optimizer_state)
        write_json_atomic(tmp / SCHEDULER_FILE, _encode(dict(scheduler_state), {}))
        write_json_atomic(tmp / RNG_FILE, list(rng_states))
        checksums = {name: sha256_file(tmp / name) for name in FILES}
        state = jsonable({"format": CHECKPOINT_FORMAT, "step": step, **trainer_state, "files": checksums})
        write_json_atomic(tmp / STATE_FILE, {**state, "state_sha256": _state_digest(state)})
        if final.exists():  # this step again (resumed from an earlier checkpoint): keep the old one, aside
            moved = set_aside(output_dir, [f"{CHECKPOINT_DIR}/{final.name}"], overwrite=True, holds="", ways="")
            logger.info("%s was there already (resumed from an earlier step): moved to %s", final, moved)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def _state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of ``state.json``'s content without its own ``state_sha256`` (keys sorted): the file checks itself."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, allow_nan=False).encode()).hexdigest()


_DAMAGED = "resume from another checkpoint (--resume latest takes the newest whole one)"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote: lora_state, optimizer, scheduler, rng (list), state.

    Every file is checked against its sha256 in ``state.json`` first; a missing, damaged or foreign file is a
    :class:`CheckpointError` naming it."""
    p = Path(path)
    try:
        state = json.loads((p / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(p, f"{STATE_FILE} is missing", _DAMAGED) from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(p, f"{STATE_FILE} is damaged ({exc})", _DAMAGED) from None
    if not isinstance(state, dict):
        raise CheckpointError(p, f"{STATE_FILE} is not a checkpoint state", _DAMAGED)
    if "files" not in state and any((p / n).is_file() for n in LEGACY_FILES):
        return _load_legacy(p, state)
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("files"), dict):
        raise CheckpointError(
            p, f"{STATE_FILE} has format {state.get('format')!r}, not {CHECKPOINT_FORMAT!r}", "update radial-lora"
        )
    if state.pop("state_sha256", None) != _state_digest(state):
        raise CheckpointError(p, f"{STATE_FILE} differs from its own sha256 (state_sha256: damaged)", _DAMAGED)
    for name in FILES:
        recorded = state["files"].get(name)
        if not (p / name).is_file():
            raise CheckpointError(p, f"{name} is missing", _DAMAGED)
        if recorded != sha256_file(p / name):
            raise CheckpointError(p, f"{name} differs from its sha256 in {STATE_FILE} (truncated or damaged)", _DAMAGED)
    current = ""
    try:
        current = LORA_FILENAME
        lora_state = load_lora_state(p)
        current = OPTIMIZER_FILE
        optimizer = _load_optimizer(p / OPTIMIZER_FILE)
        current = SCHEDULER_FILE
        scheduler = _decode(json.loads((p / SCHEDULER_FILE).read_text(encoding="utf-8")), {})
        current = RNG_FILE
        rng = json.loads((p / RNG_FILE).read_text(encoding="utf-8"))
        for entry in rng:
            _rng_objects(entry)
    except (ValueError, KeyError, TypeError, IndexError, SafetensorError, OSError) as exc:
        raise CheckpointError(p, f"{current} cannot be read ({type(exc).__name__}: {exc})", _DAMAGED) from None
    return {"lora_state": lora_state, "optimizer": optimizer, "scheduler": scheduler, "rng": rng, "state": state}


def _load_legacy(p: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of radial-lora before format 2 (pickles): ``torch.load(weights_only=True)``, which builds
    tensors, numbers, strings and containers only; the numpy RNG array is the one other thing allowed."""
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    loaded: dict[str, Any] = {}
    for name in LEGACY_FILES:
        if not (p / name).is_file():
            raise CheckpointError(p, f"{name} is missing", _DAMAGED)
        try:
            with torch.serialization.safe_globals(allowed):
                loaded[name] = torch.load(p / name, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():  # a cut-off pickle, not a refused one
                raise CheckpointError(p, f"{name} cannot be read (truncated or damaged: {exc})", _DAMAGED) from None
            what = re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(exc))
            holds = f"a reference to {what.group(1)}" if what else "more than tensors and numbers"
            raise CheckpointError(
                p,
                f"{name} (an older radial-lora's pickle) holds {holds}, so it is not loaded (loading it could run "
                "code)",
                "resume from a checkpoint you trust that this radial-lora wrote, or start afresh with --overwrite",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(p, f"{name} cannot be read (truncated or damaged: {exc})", _DAMAGED) from None
    try:
        rng = [_legacy_rng(s) for s in loaded["rng.pt"]]
        lora_state = load_lora_state(p)
    except (ValueError, KeyError, TypeError, IndexError, SafetensorError, OSError) as exc:
        raise CheckpointError(p, f"cannot be read ({type(exc).__name__}: {exc})", _DAMAGED) from None
    logger.info("%s: a checkpoint of an older radial-lora (no checksums), read as data", p)
    return {
        "lora_state": lora_state,
        "optimizer": loaded["optimizer.pt"],
        "scheduler": loaded["scheduler.pt"],
        "rng": rng,
        "state": state,
    }


def _legacy_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 ``rng.pt`` entry (python tuple, numpy tuple, tensors) as :func:`capture_rng_state` gives it."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss},
        "numpy": {
            "bit_generator": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _hex(state["torch"]),
    }
    if "cuda" in state:
        out["cuda"] = [_hex(s) for s in state["cuda"]]
    _rng_objects(out)
    return out
