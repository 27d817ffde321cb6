"""Block-sparse attention backends against the dense oracle: outputs, gradients, errors, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radial_lora.attention import block_sparse_attention, resolve_backend
from radial_lora.attention.flex import flex_block_attention
from radial_lora.attention.reference import reference_attention
from radial_lora.attention.sparse import get_plan, sparse_block_attention
from radial_lora.mask import mask_density, radial_block_mask

TOL = 1e-10


def _inputs(batch: int, heads: int, seq: int, dim: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype) for _ in range(3)]


def _cotangent(like: torch.Tensor, seed: int = 99) -> torch.Tensor:
    """A seeded upstream gradient shaped like ``like``: every run backpropagates the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=g, dtype=like.dtype)


def _random_mask(nb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(nb, nb, generator=g) < density
    mask[torch.arange(nb), torch.randint(0, nb, (nb,), generator=g)] = True  # >= 1 kept block per row
    return mask


def _radial_case():
    """16 latent frames x 24 tokens + 9 text tokens, block 16: seq 393, partial last block, dense text.

    Frames straddle block edges (24 % 16 != 0); density 0.63, so several chunks with some waste.
    """
    mask = radial_block_mask(16, 24, block_size=16, decay_factor=1.0, num_text_tokens=9)
    return mask, 393, 16


def _padding(batch: int, seq: int) -> torch.Tensor:
    kpm = torch.ones(batch, seq, dtype=torch.bool)
    kpm[1, -5:] = False  # padded text tokens of the second sample
    kpm[0, 3] = False
    return kpm


CASES = {
    "radial+text": (*_radial_case(), False),
    "radial+text+padding": (*_radial_case(), True),
    "random": (_random_mask(7, 0.4, seed=1), 100, 16, False),
    "random+padding": (_random_mask(7, 0.3, seed=2), 100, 16, True),
}

SPARSE_KERNELS = {
    "sparse-flash": lambda q, k, v, m, bs, kpm: sparse_block_attention(q, k, v, m, bs, kpm, kernel="flash"),
    "sparse-matmul": lambda q, k, v, m, bs, kpm: sparse_block_attention(q, k, v, m, bs, kpm, kernel="matmul"),
    "sparse": lambda q, k, v, m, bs, kpm: block_sparse_attention(
        q, k, v, m, block_size=bs, backend="sparse", key_padding_mask=kpm
    ),
    "auto": lambda q, k, v, m, bs, kpm: block_sparse_attention(q, k, v, m, block_size=bs, key_padding_mask=kpm),
}


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", list(SPARSE_KERNELS))
def test_sparse_matches_reference_fwd_bwd_float64(case, kernel):
    mask, seq, bs, padded = CASES[case]
    q, k, v = _inputs(2, 3, seq, 8)
    kpm = _padding(2, seq) if padded else None
    dout = _cotangent(q)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs, kpm), q, k, v, dout)
    got = _grads(lambda a, b, c: SPARSE_KERNELS[kernel](a, b, c, mask, bs, kpm), q, k, v, dout)
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
        assert torch.allclose(x, r, atol=TOL, rtol=0), f"{name}: max err {(x - r).abs().max():.2e}"
    # The mask matters: dense attention differs from the block-sparse result.
    assert (F.scaled_dot_product_attention(q, k, v) - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_sparse_memory_budgets_split_work_without_changing_results(kernel, monkeypatch):
    """Tiny budgets force groups into one-chunk slices and matmul tiles into one head at a time."""
    from radial_lora.attention import sparse

    monkeypatch.setattr(sparse, "MIN_GATHER_ELEMENTS", 1)
    monkeypatch.setattr(sparse, "MAX_TILE_ELEMENTS", 1)
    mask, seq, bs, _ = CASES["radial+text+padding"]
    q, k, v = _inputs(2, 3, seq, 8)
    kpm = _padding(2, seq)
    dout = _cotangent(q)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs, kpm), q, k, v, dout)
    got = _grads(lambda a, b, c: sparse_block_attention(a, b, c, mask, bs, kpm, kernel=kernel), q, k, v, dout)
    for r, x in zip(ref, got):
        assert torch.allclose(x, r, atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_sparse_accepts_processor_layout(kernel):
    """Attention processors hand over ``[B, S, H, D]``-transposed views: non-contiguous inputs."""
    mask, seq, bs, _ = CASES["random+padding"]
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 3, seq, 8))
    assert not q.is_contiguous()
    kpm = _padding(2, seq)
    dout = _cotangent(q)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs, kpm), q, k, v, dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))  # clone keeps the strides
    assert not q2.is_contiguous()
    out = sparse_block_attention(q2, k2, v2, mask, bs, kpm, kernel=kernel)
    out.backward(dout)
    for r, x in zip(ref, (out, q2.grad, k2.grad, v2.grad)):
        assert torch.allclose(x, r, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["random+padding", "random"])
