"""Radial attention inside the real diffusers transformers, with PEFT LoRA on top.

The oracle is diffusers' own stock processor given the radial mask expanded to tokens as an explicit
attention mask: independent of our processors' projection/RoPE code and of the block-sparse kernels.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig

from model_cases import FRAMES, SIDE, TEXT, forward_backward, lora_model, model_inputs, oracle_processors
from radial_lora.attention.reference import expand_block_mask
from radial_lora.mask import mask_density, radial_block_mask
from radial_lora.models import apply_radial_attention, build_tiny_pipeline, get_adapter, remove_radial_attention
from radial_lora.models.hunyuan import RadialHunyuanAttnProcessor
from radial_lora.models.wan import RadialWanAttnProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 16


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: lora_model(family) for family in ("wan", "hunyuan")}


def _assert_same(a: tuple, b: tuple, atol: float = 2e-5) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-4)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-3, msg=name)


def _token_mask(family: str) -> torch.Tensor:
    adapter = get_adapter(family)
    text = TEXT if family == "hunyuan" else 0
    blocks = radial_block_mask(
        FRAMES,
        (SIDE // 2) ** 2,
        block_size=BLOCK,
        decay_factor=adapter.default_decay,
        model_type=adapter.mask_model_type,
        num_text_tokens=text,
    )
    seq = FRAMES * (SIDE // 2) ** 2 + text
    assert mask_density(blocks, seq, BLOCK) < 0.97, "the test geometry must give a really sparse mask"
    return expand_block_mask(blocks, seq, BLOCK)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_all_true_mask_equals_stock_model_and_lora_grads(family, models):
    transformer = models[family]
    stock = forward_backward(family, transformer)
    assert all(p.abs().sum() > 0 for p in stock[1].values()), "every LoRA parameter must get a gradient"
    assert all("lora_" in n for n in stock[1]), "only LoRA parameters may require grad"
    controller = apply_radial_attention(transformer, block_size=4096, backend="reference")
    try:
        patched = forward_backward(family, transformer)
        assert controller.calls["sparse"] == len(get_adapter(family).self_attention_modules(transformer))
        assert controller.last_density == 1.0
    finally:
        remove_radial_attention(transformer)
    _assert_same(patched, stock)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_sparse_mask_matches_stock_processor_with_token_mask(family, models):
    transformer = models[family]
    stock = forward_backward(family, transformer)
    token_mask = _token_mask(family)
    originals = dict(transformer.attn_processors)
    transformer.set_attn_processor(oracle_processors(family, transformer, token_mask))
    try:
        oracle = forward_backward(family, transformer)
    finally:
        transformer.set_attn_processor(dict(originals))
    assert (oracle[0] - stock[0]).abs().max() > 1e-3, "the radial mask must change the output"

    controller = apply_radial_attention(transformer, block_size=BLOCK, backend="reference")
    try:
        radial = forward_backward(family, transformer)
        assert controller.last_density < 0.97 and controller.calls["dense"] == 0
    finally:
        remove_radial_attention(transformer)
    _assert_same(radial, oracle)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_default_backend_matches_reference_forward_and_grads(family, models):
    transformer = models[family]
    runs = {}
    for backend in ("reference", "auto"):
        apply_radial_attention(transformer, block_size=BLOCK, backend=backend)
        try:
            runs[backend] = forward_backward(family, transformer)
        finally:
            remove_radial_attention(transformer)
    _assert_same(runs["auto"], runs["reference"], atol=1e-4)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_gradient_checkpointing_with_radial_and_lora(family, models):
    transformer = models[family]
    apply_radial_attention(transformer, block_size=BLOCK, backend="reference")
    try:
        plain = forward_backward(family, transformer)
        transformer.enable_gradient_checkpointing()
        checkpointed = forward_backward(family, transformer)
    finally:
        transformer.disable_gradient_checkpointing()
        remove_radial_attention(transformer)
    _assert_same(checkpointed, plain, atol=1e-6)


def test_dense_layers_training_mode_and_force_dense(models):
    transformer = models["hunyuan"]  # 2 double + 2 single blocks = block indices 0..3
    latents, timesteps, text = model_inputs("hunyuan")
    adapter = get_adapter("hunyuan")
    controller = apply_radial_attention(transformer, block_size=BLOCK, dense_layers=1, dense_timesteps=3)
    try:
        with torch.no_grad():
            adapter.predict(transformer, latents, timesteps, text)
            assert controller.calls == {"sparse": 0, "dense": 4}  # step 0 < dense_timesteps: all dense
            controller.reset_stats()
            with controller.training_mode():
                adapter.predict(transformer, latents, timesteps, text)
            assert controller.calls == {"sparse": 3, "dense": 1}  # only block 0 dense
            controller.reset_stats()
            with controller.training_mode(), controller.force_dense():
                adapter.predict(transformer, latents, timesteps, text)
            assert controller.calls == {"sparse": 0, "dense": 4}
    finally:
        remove_radial_attention(transformer)


def test_remove_restores_the_exact_stock_processors():
    pipe = build_tiny_pipeline("hunyuan")
    before = dict(pipe.transformer.attn_processors)
    apply_radial_attention(pipe, block_size=BLOCK)
    procs = pipe.transformer.attn_processors
    radial = {k for k, v in procs.items() if isinstance(v, RadialHunyuanAttnProcessor)}
    assert len(radial) == 4 and not any("refiner" in k for k in radial)
    assert all(procs[k] is before[k] for k in before if "refiner" in k), "the token refiner stays stock"
    apply_radial_attention(pipe, block_size=BLOCK, pattern="dense")  # re-patching replaces, keeps originals
    assert remove_radial_attention(pipe) == 1
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not pipe.transformer._forward_pre_hooks
    assert remove_radial_attention(pipe) == 0


def test_wan22_patches_both_experts_with_one_controller():
    pipe = build_tiny_pipeline("wan22")
    controller = apply_radial_attention(pipe, block_size=BLOCK)
    for transformer in (pipe.transformer, pipe.transformer_2):
        procs = [p for k, p in transformer.attn_processors.items() if k.endswith("attn1.processor")]
        assert procs and all(isinstance(p, RadialWanAttnProcessor) and p.controller is controller for p in procs)
        cross = [p for k, p in transformer.attn_processors.items() if k.endswith("attn2.processor")]
        assert all(type(p) is WanAttnProcessor for p in cross)
    assert controller.decay_factor == 0.8
    assert remove_radial_attention(pipe) == 2


def test_fused_qkv_with_lora_is_refused():
    pipe = build_tiny_pipeline("wan")
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_radial_attention(pipe)


def test_bad_settings_are_named():
    pipe = build_tiny_pipeline("wan")
    for kwargs, word in [
        ({"pattern": "sliding"}, "pattern"),
        ({"backend": "triton"}, "backend"),
        ({"dense_layers": -1}, "dense_layers"),
        ({"block_size": 0}, "block_size"),
        ({"decay_factor": 0.0}, "decay_factor"),
        ({"num_frames": 17}, "num_frames"),
        ({"num_frames": 18, "height": 64, "width": 64}, "num_frames=18"),
    ]:
        with pytest.raises(ValueError, match=word):
            apply_radial_attention(pipe, **kwargs)
    controller = apply_radial_attention(pipe.transformer, block_size=BLOCK)
    attn = pipe.transformer.blocks[0].attn1
    with pytest.raises(RuntimeError, match="no transformer call"):
        attn(torch.randn(1, 144, 32), None, None, None)
    assert controller.calls["sparse"] == 0


def test_dense_call_is_the_one_policy() -> None:
    from radial_lora.models.radial import dense_call

    assert dense_call("dense", 5, None, 0, 0) and dense_call("dense", 5, 40, 0, 0)
    assert dense_call("radial", 1, None, 2, 0) and not dense_call("radial", 2, None, 2, 0)
    assert dense_call("radial", 9, 1, 0, 2) and not dense_call("radial", 9, 2, 0, 2)
    assert not dense_call("radial", 9, None, 0, 50)  # training: no denoising steps, dense_timesteps ignored
