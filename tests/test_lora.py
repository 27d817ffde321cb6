"""LoRA attach/save/load: the stock diffusers loader reads our file exactly; metadata and ComfyUI export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radial_lora import lora
from radial_lora.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _wan_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 3, 8, 8, generator=gen), torch.tensor([500.0]), torch.randn(1, 6, 32, generator=gen)


def test_add_lora_freezes_base_and_targets_attention() -> None:
    tr = build_tiny_pipeline("wan").transformer
    params = lora.add_lora(tr, rank=4)
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(params) == len(trainable)
    # 2 blocks x (attn1, attn2) x 4 projections x (A, B)
    assert len(params) == 2 * 2 * 4 * 2
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_q", "to_k", "to_v"}
    # B starts at zero: the adapted model equals the base model.
    base = build_tiny_pipeline("wan").transformer
    x, t, e = _wan_inputs()
    with torch.no_grad():
        assert torch.equal(tr(x, t, e, return_dict=False)[0], base(x, t, e, return_dict=False)[0])


def test_add_lora_bad_input() -> None:
    tr = build_tiny_pipeline("wan").transformer
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(tr, rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        lora.add_lora(tr, rank=2, target_modules=["no_such_module"])


def test_saved_lora_loads_in_stock_pipeline(tmp_path: Path) -> None:
    tr = build_tiny_pipeline("wan").transformer
    params = lora.add_lora(tr, rank=4, alpha=8)  # scale 2: checks alpha survives the round trip
    _randomise(params)
    x, t, e = _wan_inputs()
    with torch.no_grad():
        y_trained = tr(x, t, e, return_dict=False)[0]
    meta = {"family": "wan", "base_model": "tiny", "lengths": [9, 17], "decay": 0.2, "rank": 4, "steps": 3}
    path = lora.save_lora(tmp_path / "out", tr, meta)
    assert path == tmp_path / "out" / lora.LORA_FILENAME
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    assert lora.read_lora_metadata(tmp_path / "out") == meta
    keys = list(load_file(path))
    assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)

    pipe = build_tiny_pipeline("wan")
    with torch.no_grad():
        y_base = pipe.transformer(x, t, e, return_dict=False)[0]
        video_base = pipe("a red circle", num_frames=5, height=16, width=16, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0), output_type="pt").frames
    pipe.load_lora_weights(tmp_path / "out")
    with torch.no_grad():
        y_loaded = pipe.transformer(x, t, e, return_dict=False)[0]
        video_lora = pipe("a red circle", num_frames=5, height=16, width=16, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0), output_type="pt").frames
    torch.testing.assert_close(y_loaded, y_trained, rtol=0, atol=1e-6)
    assert (y_loaded - y_base).abs().max() > 1e-2
    assert (video_lora - video_base).abs().max() > 1e-4


def test_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        lora.read_lora_metadata(tmp_path)
    tr = build_tiny_pipeline("wan").transformer
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora.save_lora(tmp_path, tr, {})
    lora.add_lora(tr, rank=2)
    with pytest.raises(ValueError, match="JSON"):
        lora.save_lora(tmp_path, tr, {"bad": object()})


def _delta(state: dict[str, torch.Tensor], module: str, scale: float = 1.0) -> torch.Tensor:
    return scale * state[f"{module}.lora_B.weight"].float() @ state[f"{module}.lora_A.weight"].float()


def test_comfyui_export_wan_same_deltas(tmp_path: Path) -> None:
    tr = build_tiny_pipeline("wan").transformer
    _randomise(lora.add_lora(tr, rank=4, alpha=2))
    lora.save_lora(tmp_path, tr, {"family": "wan"})
    out = lora.export_comfyui(tmp_path, tmp_path)
    src, dst = load_file(tmp_path / lora.LORA_FILENAME), load_file(out)
    assert len(dst) == len(src)
    pairs = {"attn1.to_q": "self_attn.q", "attn1.to_out.0": "self_attn.o", "attn2.to_v": "cross_attn.v"}
    for block in (0, 1):
        for diff_name, comfy_name in pairs.items():
            want = _delta(src, f"transformer.blocks.{block}.{diff_name}", scale=0.5)
            got = _delta(dst, f"diffusion_model.blocks.{block}.{comfy_name}")
            torch.testing.assert_close(got, want)
    assert json.loads(json.dumps(lora.read_lora_metadata(out))) == {"family": "wan"}


def test_comfyui_export_hunyuan_fuses_qkv(tmp_path: Path) -> None:
    tr = build_tiny_pipeline("hunyuan").transformer
    _randomise(lora.add_lora(tr, rank=3))
    lora.save_lora(tmp_path, tr, {"family": "hunyuan"})
    out = lora.export_comfyui(tmp_path, tmp_path / "c.safetensors", single_mlp_dim=64)
    src, dst = load_file(tmp_path / lora.LORA_FILENAME), load_file(out)
    hidden = 32  # tiny: 2 heads x 16
    fused = _delta(dst, "diffusion_model.double_blocks.1.img_attn_qkv")
    assert fused.shape == (3 * hidden, hidden)
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        want = _delta(src, f"transformer.transformer_blocks.1.attn.{proj}")
        torch.testing.assert_close(fused[i * hidden : (i + 1) * hidden], want)
    single = _delta(dst, "diffusion_model.single_blocks.0.linear1")
    assert single.shape == (3 * hidden + 64, hidden)
    torch.testing.assert_close(single[hidden : 2 * hidden], _delta(src, "transformer.single_transformer_blocks.0.attn.to_k"))
    assert torch.count_nonzero(single[3 * hidden :]) == 0
    torch.testing.assert_close(
        _delta(dst, "diffusion_model.double_blocks.0.img_attn_proj"),
        _delta(src, "transformer.transformer_blocks.0.attn.to_out.0"),
    )
    assert "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_A.weight" in dst