def test_flex_eager_matches_reference_float64(case):
    """Uncompiled flex evaluates only mask_mod: ours looks the block mask up, so eager is still exact."""
    mask, seq, bs, padded = CASES[case]
    q, k, v = _inputs(2, 3, seq, 8)
    kpm = _padding(2, seq) if padded else None
    out = flex_block_attention(q, k, v, mask, bs, kpm, compile=False)
    ref = reference_attention(q, k, v, mask, bs, kpm)
    assert torch.allclose(out, ref, atol=TOL, rtol=0)


def test_flex_block_mask_built_once_per_geometry(monkeypatch):
    """Alternating bucket lengths reuse each geometry's BlockMask instead of rebuilding it every call."""
    from radial_lora.attention import flex

    built = []
    make = flex.make_block_mask
    monkeypatch.setattr(flex, "make_block_mask", lambda *a, **kw: built.append(a[1]) or make(*a, **kw))
    monkeypatch.setattr(flex, "_FLEX_MASK_CACHE", type(flex._FLEX_MASK_CACHE)())
    cases = [CASES["random"][:3], (_random_mask(5, 0.5, seed=4), 70, 16)]
    with torch.no_grad():
        for i in range(6):
            mask, seq, bs = cases[i % 2]
            q, k, v = _inputs(1, 2, seq, 8)
            out = flex_block_attention(q, k, v, mask, bs, compile=False)
            assert torch.allclose(out, reference_attention(q, k, v, mask, bs), atol=TOL, rtol=0)
    assert built == [100, 70]


@pytest.mark.slow
def test_flex_compiled_cpu_forward_float32():
    """The compiled kernel follows the block lists (full blocks) and mask_mod (padded keys)."""
    mask, seq, bs = _radial_case()
    q, k, v = _inputs(2, 2, seq, 16, dtype=torch.float32)
    for kpm in (None, _padding(2, seq)):
        out = block_sparse_attention(q, k, v, mask, block_size=bs, backend="flex", key_padding_mask=kpm)
        ref = reference_attention(q, k, v, mask, bs, kpm)
        assert torch.allclose(out, ref, atol=2e-5, rtol=0), f"kpm={kpm is not None}"


