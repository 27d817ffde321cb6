"""Adapters and radial attention against the stock pipelines' own ``__call__`` (unpatched pipelines)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline

from radial_lora.models import (
    apply_radial_attention,
    build_tiny_pipeline,
    detect_family,
    get_adapter,
    remove_radial_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTION = "a red circle moves right and bounces off the wall"


def _call(pipe, frames: int = 17, side: int = 64, steps: int = 2, **kwargs):
    kwargs.setdefault("output_type", "latent")
    return pipe(
        CAPTION,
        num_frames=frames,
        height=side,
        width=side,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


@pytest.mark.parametrize(
    "family, dense, sparse",
    [
        # Wan: CFG = 2 transformer calls per step x 2 blocks; Wan2.2: the same, split over two experts.
        ("wan", 2 * 2 + 3 * 2 * 1, 3 * 2 * 1),
        ("wan22", 2 * 2 + 3 * 2 * 1, 3 * 2 * 1),
        # HunyuanVideo: embedded guidance = 1 call per step x (2 double + 2 single) blocks.
        ("hunyuan", 4 + 3 * 1, 3 * 3),
    ],
)
def test_dense_timesteps_and_layers_in_the_stock_pipeline_call(family, dense, sparse):
    pipe = build_tiny_pipeline(family)
    controller = apply_radial_attention(pipe, block_size=16, dense_layers=1, dense_timesteps=1, backend="reference")
    steps: list[int] = []

    def record(_pipe, _i, _t, kwargs):
        steps.append(controller.step)
        return kwargs

    for _ in range(2):  # the second call must start again at step 0
        controller.reset_stats()
        _call(pipe, steps=4, callback_on_step_end=record)
        assert controller.calls == {"dense": dense, "sparse": sparse}
    assert steps == [0, 1, 2, 3] * 2
    with controller.training_mode(step=0):  # a pinned step: dense_timesteps semantics without a loop
        assert controller.is_dense(3)
    with controller.training_mode():
        assert not controller.is_dense(3) and controller.is_dense(0)


@pytest.mark.parametrize("family", ["wan", "wan22", "hunyuan"])
def test_saved_pipeline_loaded_patched_runs_at_two_lengths(family, request):
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(f"tiny_{family}_dir"))
    pipe.set_progress_bar_config(disable=True)
    controller = apply_radial_attention(pipe, block_size=16, backend="reference")
    text = 256 if family == "hunyuan" else 0
    densities = {}
    for frames in (17, 33):
        video = _call(pipe, frames=frames, steps=1, output_type="pt")
        assert video.shape == (1, frames, 3, 64, 64) and torch.isfinite(video).all()
        latent_frames = 1 + (frames - 1) // 4
        assert (latent_frames, 16, text, "cpu") in controller._masks, "the mask must follow the frame count"
        densities[frames] = controller.last_density
    assert densities[33] < densities[17] < 1.0  # longer video, sparser attention
    remove_radial_attention(pipe)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_encode_prompts_and_predict_equal_what_the_pipeline_does(family):
    pipe = build_tiny_pipeline(family)
    adapter = get_adapter(family)
    seen: dict = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    pipe.transformer.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    _call(pipe, steps=1, guidance_scale=1.0)  # Wan: no CFG, one transformer call
    text = adapter.encode_prompts(pipe, [CAPTION])
    for key, value in text.items():
        torch.testing.assert_close(value, seen[key].to(value.dtype), atol=0, rtol=0, msg=key)
    with torch.no_grad():
        out = adapter.predict(pipe.transformer, seen["hidden_states"], seen["timestep"], text)
    torch.testing.assert_close(out, seen["out"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_decode_matches_pipeline_and_encode_is_its_inverse(family):
    pipe = build_tiny_pipeline(family)
    adapter = get_adapter(family)
    latents = _call(pipe, frames=9, side=32, steps=1)
    frames = _call(pipe, frames=9, side=32, steps=1, output_type="pt")  # [B,F,3,H,W] in [0,1]
    video = adapter.decode_latents(pipe, latents)
    assert video.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close((video.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-5, rtol=0)
    encoded = adapter.encode_videos(pipe, video)
    assert encoded.shape == latents.shape
    with torch.no_grad():
        raw = pipe.vae.encode(video).latent_dist.mode()
        direct = pipe.vae.decode(raw, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(adapter.decode_latents(pipe, encoded), direct, atol=1e-5, rtol=0)
    assert (encoded - raw).abs().max() > 1e-3, "the normalisation must actually be applied"
    with pytest.raises(ValueError, match="batch, 3, frames"):
        adapter.encode_videos(pipe, video[:, :2])


def test_geometry_reads_the_vae_factors_and_patch_size():
    pipe = build_tiny_pipeline("wan")
    geo = get_adapter("wan").geometry(pipe, 81, 480, 832)  # Wan2.1 480p
    assert (geo.latent_frames, geo.tokens_per_frame) == (21, 30 * 52)
    pipe.vae.register_to_config(scale_factor_spatial=16)  # Wan2.2 TI2V-5B's VAE compresses 16x
    ti2v = WanPipeline(**pipe.components)
    geo = get_adapter("wan").geometry(ti2v, 121, 704, 1280)
    assert (geo.latent_frames, geo.tokens_per_frame) == (31, 22 * 40)
    hunyuan = build_tiny_pipeline("hunyuan")
    geo = get_adapter("hunyuan").geometry(hunyuan, 129, 720, 1280)
    assert (geo.latent_frames, geo.tokens_per_frame) == (33, 45 * 80)
    assert get_adapter("hunyuan").geometry(hunyuan.transformer, 129, 720, 1280) == geo
    hunyuan.transformer = None
    with pytest.raises(ValueError, match="no transformer"):
        get_adapter("hunyuan").geometry(hunyuan, 129, 720, 1280)


def test_detect_family_and_registry(tiny_wan22_dir, tiny_hunyuan_dir, tmp_path):
    assert detect_family(tiny_wan22_dir) == "wan22"
    assert detect_family(tiny_hunyuan_dir) == "hunyuan"
    wan = build_tiny_pipeline("wan")
    assert detect_family(wan) == "wan" and detect_family(wan.transformer) == "wan"
    wan22 = build_tiny_pipeline("wan22")
    assert get_adapter("wan22").transformers(wan22)[1] is not None
    assert detect_family(wan22.transformer_2) == "wan22", "an expert taken out of its pipeline keeps its family"
    assert apply_radial_attention(wan22.transformer).decay_factor == 0.8
    assert [get_adapter(f).default_decay for f in ("wan", "wan22", "hunyuan")] == [0.2, 0.8, 0.95]
    with pytest.raises(ValueError, match="wan22"):
        get_adapter("wan2.2")
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="HunyuanVideoPipeline that is not of family 'wan'"):
        get_adapter("wan").load_pipeline(tiny_hunyuan_dir, torch.float32)
    loaded = get_adapter("wan22").load_pipeline(tiny_wan22_dir, torch.float32)
    assert detect_family(loaded.transformer) == "wan22"
    assert loaded.vae.dtype == torch.float32 and loaded.transformer_2 is not None
    boundary = get_adapter("wan22").boundary_timestep(loaded)
    assert boundary == 875.0
    assert get_adapter("wan22").expert_for(loaded, 900.0) is loaded.transformer
    assert get_adapter("wan22").expert_for(loaded, 500.0) is loaded.transformer_2


def test_per_token_timesteps_of_wan22_ti2v_count_steps():
    """Wan2.2 TI2V-5B's pipeline passes a [B, tokens] timestep (expand_timesteps=True)."""
    ti2v = WanPipeline(**build_tiny_pipeline("wan").components, expand_timesteps=True)
    ti2v.set_progress_bar_config(disable=True)
    controller = apply_radial_attention(ti2v, block_size=16, dense_timesteps=2, backend="reference")
    _call(ti2v, steps=3, guidance_scale=1.0)
    assert controller.step == 2 and controller.calls == {"dense": 2 * 2, "sparse": 1 * 2}


