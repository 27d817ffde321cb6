"""The model families radial-lora knows, by name, and which one a pipeline, transformer or folder is.

Explicit: the adapters are listed here, not registered as a side effect of importing their modules, and
detection asks each adapter which diffusers classes are its own (``pipeline_class_name``,
``transformer_class_name``); Wan2.2 shares Wan2.1's classes and is told apart by ``wan.is_wan22_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from radial_lora.models.adapter import ModelAdapter
from radial_lora.models.hunyuan import HunyuanAdapter
from radial_lora.models.wan import Wan22Adapter, WanAdapter, is_wan22, is_wan22_config
from radial_lora.models.wan_i2v import Wan22I2VAdapter, WanI2VAdapter, is_wan_i2v_config

ADAPTERS: dict[str, ModelAdapter] = {
    a.family: a for a in (WanAdapter(), Wan22Adapter(), HunyuanAdapter(), WanI2VAdapter(), Wan22I2VAdapter())
}
# A transformer taken out of its pipeline keeps the family its pipeline had (a Wan2.2 expert is a plain
# WanTransformer3DModel): detecting a pipeline tags its transformers with this attribute.
_FAMILY_ATTR = "_radial_lora_family"


def families() -> list[str]:
    """The family names ("hunyuan", "wan", "wan-i2v", "wan22", "wan22-i2v")."""
    return sorted(ADAPTERS)


def get_adapter(family: str) -> ModelAdapter:
    """The adapter of ``family``."""
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(families())}") from None


def detect_family(pipe_or_transformer: Any) -> str:
    """Family of a pipeline, a transformer, or a saved pipeline directory (its ``model_index.json``).

    A lone Wan transformer cannot show whether a second expert exists: detecting a pipeline tags its
    transformers with the family, so a Wan2.2 expert taken out of its pipeline still reports "wan22";
    an untagged Wan transformer reports "wan", except TI2V-5B's (48 latent channels).
    """
    tagged = getattr(pipe_or_transformer, _FAMILY_ATTR, None)
    if isinstance(pipe_or_transformer, nn.Module) and tagged is not None:
        return tagged
    if isinstance(pipe_or_transformer, str | os.PathLike):
        return family_of_index(_model_index(pipe_or_transformer), where=str(pipe_or_transformer))
    name = type(pipe_or_transformer).__name__
    config = getattr(pipe_or_transformer, "config", None) or {}
    i2v = isinstance(pipe_or_transformer, nn.Module) and is_wan_i2v_config(dict(config))
    family = family_of_class(name, is_wan22(pipe_or_transformer), name, i2v=i2v)
    if name in {a.pipeline_class_name for a in ADAPTERS.values()}:
        tag_transformers(pipe_or_transformer, family)
    return family


def _model_index(model: str | os.PathLike) -> dict[str, Any]:
    """A pipeline's ``model_index.json``: from its folder, or for a hub id that file alone (no weights)."""
    from radial_lora.models.builtin import resolve_model_id

    path = Path(resolve_model_id(model))
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{model} has no model_index.json; pass a diffusers pipeline directory")
        return json.loads(index.read_text())
    if path.exists() or str(model).count("/") != 1:
        raise ValueError(f"{model} is not a diffusers pipeline folder or hub id (owner/name); pass --family")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(str(model)))
    except (OSError, ValueError) as exc:  # offline, unknown id, gated
        raise ValueError(f"cannot read {model}'s model_index.json ({exc}); pass --family") from None


def family_of_index(index: dict[str, Any], where: str = "the pipeline") -> str:
    """The family a ``model_index.json`` describes (its class; for Wan, a second transformer or per-token
    timesteps mean Wan2.2)."""
    return family_of_class(index.get("_class_name", ""), is_wan22_config(index, {}), where)


def family_of_class(class_name: str, wan22: bool, where: str, *, i2v: bool = False) -> str:
    """The family of a pipeline or transformer class name (``wan22``: :func:`wan.is_wan22_config` said so;
    ``i2v``: a transformer whose config takes image conditioning, :func:`wan_i2v.is_wan_i2v_config`)."""
    task = "i2v" if i2v else "t2v"
    found = [a for a in ADAPTERS.values() if class_name == a.pipeline_class_name] or [
        a for a in ADAPTERS.values() if class_name == a.transformer_class_name and a.task == task
    ]
    if found:  # Wan2.1 and Wan2.2 share their classes
        return next((a.family for a in found if (a.architecture == "wan22") == wan22), found[0].family)
    supported = ", ".join(sorted({a.pipeline_class_name for a in ADAPTERS.values()}))
    raise ValueError(
        f"cannot tell the model family of {where or class_name!r} ({class_name or 'no class name'}); supported: "
        f"{supported} (Wan2.1, Wan2.2, HunyuanVideo; Wan image-to-video) and their transformers"
    )


def tag_transformers(pipe: Any, family: str) -> None:
    """Mark a pipeline's transformers with its family, so a lone Wan2.2 expert still reports "wan22"."""
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            setattr(module, _FAMILY_ATTR, family)