@pytest.mark.parametrize("backend", ["sparse", "dense", "reference"])
def test_all_true_mask_equals_dense_sdpa(backend):
    q, k, v = _inputs(1, 2, 70, 8)
    mask = torch.ones(5, 5, dtype=torch.bool)
    kpm = torch.ones(1, 70, dtype=torch.bool)
    kpm[0, 60:] = False
    for pad in (None, kpm):
        out = block_sparse_attention(q, k, v, mask, block_size=16, backend=backend, key_padding_mask=pad)
        sdpa_mask = None if pad is None else pad[:, None, None, :]
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_query_without_real_keys_gives_zero_not_nan(kernel):
    """Block 0 only sees itself; padding all its keys leaves its queries with nothing, like SDPA -> 0."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    q, k, v = _inputs(1, 2, 40, 8)
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[0, :16] = False
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sparse_block_attention(q, k, v, mask, 16, kpm, kernel=kernel)
    out.sum().backward()
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    assert torch.allclose(out[:, :, 16:], reference_attention(q, k, v, mask, 16, kpm)[:, :, 16:], atol=TOL, rtol=0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_sparse_bfloat16_close_to_float64(kernel):
    mask, seq, bs = _radial_case()
    q, k, v = _inputs(1, 2, seq, 16)
    out = sparse_block_attention(*(t.bfloat16() for t in (q, k, v)), mask, bs, kernel=kernel)
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference_attention(q, k, v, mask, bs)).abs().max() < 3e-2


def test_sparse_saves_no_score_matrix():
    """Memory follows the inputs, not seq^2: autograd keeps only q, k, v, out and the log-sum-exp."""
    batch, heads, seq, dim = 1, 2, 16 * 40, 8
    mask = radial_block_mask(10, 64, block_size=16, decay_factor=1.0)
    q, k, v = (t.requires_grad_() for t in _inputs(batch, heads, seq, dim))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        block_sparse_attention(q, k, v, mask, block_size=16, backend="sparse")
    assert sum(saved) <= 4 * batch * heads * seq * dim + batch * heads * seq
    assert sum(saved) < batch * heads * seq * seq / 4


def _cover(plan, nb: int, bs: int, backward: bool) -> np.ndarray:
    """How often the plan's forward (or backward) tiles compute each block pair."""
    count = np.zeros((nb, nb), dtype=np.int64)
    for t in plan.views:
        count[t.q0 // bs : -(-t.q1 // bs), t.k0 // bs : -(-t.k1 // bs)] += 1
    for group in plan.column_gathers if backward else plan.row_gathers:
        for qi, ki in zip(group.q_index.numpy() // bs, group.k_index.numpy() // bs, strict=True):
            count[np.ix_(np.unique(qi), np.unique(ki))] += 1
    return count


COVER_MASKS = {
    "wan480p-81f": (radial_block_mask(21, 1560, decay_factor=0.2), 21 * 1560, 128),
    "wan720p-161f": (radial_block_mask(41, 3600, decay_factor=0.2), 41 * 3600, 128),
    "hunyuan+text": (
        radial_block_mask(33, 390, decay_factor=0.95, model_type="hunyuan", num_text_tokens=77),
        33 * 390 + 77,
        128,
    ),
    "radial+text": _radial_case(),
    "random": (_random_mask(40, 0.3, seed=3), 40 * 16 - 5, 16),
}


@pytest.mark.parametrize("case", list(COVER_MASKS))
def test_plan_is_an_exact_cover_forward_and_backward(case):
    """Every kept block pair is computed exactly once (no waste, nothing missed), both passes."""
    mask, seq, bs = COVER_MASKS[case]
    plan = get_plan(mask, seq, bs, torch.device("cpu"))
    want = mask.numpy().astype(np.int64)
    for backward in (False, True):
        assert np.array_equal(_cover(plan, mask.shape[0], bs, backward), want), f"backward={backward}"
    assert plan.kept_pairs == int(mask_density(mask, seq, bs) * seq * seq + 0.5)
    assert get_plan(mask.clone(), seq, bs, torch.device("cpu")) is plan  # cached by content


def test_plan_reads_the_radial_mask_in_frame_sized_views():
    """At Wan2.1 480p the views (sink and neighbouring frames, read in place) are frame-tall and carry over
    half the work; the far bands go to gathered items, two query (key) blocks tall where neighbours share."""
    mask, seq, bs = COVER_MASKS["wan480p-81f"]
    plan = get_plan(mask, seq, bs, torch.device("cpu"))
    tall = [t for t in plan.views if t.q1 - t.q0 >= 1500]
    assert sum((t.q1 - t.q0) * (t.k1 - t.k0) for t in tall) > 0.5 * plan.kept_pairs

    def pairs(groups, keep=lambda shape: True):
        return sum(n * lq * lk for n, lq, lk in (g.shape for g in groups) if keep((n, lq, lk)))

    # Forward items: most far work in two-block query tiles; backward items: in long query tiles.
    assert pairs(plan.row_gathers, lambda s: s[1] == 256) > 0.8 * pairs(plan.row_gathers)
    assert pairs(plan.column_gathers, lambda s: s[1] >= 1024) > 0.8 * pairs(plan.column_gathers)
    assert pairs(plan.row_gathers) == pairs(plan.column_gathers) == plan.kept_pairs - plan.view_pairs


def _far_band_case():
    """Frames of 52 tokens in 8-token blocks, decay 0.2: the far bands are 2-3 blocks wide and shift one block
    per query block, as at real sizes; 9 text tokens make a partial last block."""
    mask = radial_block_mask(18, 52, block_size=8, decay_factor=0.2, num_text_tokens=9)
    return mask, 18 * 52 + 9, 8


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_sparse_far_band_plan_matches_reference_float64(kernel, padded):
    mask, seq, bs = _far_band_case()
    plan = get_plan(mask, seq, bs, torch.device("cpu"))
    assert plan.views and plan.row_gathers and plan.column_gathers
    assert {g.shape[1] for g in plan.row_gathers} >= {bs, 2 * bs}  # single and shared items both run
    q, k, v = _inputs(2, 2, seq, 16)
    kpm = _padding(2, seq) if padded else None
    dout = _cotangent(q)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs, kpm), q, k, v, dout)
    got = _grads(lambda a, b, c: sparse_block_attention(a, b, c, mask, bs, kpm, kernel=kernel), q, k, v, dout)
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
        assert torch.allclose(x, r, atol=TOL, rtol=0), f"{name}: max err {(x - r).abs().max():.2e}"


