"""PEFT LoRA on the attention projections, saved in the diffusers LoRA format with our metadata.

The file is what ``pipe.load_lora_weights(dir)`` of the stock diffusers pipeline reads:
``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A.weight`` /
``lora_B.weight`` and diffusers' own ``lora_adapter_metadata`` header (the LoraConfig, so rank and
alpha load exactly). Our training settings (base model, lengths, mask settings, steps) ride along in
the same header under ``radial_lora`` (JSON), so a LoRA file says how it must be used, and a sha256 of
its tensors under ``radial_lora_tensors_sha256``, so a damaged copy is told from a LoRA (:func:`load_lora_state`).

``export_comfyui`` rewrites the keys to ComfyUI's native module names (``diffusion_model.<module>``,
original Wan / HunyuanVideo checkpoint naming), folding the LoRA scale into ``lora_B``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from radial_lora.constants import ARCHITECTURE, DEFAULT_TARGETS
from radial_lora.files import atomic_path, sha256_file

logger = logging.getLogger(__name__)

LORA_FILENAME = "pytorch_lora_weights.safetensors"
COMFYUI_FILENAME = "comfyui_lora.safetensors"
METADATA_KEY = "radial_lora"
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY: LoraConfig kwargs, keys prefixed "transformer."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
LORA_FORMAT = "radial-lora/1"  # the "format" of our metadata; read_lora_metadata refuses a newer one
DIGEST_KEY = "radial_lora_tensors_sha256"  # header key: tensors_digest() of the file's tensors
# Spellings of the attention settings in a LoRA's radial_lora metadata (top level or a nested section).
_META_ALIASES = {
    "pattern": ("pattern",),
    "decay_factor": ("decay_factor", "decay"),
    "block_size": ("block_size",),
    "dense_layers": ("dense_layers",),
    "dense_timesteps": ("dense_timesteps",),
}
_META_SECTIONS = ("radial", "attention", "radial_attention")
PREFIX = "transformer."


def add_lora(
    transformer: torch.nn.Module,
    rank: int = 128,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    adapter_name: str = "default",
) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and attach a LoRA adapter; returns the (only) trainable parameters.

    ``alpha=None`` means alpha = rank (scale 1), the convention of the Radial Attention recipe.
    Module names match PEFT-style: "to_q" hits every module whose name ends in ``.to_q``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("LoRA target_modules is empty; give module name suffixes such as 'to_q'")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True,
    )
    try:
        transformer.add_adapter(config, adapter_name=adapter_name)
    except ValueError as exc:
        raise ValueError(f"cannot add LoRA with target_modules={targets}: {exc}") from exc
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    logger.info(
        "LoRA rank %d alpha %s on %s: %d tensors, %.2fM trainable parameters",
        rank,
        config.lora_alpha,
        targets,
        len(params),
        sum(p.numel() for p in params) / 1e6,
    )
    return params


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers keys ``transformer.<module>.lora_A.weight`` (contiguous, CPU).

    Under FSDP the weights are sharded DTensors: they are gathered, so every process must call this.
    """
    from torch.distributed.tensor import DTensor

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()}
    return {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in full.items()}


def adapter_config(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The LoraConfig fields diffusers needs to rebuild the adapter exactly (JSON-serialisable)."""
    cfg = transformer.peft_config[adapter_name]
    return {
        "r": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "lora_dropout": float(cfg.lora_dropout),
        "target_modules": sorted(cfg.target_modules),
        "use_dora": bool(cfg.use_dora),
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
    }


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=header)


def save_lora(
    out_dir: str | os.PathLike,
    transformer_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    lora_config: Mapping[str, Any] | None = None,
    filename: str = LORA_FILENAME,
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically; returns the file path.

    ``transformer_or_state``: a PEFT-adapted transformer, or a state dict already in diffusers keys
    (then ``lora_config`` gives rank/alpha/targets, else diffusers infers rank from the shapes and
    uses alpha = rank). ``metadata`` (JSON-serialisable) is stored under the header key ``radial_lora``.
    """
    if isinstance(transformer_or_state, torch.nn.Module):
        if not getattr(transformer_or_state, "peft_config", None):
            raise ValueError("no LoRA weights to save: the transformer has no adapter (call add_lora first)")
        state = lora_state_dict(transformer_or_state)
        lora_config = adapter_config(transformer_or_state) if lora_config is None else lora_config
    else:
        state = {k: v.detach().to("cpu").contiguous() for k, v in transformer_or_state.items()}
    if not state:
        raise ValueError("no LoRA weights to save: the transformer has no adapter (call add_lora first)")
    bad = [k for k in state if not k.startswith(PREFIX) or ".lora_" not in k]
    if bad:
        raise ValueError(f"LoRA state keys must look like 'transformer.<module>.lora_A.weight'; got e.g. {bad[0]!r}")
    try:
        meta_json = json.dumps(dict(metadata), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"LoRA metadata must be JSON-serialisable: {exc}") from exc
    # Ours, not the pipelines' save_lora_weights(transformer_lora_adapter_metadata=...): that writes diffusers'
    # key (the same JSON as below, which tests/test_lora.py loads back through load_lora_weights) but has no
    # slot for our training metadata, so a second write would be needed to add it, and it is not atomic.
    header = {"format": "pt", METADATA_KEY: meta_json, DIGEST_KEY: tensors_digest(state)}
    if lora_config is not None:
        header[DIFFUSERS_METADATA_KEY] = json.dumps({PREFIX + k: v for k, v in lora_config.items()}, sort_keys=True)
    path = Path(out_dir) / filename
    _atomic_save(state, path, header)
    logger.info("saved LoRA (%d tensors) to %s", len(state), path)
    return path


def _lora_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} not found; expected a directory with {LORA_FILENAME} or the file")
    return p


