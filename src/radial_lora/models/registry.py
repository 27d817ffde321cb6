"""The model families radial-lora knows, by name, and which one a pipeline, transformer or folder is.

Explicit: the adapters are listed here, not registered as a side effect of importing their modules, and
detection asks each adapter which diffusers classes are its own (``pipeline_class_name``,
``transformer_class_name``, ``two_experts``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from radial_lora.models.adapter import ModelAdapter
from radial_lora.models.hunyuan import HunyuanAdapter
from radial_lora.models.wan import Wan22Adapter, WanAdapter

ADAPTERS: dict[str, ModelAdapter] = {a.family: a for a in (WanAdapter(), Wan22Adapter(), HunyuanAdapter())}
# A transformer taken out of its pipeline keeps the family its pipeline had (a Wan2.2 expert is a plain
# WanTransformer3DModel): detecting a pipeline tags its transformers with this attribute.
_FAMILY_ATTR = "_radial_lora_family"


def families() -> list[str]:
    """The family names ("hunyuan", "wan", "wan22")."""
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
    an untagged Wan transformer reports "wan".
    """
    tagged = getattr(pipe_or_transformer, _FAMILY_ATTR, None)
    if isinstance(pipe_or_transformer, nn.Module) and tagged is not None:
        return tagged
    if isinstance(pipe_or_transformer, str | os.PathLike):
        from radial_lora.models.builtin import resolve_model_id

        index = Path(resolve_model_id(pipe_or_transformer)) / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{pipe_or_transformer} has no model_index.json; pass a diffusers pipeline directory")
        config = json.loads(index.read_text())
        name = config.get("_class_name", "")
        two = bool(config.get("transformer_2") and config["transformer_2"][0] is not None)
    else:
        name = type(pipe_or_transformer).__name__
        two = getattr(pipe_or_transformer, "transformer_2", None) is not None
    pipeline = any(name == a.pipeline_class_name for a in ADAPTERS.values())
    for adapter in ADAPTERS.values():
        if name in (adapter.pipeline_class_name, adapter.transformer_class_name) and adapter.two_experts == two:
            if pipeline and not isinstance(pipe_or_transformer, str | os.PathLike):
                for attr in ("transformer", "transformer_2"):
                    module = getattr(pipe_or_transformer, attr, None)
                    if isinstance(module, nn.Module):
                        setattr(module, _FAMILY_ATTR, adapter.family)
            return adapter.family
    supported = ", ".join(sorted({a.pipeline_class_name for a in ADAPTERS.values()}))
    raise ValueError(
        f"cannot tell the model family of {name or pipe_or_transformer!r}; supported: {supported} (Wan2.1, Wan2.2, "
        "HunyuanVideo) and their transformers"
    )