def test_sparse_bfloat16_fwd_bwd_as_accurate_as_masked_sdpa():
    """In bfloat16 the tiles' errors against float64 stay within twice those of SDPA with the token mask in
    bfloat16 (the same math in one call), for the output and all three gradients."""
    mask, seq, bs = _far_band_case()
    q, k, v = _inputs(2, 2, seq, 64)
    dout = _cotangent(q)
    exact = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs), q, k, v, dout)
    low = [t.bfloat16() for t in (q, k, v, dout)]
    sdpa = _grads(lambda a, b, c: reference_attention(a, b, c, mask, bs), *low)
    ours = _grads(lambda a, b, c: sparse_block_attention(a, b, c, mask, bs), *low)
    assert ours[0].dtype == torch.bfloat16
    for name, e, s, o in zip(("out", "dq", "dk", "dv"), exact, sdpa, ours):
        err_sdpa, err_ours = ((x.double() - e).abs().max().item() for x in (s, o))
        assert err_ours <= 2 * err_sdpa + 1e-3, f"{name}: ours {err_ours:.2e}, masked SDPA {err_sdpa:.2e}"


def test_auto_rule():
    """auto: compiled flex on CUDA; the sparse kernel on CPU, for training and inference alike (it was the
    faster CPU forward too, benchmarks/RESULTS.md)."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "flex"
    assert resolve_backend("auto", cpu) == "sparse"
    assert resolve_backend("dense", cpu) == "dense" and resolve_backend("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="valid backends"):
        resolve_backend("triton", cpu)


def test_auto_forward_on_cpu_is_the_sparse_kernel(monkeypatch):
    import radial_lora.attention as attn

    def must_not_run(*args, **kwargs):
        raise AssertionError("auto took compiled flex on CPU")

    monkeypatch.setattr(attn, "flex_block_attention", must_not_run)
    mask, seq, bs, _ = CASES["random"]
    q, k, v = _inputs(1, 2, seq, 8, dtype=torch.float32)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, mask, block_size=bs)
    assert torch.equal(out, sparse_block_attention(q, k, v, mask, bs))


def test_errors_name_the_problem():
    q, k, v = _inputs(1, 1, 40, 8)
    mask = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid backends: auto, flex, sparse, dense, reference"):
        block_sparse_attention(q, k, v, mask, block_size=16, backend="triton")
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*expected \(3, 3\)"):
        block_sparse_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), block_size=16)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] keep no key block"):
        block_sparse_attention(q, k, v, empty, block_size=16, backend="sparse")
    with pytest.raises(ValueError, match=r"same shape"):
        block_sparse_attention(q, k[:, :, :30], v, mask, block_size=16)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        block_sparse_attention(q[0], k[0], v[0], mask, block_size=16)
    with pytest.raises(ValueError, match=r"key_padding_mask shape \(1, 39\)"):
        block_sparse_attention(q, k, v, mask, block_size=16, key_padding_mask=torch.ones(1, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention(q, k, v, mask.float(), block_size=16)
    with pytest.raises(ValueError, match="no backward on CPU"):
        block_sparse_attention(q.float().requires_grad_(), k.float(), v.float(), mask, block_size=16, backend="flex")


def _mask_cli(argv: list[str]) -> int:
    """Run the mask subcommand alone (the full CLI imports every command's heavy dependencies)."""
    import argparse

    from radial_lora.cli import mask as mask_cli

    parser = argparse.ArgumentParser()
    mask_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    ("frames", "tokens", "decay", "sparsity"),
    [(41, 3840, 1.0, 0.7361), (41, 3600, 1.0, 0.7399), (41, 3600, 0.2, 0.8239), (21, 3600, 0.2, 0.7363)],
)
def test_sparsity_at_the_papers_table_2_settings(frames, tokens, decay, sparsity):
    """docs/RADIAL_MASK.md: Table 2's 73.6% (Wan2.1-14B 2x) is decay 1.0 at 161 frames of 1280x768 (41 x 3840),
    and 81 frames of 720p at decay 0.2; 161 frames of 720p at the scripts' decay 0.2 is 82.4%."""
    from radial_lora.mask import mask_density

    mask = radial_block_mask(frames, tokens, decay_factor=decay)
    assert round(1 - mask_density(mask, frames * tokens), 4) == sparsity