class LoraFormatError(ValueError):
    """A LoRA whose metadata is of a newer format than this radial-lora reads: an error everywhere, never taken
    for "no metadata" (a Wan2.2 low-noise LoRA would otherwise load into the wrong expert)."""


class LoraDamagedError(LoraFormatError):
    """A LoRA file that cannot be read whole (truncated, a damaged header, tensors that differ from the sha256
    in its header): an error everywhere too, in one line naming the file."""


def _damaged(path: Path, what: str) -> LoraDamagedError:
    what = " ".join(what.split())  # one line, whatever the underlying error printed
    return LoraDamagedError(
        f"LoRA {path} is damaged ({what}); copy it again, or export it again from its run's checkpoint"
    )


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"not a readable safetensors file, truncated or overwritten: {exc}") from None


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a LoRA's tensors (names, dtypes, shapes and bytes, in name order), independent of the file
    layout; :func:`save_lora` records it in the header and :func:`load_lora_state` checks it."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_lora_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Our training metadata (``radial_lora`` header JSON) of a LoRA file or directory."""
    p = _lora_file(path)
    header = _header(p)
    if METADATA_KEY not in header:
        raise ValueError(f"{p} has no '{METADATA_KEY}' metadata; it was not written by radial-lora save_lora")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: header key '{METADATA_KEY}' is not valid JSON: {exc}") from exc
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt is not None and fmt != LORA_FORMAT:
        raise LoraFormatError(
            f"{p}: metadata format {fmt!r} is not {LORA_FORMAT!r}, the one this radial-lora reads; "
            "update radial-lora (pip install -U radial-lora) or retrain the LoRA"
        )
    return meta