def test_wan22_ti2v_5b_is_detected_with_its_vae_and_wan22_defaults(tmp_path):
    """TI2V-5B: one transformer, per-token timesteps, 48 latent channels, 16x VAE - Wan2.2, not Wan2.1."""
    from diffusers import WanTransformer3DModel

    from radial_lora.models.registry import family_of_index

    assert family_of_index({"_class_name": "WanPipeline", "expand_timesteps": True, "transformer_2": [None, None]}) == (
        "wan22"
    )
    assert family_of_index({"_class_name": "WanPipeline", "transformer_2": [None, None]}) == "wan"
    ti2v = WanPipeline(**build_tiny_pipeline("wan").components, expand_timesteps=True)
    assert detect_family(ti2v) == "wan22" and detect_family(ti2v.transformer) == "wan22"  # tagged
    lone = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=64,
    )  # fmt: skip
    assert detect_family(lone) == "wan22"  # untagged: its 48 latent channels say TI2V-5B
    geo = get_adapter("wan22").geometry(lone, 121, 704, 1280)
    assert (geo.latent_frames, geo.tokens_per_frame) == (31, 22 * 40)  # 16x VAE: 880, not 3520
    controller = apply_radial_attention(lone)
    assert (controller.decay_factor, controller.block_size) == (0.8, 64)  # the authors' Wan2.2 settings
    assert apply_radial_attention(build_tiny_pipeline("wan").transformer).block_size == 128


