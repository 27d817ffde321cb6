"""LoRA attach/save/load: the stock diffusers loader reads our file exactly; metadata and ComfyUI export."""

from __future__ import annotations

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


def _tiny_video(pipe) -> torch.Tensor:
    """A 5-frame 16x16 video from the stock pipeline call, fixed seed."""
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", num_frames=5, height=16, width=16, num_inference_steps=2, generator=generator, output_type="pt"
    ).frames


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
        video_base = _tiny_video(pipe)
    pipe.load_lora_weights(tmp_path / "out")
    with torch.no_grad():
        y_loaded = pipe.transformer(x, t, e, return_dict=False)[0]
        video_lora = _tiny_video(pipe)
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


def test_metadata_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    tr = build_tiny_pipeline("wan").transformer
    lora.add_lora(tr, rank=2)
    lora.save_lora(tmp_path / "now", tr, {"format": lora.LORA_FORMAT, "family": "wan"})
    assert lora.read_lora_metadata(tmp_path / "now")["family"] == "wan"
    lora.save_lora(tmp_path / "later", tr, {"format": "radial-lora/2", "family": "wan"})
    with pytest.raises(ValueError, match=r"format 'radial-lora/2' is not 'radial-lora/1'.*update radial-lora"):
        lora.read_lora_metadata(tmp_path / "later")
    # The readers that treat "no metadata" as "use the defaults" do not take a newer format for that.
    for reader in (lora.lora_expert, lora.lora_attention_settings):
        with pytest.raises(lora.LoraFormatError):
            reader(tmp_path / "later")
    assert lora.lora_expert(tmp_path / "now") is None


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "header":  # the JSON header overwritten
        data[8:40] = b"\xff" * 32
    else:  # one byte of one tensor changed, the file still parses
        data[-3] ^= 0x5A
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header", "tensors"])
def test_a_damaged_lora_is_one_line_for_every_reader(
    tiny_wan_lora: Path, tiny_wan_dir: Path, tmp_path: Path, how, capsys
) -> None:
    from radial_lora.cli import main

    damaged = tmp_path / "lora"
    damaged.mkdir()
    file = damaged / lora.LORA_FILENAME
    file.write_bytes((tiny_wan_lora / lora.LORA_FILENAME).read_bytes())
    _damage(file, how)
    line = rf"^LoRA {file} is damaged \(.*\); copy it again, or export it again from its run's checkpoint$"
    readers = [lora.load_lora_state, lora.check_lora, lambda p: lora.export_comfyui(p, tmp_path / "comfy", "wan")]
    if how != "tensors":  # the header itself is gone: its metadata too
        readers += [lora.read_lora_metadata, lora.lora_attention_settings, lora.lora_expert]
    for reader in readers:
        with pytest.raises(lora.LoraDamagedError, match=line):
            reader(damaged)
    assert not (tmp_path / "comfy").exists()
    common = ["--model", str(tiny_wan_dir), "--lora", str(damaged), "--height", "32", "--width", "32", "--steps", "1"]
    capsys.readouterr()
    for argv in (
        ["generate", "--prompt", "a red circle", "--frames", "9", "--out", str(tmp_path / "videos"), *common],
        ["evaluate", "--prompt", "a red circle", "--lengths", "9", "--out", str(tmp_path / "eval"), *common],
    ):
        assert main(argv) == 2
        (error,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert error.startswith(f"radial-lora {argv[0]}: error: LoRA {file} is damaged (")
    assert not (tmp_path / "videos").exists() and not (tmp_path / "eval").exists()  # refused before anything


def test_the_lora_header_records_a_sha256_of_its_tensors(tiny_wan_lora: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = lora.load_lora_state(tiny_wan_lora)
    with safe_open(str(tiny_wan_lora / lora.LORA_FILENAME), framework="pt") as f:
        assert f.metadata()[lora.DIGEST_KEY] == lora.tensors_digest(state)
    save_file(state, str(tmp_path / "plain.safetensors"))  # a LoRA of another tool, no digest: still read
    assert lora.load_lora_state(tmp_path / "plain.safetensors").keys() == state.keys()