def lora_attention_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The attention settings a radial-lora LoRA was trained with (empty if it carries none).

    Looks in the ``radial_lora`` header JSON at the top level and in a ``radial`` (or ``attention``)
    section, also one level down (a whole training config stored under ``config``).
    """
    try:
        meta = read_lora_metadata(path)
    except LoraFormatError:
        raise
    except ValueError as exc:
        logger.info("LoRA %s has no radial-lora training metadata (%s); using the given settings", path, exc)
        return {}
    places = [meta]
    for holder in (meta, meta.get("config") if isinstance(meta.get("config"), dict) else {}):
        places += [holder[s] for s in _META_SECTIONS if isinstance(holder.get(s), dict)]
    found: dict[str, Any] = {}
    for key, aliases in _META_ALIASES.items():
        for place in reversed(places):  # the most specific section wins
            hit = next((place[a] for a in aliases if a in place and place[a] is not None), None)
            if hit is not None:
                found[key] = hit
                break
    return found


def lora_expert(path: str | os.PathLike) -> str | None:
    """The Wan2.2 A14B expert a radial-lora LoRA was trained for ("high", "low"), or None.

    Both experts share the module names, so the file's keys cannot tell; the trainer records it.
    """
    try:
        expert = read_lora_metadata(path).get("expert")
    except LoraFormatError:
        raise
    except ValueError:
        return None
    if expert not in (None, "high", "low"):
        raise ValueError(f"LoRA {path} names an unknown Wan2.2 expert {expert!r} in its metadata (high or low)")
    return expert


def lora_digest(path: str | os.PathLike) -> str:
    """sha256 of a LoRA's weights file: a retrained LoRA at the same path must not reuse old videos."""
    p = _lora_file(path)
    stat = p.stat()
    return _file_digest(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # cached per (path, size, mtime): a rewritten file is hashed again


def load_lora_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (diffusers keys), read whole: a truncated or damaged file, or tensors that
    differ from the sha256 its header records, is a :class:`LoraDamagedError` naming the file."""
    p = _lora_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(p, f"not a readable safetensors file, truncated or overwritten: {exc}") from None
    if DIGEST_KEY in header and header[DIGEST_KEY] != tensors_digest(state):
        raise _damaged(p, f"its tensors differ from the sha256 recorded in its header ({DIGEST_KEY})")
    return state


def check_lora(path: str | os.PathLike) -> Path:
    """The LoRA file of ``path`` (a folder or the file) after reading it whole (:func:`load_lora_state`): what
    ``generate`` and ``evaluate`` run before loading a model, so a damaged file is one line, not a traceback.
    Once per file version (path, size, modification time) in a process."""
    p = _lora_file(path)
    stat = p.stat()
    _checked(str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    return p


@lru_cache(maxsize=64)
def _checked(path: str, size: int, mtime_ns: int) -> bool:
    load_lora_state(path)
    return True


def _lora_scale(path: Path, module: str, rank: int) -> float:
    """alpha / r of one module, from diffusers' adapter metadata (alpha = r when absent)."""
    raw = _header(path).get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return 1.0
    cfg = json.loads(raw)
    alpha = cfg.get(PREFIX + "lora_alpha", rank)
    for pattern, value in (cfg.get(PREFIX + "alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = value
    return float(alpha) / rank


# --- ComfyUI key mapping -----------------------------------------------------------------------------

_WAN_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_WAN_FFN = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def _wan_comfy_name(module: str) -> str | None:
    """diffusers WanTransformer3DModel module -> original Wan checkpoint module (ComfyUI's WanModel)."""
    parts = module.split(".")
    if len(parts) < 4 or parts[0] != "blocks":
        return None
    head, rest = ".".join(parts[:2]), ".".join(parts[2:])
    for attn, comfy_attn in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        if rest.startswith(attn + "."):
            proj = _WAN_ATTN.get(rest[len(attn) + 1 :])
            return f"{head}.{comfy_attn}.{proj}" if proj else None
    return f"{head}.{_WAN_FFN[rest]}" if rest in _WAN_FFN else None


# HunyuanVideo (and 1.5, whose original checkpoint keeps these double-block and refiner names; it has no single
# blocks): ComfyUI's model fuses q/k/v (and the single blocks' MLP input) into one Linear, so a
# LoRA on to_q/to_k/to_v becomes one LoRA on the fused weight: A stacked, B block-diagonal (exact).
# Values: (comfy module, slot index, slot count) where the fused output is split in equal slots,
# except single blocks' linear1 = [q, k, v, mlp] whose mlp width is taken from the fused B size.
_HY_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
}
_HY_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2)}
_HY_REFINER = {
    "attn.to_q": ("self_attn_qkv", 0),
    "attn.to_k": ("self_attn_qkv", 1),
    "attn.to_v": ("self_attn_qkv", 2),
    "attn.to_out.0": ("self_attn_proj", None),
}


def _hunyuan_comfy_name(module: str) -> tuple[str, int | None] | None:
    parts = module.split(".")
    table: dict[str, tuple[str, int | None]]
    if parts[0] == "transformer_blocks":
        head, table, rest = f"double_blocks.{parts[1]}", _HY_DOUBLE, ".".join(parts[2:])
    elif parts[0] == "single_transformer_blocks":
        head, table, rest = f"single_blocks.{parts[1]}", _HY_SINGLE, ".".join(parts[2:])
    elif parts[:3] == ["context_embedder", "token_refiner", "refiner_blocks"]:
        head, table = f"txt_in.individual_token_refiner.blocks.{parts[3]}", _HY_REFINER
        rest = ".".join(parts[4:])
    else:
        return None
    if rest not in table:
        return None
    name, slot = table[rest]
    return f"{head}.{name}", slot


def _metadata_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_lora_metadata(path)
    except LoraFormatError:
        raise
    except ValueError:
        return {}


