"""Radial attention inside diffusers transformers: patching, and the controller that steers it.

``apply_radial_attention`` installs one radial processor per self-attention module through
diffusers' own ``set_attn_processor`` (a dict keyed by processor name, so other attention - Wan's
cross-attention, HunyuanVideo's token refiner - keeps its stock processor objects) and a forward
pre-hook on every transformer. The hook tells the shared :class:`RadialController` the latent shape
(so the mask follows the frame count) and the timestep (so it counts denoising steps inside the
stock pipeline ``__call__``: a lower timestep is the next step, a higher one a new call).
``remove_radial_attention`` puts the original processor objects back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radial_lora.attention import block_sparse_attention
from radial_lora.constants import BACKENDS, PATTERNS
from radial_lora.mask import mask_density, radial_block_mask
from radial_lora.models.adapter import ModelAdapter
from radial_lora.models.registry import detect_family, get_adapter

logger = logging.getLogger(__name__)

_STATE_ATTR = "_radial_lora_state"


def dense_call(pattern: str, block_index: int, step: int | None, dense_layers: int, dense_timesteps: int) -> bool:
    """The one dense-policy rule: does self-attention block ``block_index`` run dense at denoising ``step``
    (None: training, which has no denoising loop)? Dense pattern, the first ``dense_layers`` blocks, the
    first ``dense_timesteps`` steps. The controller, the generation FLOP budget and the demo all ask it."""
    if pattern == "dense" or block_index < dense_layers:
        return True
    return step is not None and step < dense_timesteps


class RadialController:
    """Shared state of one radial patch: geometry, mask cache, dense policy, step counter, call counts.

    Dense attention is used for a block when ``pattern == "dense"``, inside :meth:`force_dense`, for
    block indices ``< dense_layers``, or during the first ``dense_timesteps`` denoising steps
    (ignored in :meth:`training_mode`, where there is no denoising loop).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        pattern: str = "radial",
        dense_layers: int = 0,
        dense_timesteps: int = 0,
        decay_factor: float | None = None,
        block_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}; got {pattern!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        for name, value in (("dense_layers", dense_layers), ("dense_timesteps", dense_timesteps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        block_size = adapter.default_block_size if block_size is None else block_size
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
        decay = adapter.default_decay if decay_factor is None else decay_factor
        if not isinstance(decay, int | float) or not decay > 0:
            raise ValueError(f"decay_factor must be a positive number; got {decay_factor!r}")
        self.adapter = adapter
        self.pattern = pattern
        self.dense_layers = dense_layers
        self.dense_timesteps = dense_timesteps
        self.decay_factor = float(decay)
        self.block_size = block_size
        self.backend = backend
        self.calls = {"sparse": 0, "dense": 0}
        self.step = 0
        self._last_timestep: float | None = None
        self._pinned_step: int | None = None
        self._training = False
        self._force_dense = 0
        self._geometry_by_tokens: dict[int, tuple[int, int]] = {}
        self._masks: dict[tuple[int, int, int, str], torch.Tensor] = {}
        self._densities: dict[tuple[int, int, int], float] = {}
        self.last_density: float | None = None
        # Ulysses sequence parallelism (models/sequence_parallel.py): the processors hand this process's token
        # shard to :meth:`attend`, which trades it for all tokens of its heads around the attention.
        self.sequence_group: Any = None

    # -- what the hooks tell us -----------------------------------------------------------------
    def observe(self, latent_shape: torch.Size | tuple[int, ...], patch: tuple[int, int, int], timestep: Any) -> None:
        """Record a transformer call: latent ``[B,C,F,H,W]`` + patch -> geometry; timestep -> step."""
        if len(latent_shape) != 5:
            raise ValueError(f"expected video latents [B,C,F,H,W]; got shape {tuple(latent_shape)}")
        pt, ph, pw = patch
        _, _, f, h, w = (int(s) for s in latent_shape)
        self.register_geometry(f // pt, (h // ph) * (w // pw))
        if timestep is not None:
            self._count_step(float(torch.as_tensor(timestep).float().max()))

    def register_geometry(self, latent_frames: int, tokens_per_frame: int) -> None:
        """Remember that ``latent_frames * tokens_per_frame`` video tokens mean this frame layout."""
        self._geometry_by_tokens[latent_frames * tokens_per_frame] = (latent_frames, tokens_per_frame)

    def _count_step(self, t: float) -> None:
        if self._last_timestep is None or t > self._last_timestep:
            self.step = 0  # first call, or the timestep went up: a new denoising run
        elif t < self._last_timestep:
            self.step += 1
        self._last_timestep = t

    def new_run(self) -> None:
        """Forget the step counter explicitly (the next transformer call is step 0)."""
        self.step, self._last_timestep = 0, None

    # -- policy ---------------------------------------------------------------------------------
    def current_step(self) -> int:
        return self.step if self._pinned_step is None else self._pinned_step

    def is_dense(self, block_index: int) -> bool:
        step = None if self._training else self.current_step()
        return bool(self._force_dense) or dense_call(
            self.pattern, block_index, step, self.dense_layers, self.dense_timesteps
        )

    @contextmanager
    def force_dense(self) -> Iterator[RadialController]:
        """Dense attention everywhere inside the block (same processors: a like-for-like baseline)."""
        self._force_dense += 1
        try:
            yield self
        finally:
            self._force_dense -= 1

    @contextmanager
    def training_mode(self, step: int | None = None) -> Iterator[RadialController]:
        """Training has no denoising loop: ``dense_timesteps`` is ignored (only ``dense_layers`` apply).

        ``step`` pins the step counter instead, for code that wants ``dense_timesteps`` semantics.
        """
        saved = (self._training, self._pinned_step)
        self._training, self._pinned_step = step is None, step
        try:
            yield self
        finally:
            self._training, self._pinned_step = saved

    def reset_stats(self) -> None:
        self.calls = {"sparse": 0, "dense": 0}

    # -- masks and attention --------------------------------------------------------------------
    def mask(
        self, latent_frames: int, tokens_per_frame: int, num_text_tokens: int = 0, device: torch.device | None = None
    ) -> torch.Tensor:
        """The radial block mask for this geometry (built once per geometry and device, then cached)."""
        dev = torch.device("cpu") if device is None else torch.device(device)
        key = (latent_frames, tokens_per_frame, num_text_tokens, str(dev))
        if key not in self._masks:
            cpu_key = (*key[:3], "cpu")
            if cpu_key not in self._masks:
                self._masks[cpu_key] = radial_block_mask(
                    latent_frames,
                    tokens_per_frame,
                    block_size=self.block_size,
                    decay_factor=self.decay_factor,
                    model_type=self.adapter.mask_model_type,
                    num_text_tokens=num_text_tokens,
                )
                seq = latent_frames * tokens_per_frame + num_text_tokens
                self._densities[cpu_key[:3]] = mask_density(self._masks[cpu_key], seq, self.block_size)
                logger.debug(
                    "radial mask f=%d T=%d text=%d: density %.3f",
                    latent_frames,
                    tokens_per_frame,
                    num_text_tokens,
                    self._densities[cpu_key[:3]],
                )
            self._masks[key] = self._masks[cpu_key].to(dev)
        return self._masks[key]

    def geometry_for(self, video_tokens: int) -> tuple[int, int]:
        """``(latent_frames, tokens_per_frame)`` of a sequence of ``video_tokens`` seen by a hook."""
        try:
            return self._geometry_by_tokens[video_tokens]
        except KeyError:
            raise RuntimeError(
                f"radial attention got {video_tokens} video tokens but no transformer call with that many was "
                "seen; call the patched transformer (its pre-hook records the geometry) or pass "
                "num_frames/height/width to apply_radial_attention"
            ) from None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        block_index: int,
        video_tokens: int,
        num_text_tokens: int = 0,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``[B, H, S, D]`` (S = video tokens + text tokens), dense or radial by policy.

        Under sequence parallelism ``S`` is this process's video shard plus the whole text, and
        ``key_padding_mask`` covers those same tokens."""
        if self.sequence_group is not None:
            return self._attend_sharded(
                query, key, value, block_index, video_tokens, num_text_tokens, key_padding_mask, self.sequence_group
            )
        return self._attend(query, key, value, block_index, video_tokens, num_text_tokens, key_padding_mask)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        block_index: int,
        video_tokens: int,
        num_text_tokens: int,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.is_dense(block_index):
            self.calls["dense"] += 1
            attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        frames, tokens = self.geometry_for(video_tokens)
        if query.shape[-2] != video_tokens + num_text_tokens:
            raise RuntimeError(
                f"attention over {query.shape[-2]} tokens, expected {video_tokens} video + {num_text_tokens} text"
            )
        block_mask = self.mask(frames, tokens, num_text_tokens, query.device)
        self.calls["sparse"] += 1
        self.last_density = self._densities[(frames, tokens, num_text_tokens)]
        return block_sparse_attention(
            query,
            key,
            value,
            block_mask,
            block_size=self.block_size,
            backend=self.backend,
            key_padding_mask=key_padding_mask,
        )

    def _attend_sharded(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        block_index: int,
        local_video: int,
        num_text_tokens: int,
        key_padding_mask: torch.Tensor | None,
        group: Any,
    ) -> torch.Tensor:
        """Ulysses: video tokens all-to-all from "my tokens, all heads" to "all tokens, my heads"; every rank
        holds the whole text and keeps its heads of it. The radial mask then applies unchanged (the rank sees
        the whole sequence), and the outputs go back the same way (the text's heads are gathered)."""
        from radial_lora.parallel import gather_shards, heads_to_tokens, local_slice, tokens_to_heads

        n = torch.distributed.get_world_size(group)
        if query.shape[1] % n:
            raise ValueError(f"sequence parallelism over {n} processes needs the heads ({query.shape[1]}) to divide")

        def to_heads(t: torch.Tensor) -> torch.Tensor:
            video = tokens_to_heads(t[:, :, :local_video], group)
            if not num_text_tokens:
                return video
            return torch.cat([video, local_slice(t[:, :, local_video:], 1, group)], dim=2)

        if key_padding_mask is not None:  # the video part of the mask, gathered to all video tokens
            with torch.no_grad():
                video_mask = gather_shards(key_padding_mask[:, :local_video].to(torch.uint8), 1, group).bool()
            key_padding_mask = torch.cat([video_mask, key_padding_mask[:, local_video:]], dim=1)
        video_tokens = local_video * n
        out = self._attend(
            to_heads(query),
            to_heads(key),
            to_heads(value),
            block_index,
            video_tokens,
            num_text_tokens,
            key_padding_mask,
        )
        video_out = heads_to_tokens(out[:, :, :video_tokens], group)
        if not num_text_tokens:
            return video_out
        return torch.cat([video_out, gather_shards(out[:, :, video_tokens:], 1, group)], dim=2)


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and not isinstance(obj, nn.Module)


def _has_lora(module: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in module.modules())


def apply_radial_attention(
    pipe_or_transformer: Any,
    *,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    pattern: str = "radial",
    dense_layers: int = 0,
    dense_timesteps: int = 0,
    decay_factor: float | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> RadialController:
    """Install radial attention on a Wan/Wan2.2/HunyuanVideo pipeline (all its transformers) or transformer.

    ``num_frames/height/width`` (pixels) are optional: the geometry is learned from each call; given,
    the mask is built (and validated) now. ``decay_factor=None`` and ``block_size=None`` take the family
    defaults. A second call replaces the first patch.
    """
    family = detect_family(pipe_or_transformer)
    adapter = get_adapter(family)
    transformers = (
        adapter.transformers(pipe_or_transformer) if _is_pipeline(pipe_or_transformer) else [pipe_or_transformer]
    )
    controller = RadialController(
        adapter,
        pattern=pattern,
        dense_layers=dense_layers,
        dense_timesteps=dense_timesteps,
        decay_factor=decay_factor,
        block_size=block_size,
        backend=backend,
    )
    if (num_frames, height, width) != (None, None, None):
        if None in (num_frames, height, width):
            raise ValueError("pass all of num_frames, height and width (pixels), or none of them")
        geo = adapter.geometry(pipe_or_transformer, num_frames, height, width)
        controller.register_geometry(geo.latent_frames, geo.tokens_per_frame)
        controller.mask(geo.latent_frames, geo.tokens_per_frame)
    for transformer in transformers:
        if any(getattr(a, "fused_projections", False) for _, _, a in adapter.self_attention_modules(transformer)):
            if _has_lora(transformer):
                raise ValueError(
                    "this transformer has fused QKV projections and LoRA layers: fused projections bypass LoRA. "
                    "Call pipe.unfuse_qkv_projections() first and never fuse with adapters attached"
                )
        if getattr(transformer, _STATE_ATTR, None) is not None:
            logger.info("replacing an earlier radial patch on %s", type(transformer).__name__)
            _restore(transformer)
        originals = dict(transformer.attn_processors)
        processors = dict(originals)
        for name, index, _ in adapter.self_attention_modules(transformer):
            processors[f"{name}.processor"] = adapter.make_processor(controller, index)
        transformer.set_attn_processor(processors)
        patch = adapter.patch_size(transformer)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict, _patch=patch) -> None:
            latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
            controller.observe(latents.shape, _patch, timestep)

        handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        setattr(transformer, _STATE_ATTR, (controller, originals, handle))
    logger.info(
        "radial attention on %d %s transformer(s): pattern=%s decay=%.3g block=%d dense_layers=%d "
        "dense_timesteps=%d backend=%s",
        len(transformers),
        family,
        pattern,
        controller.decay_factor,
        controller.block_size,
        dense_layers,
        dense_timesteps,
        backend,
    )
    return controller


def _restore(transformer: nn.Module) -> bool:
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return False
    _, originals, handle = state
    transformer.set_attn_processor(dict(originals))
    handle.remove()
    setattr(transformer, _STATE_ATTR, None)
    return True


def remove_radial_attention(pipe_or_transformer: Any) -> int:
    """Put the original processor objects back and drop the hooks; returns how many transformers changed."""
    if _is_pipeline(pipe_or_transformer):
        transformers = get_adapter(detect_family(pipe_or_transformer)).transformers(pipe_or_transformer)
    else:
        transformers = [pipe_or_transformer]
    return sum(_restore(t) for t in transformers)


def radial_controller(pipe_or_transformer: Any) -> RadialController | None:
    """The controller of a patched pipeline or transformer, or None."""
    transformers = [pipe_or_transformer]
    if _is_pipeline(pipe_or_transformer):
        transformers = get_adapter(detect_family(pipe_or_transformer)).transformers(pipe_or_transformer)
    state = getattr(transformers[0], _STATE_ATTR, None)
    return None if state is None else state[0]