def test_mask_cli_prints_costs_and_writes_files(tmp_path, capsys):
    import numpy as np

    from radial_lora.mask import mask_density

    npy, png = tmp_path / "m.npy", tmp_path / "sub" / "m.png"
    argv = ["mask", "--frames", "81", "--height", "256", "--width", "256", "--decay", "1.0"]
    assert _mask_cli([*argv, "--save-npy", str(npy), "--save-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "21 latent frames" in out and "256 tokens per frame" in out  # (256/16)^2 tokens
    expected = radial_block_mask(21, 256, decay_factor=1.0)
    assert np.array_equal(np.load(npy), expected.numpy())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    density = mask_density(expected, 21 * 256)
    assert f"density:       {density:.4f}" in out and f"ideal speedup: {1 / density:.2f}x" in out
    assert "(40 heads x 128)" in out  # Wan2.1-14B
    _mask_cli(["mask", "--model", "hunyuan", "--frames", "129", "--height", "720", "--width", "1280"])
    out = capsys.readouterr().out
    assert "(24 heads x 128)" in out  # HunyuanVideo has 24 heads, not Wan's 40
    dense_tflops = 4 * 24 * 128 * (33 * 3600 + 256) ** 2 / 1e12  # 174 TFLOPs, not 290
    assert f"{dense_tflops:.2f} TFLOPs dense" in out
    _mask_cli(["mask", "--model", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "--frames", "121", "--height", "704"] + [
        "--width", "1280"])  # fmt: skip
    out = capsys.readouterr().out
    assert "880 tokens per frame (VAE 4x16x16)" in out and "blocks of 64 (wan22, decay 0.8)" in out
    assert "(24 heads x 128)" in out
    for model in ("hunyuan15", "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"):  # family name or hub id
        _mask_cli(["mask", "--model", model, "--frames", "241", "--height", "480", "--width", "848"])
        out = capsys.readouterr().out  # 16x VAE, patch 1, 1985 joint text tokens, 16 heads
        assert "61 latent frames x 30x53 patches = 1590 tokens per frame (VAE 4x16x16)" in out, out
        assert "96990 video + 1985 text" in out and "(16 heads x 128)" in out and "(hunyuan15, decay 0.95)" in out
    with pytest.raises(ValueError, match="4k\\+1"):
        _mask_cli(["mask", "--frames", "80", "--height", "256", "--width", "256"])
    with pytest.raises(ValueError, match="missing geometry"):
        _mask_cli(["mask", "--latent-frames", "4"])
    with pytest.raises(ValueError, match="not both"):
        _mask_cli(["mask", "--latent-frames", "4", "--tokens-per-frame", "8", "--frames", "81"])