@pytest.mark.parametrize(
    "family,fixture", [("wan", "tiny_wan_dir"), ("wan22", "tiny_wan22_dir"), ("hunyuan", "tiny_hunyuan_dir")]
)
def test_load_by_role(family, fixture, request):
    """Training loads no text encoder or VAE; data preparation no transformer; the family is checked from
    model_index.json before any weights load."""
    path = request.getfixturevalue(fixture)
    adapter = get_adapter(family)
    train_pipe = adapter.load_pipeline(path, torch.float32, skip=adapter.encoder_components)
    assert all(getattr(train_pipe, name) is None for name in adapter.encoder_components)
    assert train_pipe.transformer is not None and train_pipe.scheduler is not None
    assert detect_family(train_pipe.transformer) == family  # a lone Wan2.2 expert still knows its family
    prep_pipe = adapter.load_pipeline(path, torch.float32, skip=adapter.denoiser_components)
    assert prep_pipe.transformer is None and getattr(prep_pipe, "transformer_2", None) is None
    assert all(getattr(prep_pipe, name) is not None for name in adapter.encoder_components)
    other = get_adapter("hunyuan" if family != "hunyuan" else "wan")
    with pytest.raises(ValueError, match=f"not of family '{other.family}'"):
        other.load_pipeline(path, torch.float32)


def test_hunyuan15_is_detected_from_its_index_its_folder_and_a_lone_transformer(tmp_path):
    """HunyuanVideo 1.5 from model_index.json, from a folder's JSON configs alone (describe_model: the 16x VAE
    from vae/config.json, else from the family), and from a lone transformer by its config's task_type."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from radial_lora.models.published import describe_model
    from radial_lora.models.registry import family_of_index

    assert family_of_index({"_class_name": "HunyuanVideo15Pipeline"}) == "hunyuan15"
    pipe = build_tiny_pipeline("hunyuan15")
    lone = HunyuanVideo15Transformer3DModel(**pipe.transformer.config)  # untagged
    assert detect_family(lone) == "hunyuan15"
    assert get_adapter("hunyuan15").vae_factors(lone) == (4, 16) == get_adapter("hunyuan15").vae_factors(pipe)
    i2v = HunyuanVideo15Transformer3DModel(**{**pipe.transformer.config, "task_type": "i2v"})
    assert detect_family(i2v) == "hunyuan15-i2v"  # same class, its config's task_type tells
    assert family_of_index({"_class_name": "HunyuanVideo15ImageToVideoPipeline"}) == "hunyuan15-i2v"
    odd = HunyuanVideo15Transformer3DModel(**{**pipe.transformer.config, "task_type": "v2v"})
    with pytest.raises(ValueError, match="cannot tell the model family"):
        detect_family(odd)
    pipe.transformer.save_config(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15Pipeline"}))
    found = describe_model(str(tmp_path))
    assert (found.family, found.vae) == ("hunyuan15", (4, 16))
    pipe.vae.save_config(tmp_path / "vae")
    assert describe_model(str(tmp_path)).vae == (4, 16)  # spatial_compression_ratio of its VAE config
    assert detect_family(tmp_path) == "hunyuan15"