def _single_mlp_dim(path: Path, hidden: int, meta: Mapping[str, Any], given: int | None) -> int:
    """Width of the MLP rows of HunyuanVideo's fused ``linear1``: given, or hidden x the recorded mlp_ratio."""
    if given is not None:
        return int(given)
    if meta.get("mlp_ratio") is None:
        raise ValueError(
            f"{path}: ComfyUI fuses HunyuanVideo's single-block q, k, v and MLP input into linear1, and this LoRA "
            "does not record the model's mlp_ratio; pass single_mlp_dim (hidden size x mlp_ratio, 12288 for "
            "HunyuanVideo 13B)"
        )
    return int(round(hidden * float(meta["mlp_ratio"])))


def _modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    mods = {k[len(PREFIX) : k.index(".lora_A.")] for k in state if ".lora_A." in k}
    return sorted(mods)


def export_comfyui(
    src: str | os.PathLike, dst: str | os.PathLike, family: str | None = None, *, single_mlp_dim: int | None = None
) -> Path:
    """Rewrite a diffusers-format LoRA for ComfyUI's native loader; returns the written file.

    ``family`` (``constants.FAMILIES``) defaults to the file's metadata. The LoRA scale
    (alpha / r) is folded into ``lora_B`` and no ``.alpha`` key is written, so ComfyUI applies
    strength 1 x B @ A, the same delta as diffusers. For HunyuanVideo single blocks the fused
    ``linear1`` also holds the MLP input; its width is ``single_mlp_dim``, else the hidden size (the
    q projection's width) x the ``mlp_ratio`` the LoRA's metadata records. Never a guess: a wrong width
    makes a file ComfyUI counts as loaded and then fails to patch.
    """
    p = _lora_file(src)
    state = load_lora_state(p)
    meta = _metadata_or_empty(p)
    family = family or meta.get("family")
    if family not in ARCHITECTURE:
        raise ValueError(f"unknown or missing model family {family!r} for ComfyUI export; pass family='wan'|'hunyuan'")
    family = ARCHITECTURE[family]  # an image-to-video model has its text-to-video twin's block names
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    skipped = []
    for module in _modules(state):
        a = state[f"{PREFIX}{module}.lora_A.weight"].float()
        b = state[f"{PREFIX}{module}.lora_B.weight"].float()
        b = b * _lora_scale(p, module, a.shape[0])
        if family in ("wan", "wan22"):
            name = _wan_comfy_name(module)
            if name is None:
                skipped.append(module)
                continue
            out[f"diffusion_model.{name}.lora_A.weight"] = a.contiguous()
            out[f"diffusion_model.{name}.lora_B.weight"] = b.contiguous()
            continue
        mapped = _hunyuan_comfy_name(module)
        if mapped is None:
            skipped.append(module)
            continue
        name, slot = mapped
        if slot is None:
            out[f"diffusion_model.{name}.lora_A.weight"] = a.contiguous()
            out[f"diffusion_model.{name}.lora_B.weight"] = b.contiguous()
        else:
            fused.setdefault(name, {})[slot] = (a, b)
    for name, slots in fused.items():
        if sorted(slots) != [0, 1, 2]:
            raise ValueError(
                f"ComfyUI fuses q, k and v into {name}; the LoRA must target all of to_q, to_k, to_v "
                f"(found slots {sorted(slots)})"
            )
        a_cat = torch.cat([slots[i][0] for i in range(3)], dim=0)
        widths = [slots[i][1].shape[0] for i in range(3)]
        extra = _single_mlp_dim(p, widths[0], meta, single_mlp_dim) if name.endswith("linear1") else 0
        b_full = torch.zeros(sum(widths) + extra, a_cat.shape[0])
        row, col = 0, 0
        for i in range(3):
            b_i = slots[i][1]
            b_full[row : row + b_i.shape[0], col : col + b_i.shape[1]] = b_i
            row, col = row + b_i.shape[0], col + b_i.shape[1]
        out[f"diffusion_model.{name}.lora_A.weight"] = a_cat.contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = b_full.contiguous()
    if skipped:
        logger.warning("ComfyUI export: no native name for %d module(s), skipped: %s", len(skipped), skipped[:4])
    if not out:
        raise ValueError(f"{p}: none of its modules map to ComfyUI's {family} model; nothing to export")
    dst_path = Path(dst)
    if dst_path.is_dir() or dst_path.suffix != ".safetensors":
        dst_path = dst_path / COMFYUI_FILENAME
    header = {"format": "pt"}
    if METADATA_KEY in _header(p):
        header[METADATA_KEY] = _header(p)[METADATA_KEY]
    _atomic_save(out, dst_path, header)
    logger.info("exported ComfyUI LoRA (%d tensors) to %s", len(out), dst_path)
    return dst_path
