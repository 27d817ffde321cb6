"""The ComfyUI export against ComfyUI's own loader rules, not against our key table.

Everything ComfyUI-side here is transcribed from ComfyUI's source at commit
a125cd84b054a57729b5eecab930ca9408719832 (github.com/Comfy-Org/ComfyUI, 2025-10-12):

- which LoRA key prefixes reach which model weight: ``comfy/lora.py`` ``model_lora_keys_unet``, lines 179-186
  (every model: ``diffusion_model.<module>`` and ``lora_unet_<module with _>``) and 274-284 (HunyuanVideo: the
  diffusion-pipe names, ``_attn.qkv.`` -> ``_attn_qkv.`` etc., under ``transformer.`` and ``diffusion_model.``);
- which suffixes form a LoRA pair: ``comfy/weight_adapter/lora.py`` lines 93-96 (``{x}.lora_B.weight`` with
  ``{x}.lora_A.weight`` is the "diffusers2" form we write; ``lora_up``/``lora_down`` is the other common one);
- the native weight names and shapes: ``comfy/ldm/wan/model.py`` lines 52-55 (``q, k, v, o``), 193-209
  (``self_attn``, ``cross_attn``, ``ffn.0``/``ffn.2``), 487 (``blocks``); ``comfy/ldm/flux/layers.py`` lines 88-90
  (``qkv = Linear(dim, 3 dim)``, ``proj``), 141-155 (``img_attn``/``txt_attn``), 233-237 (``linear1 =
  Linear(h, 3 h + mlp)``, split ``[3 h, mlp]`` at line 249, q/k/v in that order); ``comfy/ldm/hunyuan_video/
  model.py`` lines 73 and 148 (the token refiner's ``self_attn.qkv``/``proj``), 226-245 (``txt_in``,
  ``double_blocks``, ``single_blocks``).

A key ComfyUI cannot place is dropped with "lora key not loaded", so every exported key must be consumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radial_lora import lora
from radial_lora.models.builtin import model_identity
from radial_lora.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _comfyui_wan_weights(cfg) -> dict[str, tuple[int, int]]:
    """``diffusion_model.*`` Linear weights of ComfyUI's WanModel (t2v) for a diffusers Wan config."""
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    out = {}
    for i in range(cfg.num_layers):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                out[f"diffusion_model.blocks.{i}.{attn}.{proj}.weight"] = (dim, dim)
        out[f"diffusion_model.blocks.{i}.ffn.0.weight"] = (cfg.ffn_dim, dim)
        out[f"diffusion_model.blocks.{i}.ffn.2.weight"] = (dim, cfg.ffn_dim)
    return out


def _comfyui_hunyuan_weights(cfg) -> dict[str, tuple[int, int]]:
    """``diffusion_model.*`` Linear weights of ComfyUI's HunyuanVideo for a diffusers HunyuanVideo config."""
    h = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = int(h * cfg.mlp_ratio)
    out = {}
    for i in range(cfg.num_layers):
        for stream in ("img", "txt"):
            out[f"diffusion_model.double_blocks.{i}.{stream}_attn.qkv.weight"] = (3 * h, h)
            out[f"diffusion_model.double_blocks.{i}.{stream}_attn.proj.weight"] = (h, h)
            out[f"diffusion_model.double_blocks.{i}.{stream}_mlp.0.weight"] = (mlp, h)
            out[f"diffusion_model.double_blocks.{i}.{stream}_mlp.2.weight"] = (h, mlp)
    for i in range(cfg.get("num_single_layers", 0)):  # HunyuanVideo 1.5: double-stream blocks only
        out[f"diffusion_model.single_blocks.{i}.linear1.weight"] = (3 * h + mlp, h)
        out[f"diffusion_model.single_blocks.{i}.linear2.weight"] = (h, h + mlp)
    for i in range(cfg.num_refiner_layers):
        out[f"diffusion_model.txt_in.individual_token_refiner.blocks.{i}.self_attn.qkv.weight"] = (3 * h, h)
        out[f"diffusion_model.txt_in.individual_token_refiner.blocks.{i}.self_attn.proj.weight"] = (h, h)
    return out


