"""CUDA paths: compiled FlexAttention forward+backward, the sparse kernel on the GPU, bf16, a training run.

Skipped without a GPU (CI has none); `benchmarks/gpu_check.sh` runs them on a lent GPU machine together
with the CUDA benchmarks. The CPU suite covers the same code paths in float64 where they run there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radial_lora.attention import block_sparse_attention
from radial_lora.attention.reference import reference_attention
from radial_lora.mask import radial_block_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _case(text_tokens: int = 0):
    """21 latent frames x 100 tokens (+ text), block 128: a partial last block, density well below 1."""
    mask = radial_block_mask(21, 100, block_size=128, decay_factor=0.2, num_text_tokens=text_tokens)
    return mask, 21 * 100 + text_tokens


def _inputs(seq: int, dtype: torch.dtype, batch: int = 2, heads: int = 4, dim: int = 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(batch, heads, seq, dim, generator=g, device=CUDA, dtype=dtype) for _ in range(4)]


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def _max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((g - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for g, r in zip(got, ref))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", ["flex", "sparse", "auto"])
@pytest.mark.parametrize("text", [0, 77])
def test_cuda_backends_match_reference_fwd_bwd_float32(backend: str, text: int) -> None:
    mask, seq = _case(text)
    q, k, v, dout = _inputs(seq, torch.float32)
    kpm = None
    if text:
        kpm = torch.ones(2, seq, dtype=torch.bool, device=CUDA)
        kpm[1, -20:] = False  # padded text tokens of the second sample, as HunyuanVideo has them
    ref = _fwd_bwd(lambda a, b, c: reference_attention(a, b, c, mask, 128, kpm), q, k, v, dout)
    got = _fwd_bwd(
        lambda a, b, c: block_sparse_attention(a, b, c, mask, block_size=128, backend=backend, key_padding_mask=kpm),
        q,
        k,
        v,
        dout,
    )
    assert _max_rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("backend", ["flex", "sparse"])
def test_cuda_bfloat16_close_to_float32_reference(backend: str) -> None:
    mask, seq = _case()
    q, k, v, dout = _inputs(seq, torch.float32)
    ref = _fwd_bwd(lambda a, b, c: reference_attention(a, b, c, mask, 128), q, k, v, dout)
    bf = [t.bfloat16() for t in (q, k, v, dout)]
    got = _fwd_bwd(lambda a, b, c: block_sparse_attention(a, b, c, mask, block_size=128, backend=backend), *bf)
    assert _max_rel_err(got, ref) < 3e-2


def test_radial_tiny_wan_on_cuda_bf16_matches_reference_backend() -> None:
    from radial_lora import apply_radial_attention
    from radial_lora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan").to(CUDA, torch.bfloat16)
    outs = {}
    for backend in ("reference", "flex"):
        apply_radial_attention(
            pipe, num_frames=33, height=64, width=64, block_size=16, decay_factor=0.5, dense_layers=1, backend=backend
        )
        gen = torch.Generator(device="cuda").manual_seed(0)
        outs[backend] = pipe(
            "a red circle moves right",
            num_frames=33,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=gen,
            output_type="latent",
        ).frames.float()
    assert torch.isfinite(outs["flex"]).all()
    err = (outs["flex"] - outs["reference"]).abs().max() / outs["reference"].abs().max()
    assert err < 5e-2, err


def test_quick_config_trains_on_cuda_in_bf16(tiny_wan_dir: Path, tiny_wan_dataset: Path, tmp_path: Path) -> None:
    from radial_lora import lora
    from radial_lora.train import trainer
    from tiny_config import quick_config

    cfg = quick_config(
        tiny_wan_dir,
        tiny_wan_dataset,
        tmp_path,
        "train.steps=12",
        "train.precision=bf16",
        "model.dtype=bfloat16",
        "checkpoint.every=6",
        "validation.every=6",
        "validation.max_clips=2",
        "optimizer.lr=5e-3",
    )
    result = trainer.train(cfg)
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = lora.read_lora_metadata(tmp_path)
    assert meta["steps"] == 12 and meta["attention"]["pattern"] == "radial"


def test_compiled_flex_does_not_recompile_when_bucket_lengths_alternate() -> None:
    """Training with two length buckets: after one compile per length, alternating steps reuse both graphs
    (``error_on_recompile`` would raise) and each BlockMask is built once per geometry."""
    import torch._dynamo

    from radial_lora.attention import flex

    built = []
    make = flex.make_block_mask
    cases = [_case(0), (radial_block_mask(11, 100, block_size=128, decay_factor=0.2), 11 * 100)]
    inputs = [_inputs(seq, torch.bfloat16, batch=1) for _, seq in cases]

    def step(i: int) -> None:
        (mask, _), (q, k, v, dout) = cases[i % 2], inputs[i % 2]
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        block_sparse_attention(q, k, v, mask, block_size=128, backend="flex").backward(dout)

    flex._FLEX_MASK_CACHE.clear()
    flex.make_block_mask = lambda *a, **kw: built.append(a[1]) or make(*a, **kw)
    try:
        for i in range(2):  # one compile per length
            step(i)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(2, 8):
                step(i)
    finally:
        flex.make_block_mask = make
    assert sorted(built) == sorted(seq for _, seq in cases)


def _wide_wan(layers: int):
    """A Wan transformer whose blocks' weights dominate (1024 wide, bf16, ~34 MB a block), LoRA rank 8,
    gradient checkpointing: what block swap and the 8-bit base act on."""
    from radial_lora import lora
    from radial_lora.models.published import build_transformer, wan_config

    torch.manual_seed(0)
    config = wan_config(8, 4096, layers, text_dim=64, freq_dim=32)
    model = build_transformer("wan", config, "cpu").to(torch.bfloat16).requires_grad_(False)
    lora.add_lora(model, rank=8)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float().normal_(0, 0.01)
    model.enable_gradient_checkpointing()
    return model.train()


def _wide_step(model) -> tuple[torch.Tensor, list[torch.Tensor], int, float]:
    import time

    from radial_lora.models.registry import get_adapter

    g = torch.Generator(device="cuda").manual_seed(0)
    latents = torch.randn(1, 16, 9, 32, 32, device=CUDA, generator=g)
    text = {"encoder_hidden_states": torch.randn(1, 64, 64, device=CUDA, generator=g, dtype=torch.bfloat16)}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = get_adapter("wan").predict(model, latents, torch.tensor([500.0], device=CUDA), text)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    return out.detach(), grads, torch.cuda.max_memory_allocated(), time.perf_counter() - start


def test_block_swap_on_cuda_same_gradients_lower_peak() -> None:
    """8 blocks, 6 swapped: outputs and LoRA gradients equal no swapping, and the peak drops by at least the
    bytes of the 4 swapped blocks beyond the 2 a step holds at once (90%); step times printed."""
    from radial_lora.models.quantize import module_bytes
    from radial_lora.train.block_swap import enable_block_swap

    plain = _wide_wan(8).to(CUDA)
    _wide_step(plain)  # warm-up (kernels, allocator)
    want = _wide_step(plain)
    del plain
    torch.cuda.empty_cache()
    model = _wide_wan(8)
    block = module_bytes(model.blocks[7]) - sum(p.numel() * 4 for p in model.blocks[7].parameters() if p.requires_grad)
    enable_block_swap(model, 6, CUDA)
    _wide_step(model)
    got = _wide_step(model)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert want[2] - got[2] >= 0.9 * 4 * block, (want[2], got[2], block)
    print(
        f"block swap 6 of 8: peak {want[2] / 2**20:.0f} -> {got[2] / 2**20:.0f} MiB, "
        f"step {want[3]:.3f} -> {got[3]:.3f} s"
    )


@pytest.mark.parametrize("scheme", ["int8", "float8"])
def test_8bit_base_on_cuda_halves_weights_and_trains(scheme: str) -> None:
    """torchao weight-only int8/float8 on the GPU (no fp8 matmul needed): the model's bytes on the device
    about halve, forward and backward run, and the LoRA gradients stay within 10% of the bf16 base's."""
    from radial_lora.models.quantize import quantize_base

    reference = _wide_wan(4).to(CUDA)
    want = _wide_step(reference)
    del reference
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = _wide_wan(4)
    quantize_base(model, scheme)
    model.to(CUDA)
    held = torch.cuda.memory_allocated() - before
    got = _wide_step(model)
    err = sum((a - b).float().square().sum() for a, b in zip(got[1], want[1])) ** 0.5
    err = float(err / sum(b.float().square().sum() for b in want[1]) ** 0.5)
    assert err < 0.1, err
    print(f"{scheme} base: {held / 2**20:.0f} MiB on the GPU, LoRA gradient error {err:.4f}, step {got[3]:.3f} s")
    assert held < 0.6 * sum(p.numel() * 2 for p in _wide_wan(4).parameters())
