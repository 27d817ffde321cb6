"""The model families radial-lora knows, by name, and which one a pipeline, transformer or folder is.

Explicit: the adapters are listed here, not registered as a side effect of importing their modules, and
detection asks each adapter whether a class and its configs are its own (:meth:`ModelAdapter.claims`). This
module imports the families; none of them imports it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from radial_lora.models.adapter import FAMILY_ATTR, ModelAdapter, tag_transformers
from radial_lora.models.hunyuan import HunyuanAdapter
from radial_lora.models.hunyuan15 import Hunyuan15Adapter, Hunyuan15I2VAdapter
from radial_lora.models.hunyuan_i2v import HunyuanI2VAdapter
from radial_lora.models.wan import Wan22Adapter, WanAdapter
from radial_lora.models.wan_i2v import Wan22I2VAdapter, WanI2VAdapter

# The one list of families: a new family is its adapter's file and one entry here (and its names in constants).
ADAPTERS: dict[str, ModelAdapter] = {
    a.family: a
    for a in (
        WanAdapter(),
        Wan22Adapter(),
        HunyuanAdapter(),
        Hunyuan15Adapter(),
        WanI2VAdapter(),
        Wan22I2VAdapter(),
        Hunyuan15I2VAdapter(),
        HunyuanI2VAdapter(),
    )
}


def families() -> list[str]:
    """The family names, sorted (``constants.FAMILIES``)."""
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
    tagged = getattr(pipe_or_transformer, FAMILY_ATTR, None)
    if isinstance(pipe_or_transformer, nn.Module) and tagged is not None:
        return tagged
    if isinstance(pipe_or_transformer, str | os.PathLike):
        return family_of_index(_model_index(pipe_or_transformer), where=str(pipe_or_transformer))
    name = type(pipe_or_transformer).__name__
    config = dict(getattr(pipe_or_transformer, "config", None) or {})
    if isinstance(pipe_or_transformer, nn.Module):
        return family_of(name, {}, config, where=name)
    # A loaded pipeline: its config, with the second expert as loaded, and its transformer's config.
    index = {**config, "transformer_2": [getattr(pipe_or_transformer, "transformer_2", None)]}
    transformer = getattr(getattr(pipe_or_transformer, "transformer", None), "config", None) or {}
    family = family_of(name, index, dict(transformer), where=name)
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
    """The family a ``model_index.json`` describes."""
    return family_of(index.get("_class_name", ""), index, {}, where)


def family_of(class_name: str, index: Mapping[str, Any], transformer: Mapping[str, Any], where: str) -> str:
    """The family whose adapter claims a pipeline class with its ``model_index.json`` (``index``), or a
    transformer class with its config (``transformer``)."""
    found = [a.family for a in ADAPTERS.values() if a.claims(class_name, index, transformer)]
    if len(found) == 1:
        return found[0]
    if found:
        raise RuntimeError(f"families {found} all claim {class_name}: their adapters' claims overlap")
    supported = ", ".join(sorted({a.pipeline_class_name for a in ADAPTERS.values()}))
    raise ValueError(
        f"cannot tell the model family of {where or class_name!r} ({class_name or 'no class name'}); supported: "
        f"{supported} and their transformers"
    )