def _comfyui_key_map(weights: dict[str, tuple[int, int]], hunyuan: bool) -> dict[str, str]:
    """LoRA prefix -> model weight, as ``model_lora_keys_unet`` builds it (comfy/lora.py 179-186, 274-284)."""
    key_map = {}
    for k in weights:
        key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        key_map[f"lora_unet_{key_lora}"] = k
        key_map[k[: -len(".weight")]] = k
    if hunyuan:
        for k in weights:
            key_lora = k.replace("_mod.lin.", "_mod.linear.").replace("_attn.qkv.", "_attn_qkv.")
            key_lora = key_lora.replace("_attn.proj.", "_attn_proj.")
            key_lora = key_lora.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
            key_lora = key_lora.replace(".modulation.lin.", ".modulation.linear.")
            key_lora = key_lora[len("diffusion_model.") : -len(".weight")]
            key_map[f"transformer.{key_lora}"] = k
            key_map[f"diffusion_model.{key_lora}"] = k
    return key_map


def _comfyui_patches(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, torch.Tensor], set]:
    """``{model weight: B @ A}`` for the LoRA pairs ComfyUI finds (weight_adapter/lora.py 93-96), and the keys
    it leaves unused."""
    patches, used = {}, set()
    for prefix, weight in key_map.items():
        for up, down in ((".lora_B.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_down.weight")):
            if prefix + up in state:
                patches[weight] = state[prefix + up].float() @ state[prefix + down].float()
                used |= {prefix + up, prefix + down}
    return patches, set(state) - used


def _export(family: str, tmp_path: Path, transformer: str = "transformer") -> tuple[Path, torch.nn.Module]:
    pipe = build_tiny_pipeline(family)
    tr = getattr(pipe, transformer)
    params = lora.add_lora(tr, rank=3, alpha=6)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    # The trainer's metadata: the model identity records mlp_ratio, from which the export sizes linear1.
    lora.save_lora(tmp_path, tr, {"family": family, **model_identity("tiny", tr.config)})
    return lora.export_comfyui(tmp_path, tmp_path / "comfy.safetensors"), tr


@pytest.mark.parametrize(
    "family,transformer",
    [
        ("wan", "transformer"),
        ("wan22", "transformer"),
        ("wan22", "transformer_2"),
        ("hunyuan", "transformer"),
        ("hunyuan15", "transformer"),
    ],
)
def test_every_exported_key_lands_on_a_comfyui_weight_of_its_shape(family, transformer, tmp_path: Path) -> None:
    path, tr = _export(family, tmp_path, transformer)
    state = load_file(path)
    hunyuan = family.startswith("hunyuan")  # 1.5's checkpoint keeps HunyuanVideo's block names
    weights = (_comfyui_hunyuan_weights if hunyuan else _comfyui_wan_weights)(tr.config)
    patches, unused = _comfyui_patches(state, _comfyui_key_map(weights, hunyuan))
    assert not unused, f"ComfyUI would report 'lora key not loaded' for {sorted(unused)[:4]}"
    for weight, delta in patches.items():
        assert tuple(delta.shape) == weights[weight], weight
    # Every attention projection the LoRA trained has its patch: q, k, v and out of every attention.
    n_lora = len([k for k in load_file(tmp_path / lora.LORA_FILENAME) if k.endswith("lora_A.weight")])
    if hunyuan:  # q/k/v fuse into one qkv (or linear1) weight
        assert 0 < len(patches) < n_lora
        assert family == "hunyuan15" or any(w.endswith("single_blocks.0.linear1.weight") for w in patches)
        assert any(w.endswith("txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight") for w in patches)
    else:
        assert len(patches) == n_lora == 2 * 2 * 4  # 2 blocks x (self, cross) x (q, k, v, o)


