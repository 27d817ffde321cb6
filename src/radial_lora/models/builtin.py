"""Models shipped inside the package, named ``builtin:NAME`` anywhere a model id or folder is accepted.

Why: the quick-test config, the demo and the documentation's examples must run on any machine, from a clone or
an installed wheel, without a download; a repository-relative path would only work from the repository root.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_MODELS: dict[str, Path] = {
    "tiny-wan-base": ASSETS / "tiny-wan-base"  # WanPipeline, 17 frames 32x32 (its README is the model card)
}


def resolve_model_id(model: str | os.PathLike[str]) -> str:
    """A ``builtin:NAME`` id as its folder; any other id or path unchanged."""
    text = os.fspath(model)
    if not text.startswith(PREFIX):
        return text
    name = text[len(PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown built-in model {text!r}; built-in models: {', '.join(PREFIX + n for n in BUILTIN_MODELS)}"
        )
    return str(BUILTIN_MODELS[name])


def model_identity(model: str | os.PathLike[str], transformer_config: Any) -> dict[str, Any]:
    """What a LoRA was trained on, in words that survive a move to another machine: the hub id or
    ``builtin:`` name as given (a local folder: its name), a hash of the transformer's config, and its
    ``mlp_ratio`` where it has one (HunyuanVideo's ComfyUI export sizes its fused ``linear1`` with it)."""
    text = os.fspath(model)
    local = Path(resolve_model_id(text))
    name = text if text.startswith(PREFIX) or not local.is_dir() else local.resolve().name
    config = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    identity: dict[str, Any] = {"base_model_name": name, "transformer_config_sha256": digest}
    if config.get("mlp_ratio") is not None:
        identity["mlp_ratio"] = float(config["mlp_ratio"])
    return identity