def test_hunyuan_fused_slots_follow_comfyui_qkv_order(tmp_path: Path) -> None:
    """ComfyUI splits a fused qkv output into q, k, v in that order (and linear1 into [q, k, v, mlp]): the
    fused patch's row slices must be the separate projections' deltas, and the mlp rows zero."""
    path, tr = _export("hunyuan", tmp_path)
    weights = _comfyui_hunyuan_weights(tr.config)
    patches, _ = _comfyui_patches(load_file(path), _comfyui_key_map(weights, hunyuan=True))
    src = load_file(tmp_path / lora.LORA_FILENAME)
    scale = 6 / 3  # alpha / rank, folded into the exported B

    def delta(module: str) -> torch.Tensor:
        return scale * src[f"transformer.{module}.lora_B.weight"] @ src[f"transformer.{module}.lora_A.weight"]

    h = tr.config.num_attention_heads * tr.config.attention_head_dim
    cases = {
        "diffusion_model.double_blocks.1.img_attn.qkv.weight": ("transformer_blocks.1.attn", ("to_q", "to_k", "to_v")),
        "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight": (
            "context_embedder.token_refiner.refiner_blocks.0.attn",
            ("to_q", "to_k", "to_v"),
        ),
        "diffusion_model.single_blocks.1.linear1.weight": (
            "single_transformer_blocks.1.attn",
            ("to_q", "to_k", "to_v"),
        ),
    }
    for weight, (attn, projs) in cases.items():
        fused = patches[weight]
        for i, proj in enumerate(projs):
            torch.testing.assert_close(fused[i * h : (i + 1) * h], delta(f"{attn}.{proj}"))
        assert torch.count_nonzero(fused[3 * h :]) == 0
    torch.testing.assert_close(
        patches["diffusion_model.double_blocks.0.img_attn.proj.weight"], delta("transformer_blocks.0.attn.to_out.0")
    )


def test_wan_export_round_trips_through_diffusers_own_converter(tmp_path: Path) -> None:
    """diffusers reads ComfyUI-native Wan LoRAs (``_convert_non_diffusers_wan_lora_to_diffusers``): loading our
    export that way must give the model that loading our diffusers file gives, output for output."""
    path, _ = _export("wan", tmp_path)
    assert lora.read_lora_metadata(path)["family"] == "wan"  # our metadata rides along in the header
    ours, comfy = build_tiny_pipeline("wan"), build_tiny_pipeline("wan")
    ours.load_lora_weights(tmp_path / lora.LORA_FILENAME)
    comfy.load_lora_weights(str(tmp_path), weight_name="comfy.safetensors")
    gen = torch.Generator().manual_seed(1)
    x, e = torch.randn(1, 4, 5, 8, 8, generator=gen), torch.randn(1, 6, 32, generator=gen)
    t = torch.tensor([400.0])
    with torch.no_grad():
        want = ours.transformer(x, t, e, return_dict=False)[0]
        got = comfy.transformer(x, t, e, return_dict=False)[0]
        base = build_tiny_pipeline("wan").transformer(x, t, e, return_dict=False)[0]
    assert torch.equal(got, want)
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output: the comparison means something


def test_hunyuan_linear1_width_comes_from_the_lora_never_a_guess(tmp_path: Path) -> None:
    """The tiny HunyuanVideo's mlp_ratio is 2, not the released model's 4: exported with no single_mlp_dim,
    linear1's patch has ComfyUI's shape [3h + 2h, r]; a LoRA that records no mlp_ratio is refused in one line
    (a 4x guess wrote a linear1 ComfyUI counted as loaded and then failed to patch)."""
    path, tr = _export("hunyuan", tmp_path)
    h = tr.config.num_attention_heads * tr.config.attention_head_dim
    assert tr.config.mlp_ratio == 2.0
    assert load_file(path)["diffusion_model.single_blocks.0.linear1.lora_B.weight"].shape[0] == 3 * h + 2 * h
    bare = tmp_path / "bare"
    lora.save_lora(bare, tr, {"family": "hunyuan"})
    with pytest.raises(ValueError, match="does not record the model's mlp_ratio; pass single_mlp_dim"):
        lora.export_comfyui(bare, bare / "comfy.safetensors")
    given = lora.export_comfyui(bare, bare / "comfy.safetensors", single_mlp_dim=2 * h)
    assert torch.equal(
        load_file(given)["diffusion_model.single_blocks.0.linear1.lora_B.weight"],
        load_file(path)["diffusion_model.single_blocks.0.linear1.lora_B.weight"],
    )
