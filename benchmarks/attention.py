"""Benchmark: block-sparse attention backends vs dense SDPA at real radial masks.

CPU (default): the real geometries of Wan2.1 (832x480: 30 x 52 = 1560 tokens per latent frame;
1280x720: 3600), head_dim 128, decay 0.2 (the paper's Wan2.1 setting), in bfloat16 and float32,
``--heads`` heads (default 2: the cost per head is the same at 12 or 40 heads, and 2 keeps a
run in minutes on 2 cores). Times are the best of ``--repeats`` with the backends interleaved in
one process, so load from other jobs hits them alike; plans are built before timing. ``--memory``
adds each cell's peak resident memory (VmHWM above the resident memory before the call, reset
through /proc/self/clear_refs), measured once per cell in a fresh subprocess. ``--small`` runs
round 1's toy table instead (256 tokens per frame, 2 heads x 64, float32).

CUDA (``--device cuda``): compiled flex and the sparse kernel vs dense SDPA in bfloat16 at Wan2.1
1.3B (480p) and 14B (720p) 2x/4x lengths; memory is ``torch.cuda.max_memory_allocated``.

Writes its table between markers in ``benchmarks/RESULTS.md`` (other sections are left alone).

    python benchmarks/attention.py [--cases NAME ...] [--memory] [--device cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from radial_lora.attention import block_sparse_attention
from radial_lora.attention.sparse import get_plan, sparse_block_attention
from radial_lora.mask import mask_density, radial_block_mask

logger = logging.getLogger("bench.attention")
RESULTS = Path(__file__).with_name("RESULTS.md")
CPU_BACKENDS = ("dense", "auto", "sparse", "sparse-matmul", "flex")
REAL_BACKENDS = ("dense", "auto")
# (name, label, latent frames, tokens per frame, dtypes, repeats cap): Wan2.1 at 832x480 and 1280x720.
CPU_CASES = [
    ("wan480p-81f", "Wan2.1 480p 81 frames", 21, 30 * 52, ("bfloat16", "float32"), None),
    ("wan480p-41f", "Wan2.1 480p 41 frames", 11, 30 * 52, ("bfloat16", "float32"), None),
    ("wan480p-21f", "Wan2.1 480p 21 frames", 6, 30 * 52, ("bfloat16", "float32"), None),
    ("wan480p-161f", "Wan2.1 480p 161 frames (2x)", 41, 30 * 52, ("bfloat16",), 1),
    ("wan720p-81f", "Wan2.1 720p 81 frames", 21, 45 * 80, ("bfloat16",), 1),
    # Short clips: the nearly full end of the range (density 0.70 and 0.91).
    ("wan720p-17f", "Wan2.1 720p 17 frames", 5, 45 * 80, ("bfloat16", "float32"), None),
    ("wan720p-9f", "Wan2.1 720p 9 frames", 3, 45 * 80, ("bfloat16", "float32"), None),
]
CUDA_BACKENDS = ("dense", "flex", "sparse")
# (label, latent frames, tokens per frame, heads, head_dim): Wan2.1 1.3B at 832x480, 14B at 1280x720.
CUDA_SHAPES = [
    ("Wan2.1-1.3B 480p 1x (81 frames)", 21, 30 * 52, 12, 128),
    ("Wan2.1-1.3B 480p 2x (161 frames)", 41, 30 * 52, 12, 128),
    ("Wan2.1-1.3B 480p 4x (321 frames)", 81, 30 * 52, 12, 128),
    ("Wan2.1-14B 720p 2x (161 frames)", 41, 45 * 80, 40, 128),
    ("Wan2.1-14B 720p 4x (321 frames)", 81, 45 * 80, 40, 128),
]


# ---------------------------------------------------------------- RESULTS.md sections


def update_section(path: Path, name: str, heading: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (atomic write).

    A missing section is appended under ``heading``; everything outside the markers is kept.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".md")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def machine_info(device: str) -> str:
    """One line: CPU model, threads, torch version, date, load (timings on shared machines are noisy)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}; "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; 1-min load average at start {load:.1f}"
    )


# ---------------------------------------------------------------- one measurement


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def _dense_cuda(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _attention_fn(backend: str, mask: torch.Tensor, block_size: int, device: str = "cpu"):
    if backend == "dense":
        return _dense_cuda if device == "cuda" else F.scaled_dot_product_attention
    if backend == "sparse-matmul":
        return lambda q, k, v: sparse_block_attention(q, k, v, mask, block_size, kernel="matmul")
    return lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=block_size, backend=backend)


def _run_once(fn, q, k, v, grad: bool, sync) -> None:
    if grad:
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
    else:
        with torch.no_grad():
            fn(q, k, v)
    sync()


def _mask(cfg: dict) -> torch.Tensor:
    return radial_block_mask(cfg["frames"], cfg["tokens"], decay_factor=cfg["decay"], block_size=cfg["block"])


def _setup(cfg: dict, backend: str, grad: bool):
    """Inputs and the attention callable for one cell."""
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    seq = cfg["frames"] * cfg["tokens"]
    mask = _mask(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, cfg["heads"], seq, cfg["head_dim"])
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return (q, k, v), _attention_fn(backend, mask, cfg["block"], cfg["device"])


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def peak_memory(cfg: dict) -> float:
    """Extra memory (MiB) one call needs: CUDA max_memory_allocated, CPU peak resident (VmHWM)."""
    grad = cfg["mode"] == "fwd+bwd"
    (q, k, v), fn = _setup(cfg, cfg["backend"], grad)
    cuda = cfg["device"] == "cuda"
    sync = _sync(cfg["device"])
    if cfg["backend"] == "flex" or cuda:
        _run_once(fn, q, k, v, grad, sync)  # compile / autotune / allocator warm-up, not measured
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
        _reset_peak()
    _run_once(fn, q, k, v, grad, sync)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return (peak - base) / 2**20


def peak_memory_in_subprocess(cfg: dict) -> float | None:
    """Fresh interpreter per cell so CPU peak memory is not hidden by earlier allocations."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        logger.warning(
            "%s %s at %d frames failed:\n%s", cfg["backend"], cfg["mode"], cfg["frames"], proc.stderr[-2000:]
        )
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def best_times(cfg: dict, cells: list[tuple[str, str]], repeats: int) -> dict[tuple[str, str], float | None]:
    """Best-of-``repeats`` seconds per (backend, mode), interleaved so load changes hit all alike."""
    sync = _sync(cfg["device"])
    inputs = {grad: _setup(cfg, "dense", grad)[0] for grad in {mode == "fwd+bwd" for _, mode in cells}}
    mask = _mask(cfg)
    if any(backend in ("auto", "sparse", "sparse-matmul") for backend, _ in cells):  # once per geometry, untimed
        get_plan(mask, cfg["frames"] * cfg["tokens"], cfg["block"], torch.device(cfg["device"]))
    setups = {}
    for backend, mode in cells:
        grad = mode == "fwd+bwd"
        fn = _attention_fn(backend, mask, cfg["block"], cfg["device"])
        try:
            if cfg["device"] == "cuda" or backend == "flex":
                _run_once(fn, *inputs[grad], grad, sync)  # warm-up: compile, autotune
        except torch.cuda.OutOfMemoryError:
            logger.warning("%s %s: out of memory", backend, mode)
            torch.cuda.empty_cache()
            continue
        setups[backend, mode] = (fn, grad)
    times: dict[tuple[str, str], float | None] = {cell: None for cell in cells}
    for _ in range(repeats):
        for cell, (fn, grad) in setups.items():
            t0 = time.perf_counter()
            _run_once(fn, *inputs[grad], grad, sync)
            elapsed = time.perf_counter() - t0
            times[cell] = elapsed if times[cell] is None else min(times[cell], elapsed)
        logger.info("times so far: %s", {f"{b} {m}": round(t, 3) for (b, m), t in times.items() if t})
    return times


# ---------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _speedup(dense: float | None, other: float | None) -> str:
    return "n/a" if dense is None or other is None else f"{dense / other:.2f}x"


def _row(prefix: str, backend: str, t: dict, mem: dict, time_scale: float = 1.0) -> str:
    fwd, fb = t.get((backend, "fwd")), t.get((backend, "fwd+bwd"))
    dfwd, dfb = t.get(("dense", "fwd")), t.get(("dense", "fwd+bwd"))
    return (
        f"| {prefix} | {backend} | {_fmt(fwd and fwd * time_scale, '.3f')} | {_speedup(dfwd, fwd)} | "
        f"{_fmt(mem.get((backend, 'fwd')), '.0f')} | {_fmt(fb and fb * time_scale, '.3f')} | "
        f"{_speedup(dfb, fb)} | {_fmt(mem.get((backend, 'fwd+bwd')), '.0f')} |"
    )


def run_cpu_small(args) -> str:
    frames_list = args.frames or ([21, 41] if args.quick else [21, 41, 81])
    repeats = 1 if args.quick else args.repeats
    backends = [b for b in CPU_BACKENDS if b not in args.skip]
    cells = [(b, m) for b in backends for m in ("fwd", "fwd+bwd") if not (b == "flex" and m == "fwd+bwd")]
    rows = []
    for frames in frames_list:
        seq = frames * args.tokens
        cfg = dict(
            device="cpu",
            dtype="float32",
            frames=frames,
            tokens=args.tokens,
            heads=args.heads,
            head_dim=args.head_dim,
            decay=args.decay,
            block=128,
        )
        mask = _mask(cfg)
        density = mask_density(mask, seq)
        plan = get_plan(mask, seq, 128, torch.device("cpu"))
        logger.info("%d frames: density %.3f, %d view tiles", frames, density, len(plan.views))
        mem = {}
        if not args.no_memory:
            for backend, mode in cells:
                mem[backend, mode] = peak_memory_in_subprocess(dict(cfg, backend=backend, mode=mode))
                logger.info("%3d frames %-13s %-7s peak %s MiB", frames, backend, mode, mem[backend, mode])
        times = best_times(cfg, cells, repeats)
        prefix = f"{frames} x {args.tokens} = {seq} | {density:.3f} | {1 / density:.2f}x"
        rows += [_row(prefix, b, times, mem) for b in backends]
    busy = os.getloadavg()[0] > 1.0
    load_note = "Other jobs shared the cores, so times are noisy." if busy else "Nothing else ran on the cores."
    header = (
        f"CPU, float32, batch 1, {args.heads} heads, head_dim {args.head_dim}, block 128, Wan radial mask "
        f"(decay {args.decay}, {args.tokens} tokens per latent frame). Times: best of {repeats}, backends "
        "interleaved; peak = extra resident memory during one call, each in a fresh process (flex after its "
        f"compile).\nMachine: {machine_info('cpu')}. {load_note}\n\n"
        "| tokens | density | ideal | backend | fwd s | fwd speedup | fwd peak MiB | fwd+bwd s | "
        "fwd+bwd speedup | fwd+bwd peak MiB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    notes = (
        '\n\n`auto` = `block_sparse_attention(backend="auto")`, the default everywhere (on CPU it resolves to '
        '`sparse`); `sparse` = `block_sparse_attention(backend="sparse")` (fused CPU flash tiles per chunk); '
        "`sparse-matmul` = the same chunk schedule with plain matmul tiles (the kernel used off-CPU); "
        "`flex` = compiled FlexAttention (no CPU backward). Speedups are against dense SDPA (`dense`)."
    )
    return header + "\n".join(rows) + notes


def run_cpu(args) -> str:
    """The real-dimension CPU table: Wan2.1 geometries, head_dim 128, bfloat16 and float32."""
    cases = [c for c in CPU_CASES if not args.cases or c[0] in args.cases][: 1 if args.quick else None]
    backends = [b for b in REAL_BACKENDS if b not in args.skip] + (["flex"] if args.flex else [])
    rows = []
    for _name, label, frames, tokens, dtypes, repeats_cap in cases:
        repeats = 1 if args.quick else min(args.repeats, repeats_cap or args.repeats)
        for dtype in dtypes:
            cfg = dict(
                device="cpu", dtype=dtype, frames=frames, tokens=tokens, heads=args.heads, head_dim=128,
                decay=args.real_decay, block=128,
            )  # fmt: skip
            seq = frames * tokens
            density = mask_density(_mask(cfg), seq)
            cells = [(b, m) for b in backends for m in ("fwd", "fwd+bwd") if not (b == "flex" and m == "fwd+bwd")]
            mem = {}
            if args.memory:
                for backend, mode in cells:
                    mem[backend, mode] = peak_memory_in_subprocess(dict(cfg, backend=backend, mode=mode))
            logger.info("%s %s: %d tokens, density %.3f, best of %d", label, dtype, seq, density, repeats)
            times = best_times(cfg, cells, repeats)
            prefix = f"{label} | {frames} x {tokens} = {seq} | {dtype} | {density:.3f} | {1 / density:.2f}x"
            rows += [_row(prefix, b, times, mem) for b in backends]
    capped = [f"{c[5]} for {c[1]}" for c in cases if c[5] and not args.quick and c[5] < args.repeats]
    capped = f" ({', '.join(capped)})" if capped else ""
    header = (
        f"CPU, batch 1, {args.heads} heads x head_dim 128 (the cost per head is that of the 12-head 1.3B and the "
        f"40-head 14B alike), block 128, Wan radial mask decay {args.real_decay}. Times: best of "
        f"{1 if args.quick else args.repeats}{capped}, backends interleaved in one process; sparse plans built "
        "before timing (once per geometry in training).\n"
        f"Machine: {machine_info('cpu')} (taken at the end of the run).\n\n"
        "| case | latent frames x tokens = seq | dtype | density | ideal | backend | fwd s | fwd speedup | "
        "fwd peak MiB | fwd+bwd s | fwd+bwd speedup | fwd+bwd peak MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    notes = (
        '\n\n`auto` = `block_sparse_attention(backend="auto")`, the default everywhere; on CPU it runs the '
        "`sparse` kernel (exact tile cover: frame-tall view tiles in place, far bands as gathered items; "
        "`src/radial_lora/attention/sparse.py`). `dense` = SDPA over all tokens (the same fused CPU flash kernel). "
        "`flex` = compiled FlexAttention, forward only on CPU. Speedups are dense time / backend time; ideal = "
        "1 / density. Peak memory columns are n/a unless the run had `--memory`."
    )
    return header + "\n".join(rows) + notes


def run_cuda(args, on_shape: Callable[[str], None] | None = None) -> str | None:
    """The CUDA table; ``on_shape`` gets the partial table after each shape (a killed run keeps what it measured)."""
    if not torch.cuda.is_available():
        logger.warning("--device cuda: CUDA is not available here; nothing measured")
        return None
    shapes = CUDA_SHAPES[:1] if args.quick else CUDA_SHAPES
    cells = [(b, m) for b in CUDA_BACKENDS for m in ("fwd", "fwd+bwd")]
    rows = []
    for label, frames, tokens, heads, head_dim in shapes:
        seq = frames * tokens
        cfg = dict(
            device="cuda",
            dtype="bfloat16",
            frames=frames,
            tokens=tokens,
            heads=heads,
            head_dim=head_dim,
            decay=args.cuda_decay,
            block=128,
        )
        density = mask_density(_mask(cfg), seq)
        mem = {}
        for backend, mode in cells:
            try:
                mem[backend, mode] = peak_memory(dict(cfg, backend=backend, mode=mode))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        times = best_times(cfg, cells, args.repeats)
        prefix = f"{label} | {seq} | {density:.3f} | {1 / density:.2f}x"
        rows += [_row(prefix, b, times, mem, time_scale=1e3) + _goal(b, density, times) for b in CUDA_BACKENDS]
        if on_shape is not None and len(rows) < len(shapes) * len(CUDA_BACKENDS):
            done = len(rows) // len(CUDA_BACKENDS)
            on_shape(_cuda_table(args, rows) + f"\n\n(partial: {done} of {len(shapes)} shapes measured so far)")
    return _cuda_table(args, rows)


FLEX_GOAL = 0.8  # issue 17: compiled flex fwd+bwd >= 0.8 x (1 / density) x dense SDPA


def _goal(backend: str, density: float, times: dict) -> str:
    """The goal column: flex fwd+bwd speed-up >= FLEX_GOAL / density, and whether this run met it."""
    if backend != "flex":
        return " |"
    goal = FLEX_GOAL / density
    dense, flex = times.get(("dense", "fwd+bwd")), times.get(("flex", "fwd+bwd"))
    verdict = "n/a" if not dense or not flex else ("met" if dense / flex >= goal else "not met")
    return f" >= {goal:.2f}x: {verdict} |"


def _cuda_table(args, rows: list[str]) -> str:
    header = (
        f"CUDA, bfloat16, batch 1, Wan2.1 radial mask decay {args.cuda_decay}. Best of {args.repeats}; "
        "`dense` = SDPA restricted to its cuDNN and flash backends; `sparse` runs its matmul tiles here. "
        f"Goal: flex fwd+bwd >= {FLEX_GOAL} x ideal x dense.\n"
        f"Machine: {machine_info('cuda')}.\n\n"
        "| shape | tokens | density | ideal | backend | fwd ms | fwd speedup | fwd peak MiB | fwd+bwd ms | "
        "fwd+bwd speedup | fwd+bwd peak MiB | fwd+bwd goal |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU: the 480p 81-frame case, 1 repeat; CUDA: one shape")
    p.add_argument("--frames", type=int, nargs="+", help="latent frames (CPU; default 21 41 81)")
    p.add_argument("--tokens", type=int, default=256, help="toy table: tokens per latent frame")
    p.add_argument("--heads", type=int, default=2, help="attention heads (real-dimension and toy tables)")
    p.add_argument("--head-dim", type=int, default=64, help="toy table: head dimension")
    p.add_argument("--decay", type=float, default=1.0, help="toy table: mask decay factor")
    p.add_argument("--cuda-decay", type=float, default=0.2, help="mask decay factor (CUDA, Wan2.1 default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cases", nargs="*", choices=[c[0] for c in CPU_CASES], help="CPU real-dimension cases to run")
    p.add_argument("--real-decay", type=float, default=0.2, help="mask decay factor of the real-dimension cases")
    p.add_argument("--flex", action="store_true", help="CPU: add compiled flex (forward only; compiles per case)")
    p.add_argument("--memory", action="store_true", help="CPU: peak memory per cell, each in a fresh process")
    p.add_argument("--small", action="store_true", help="CPU: round 1's toy table (256 tokens, 2 x 64, float32)")
    p.add_argument("--skip", nargs="*", default=[], choices=CPU_BACKENDS, help="CPU backends to leave out")
    p.add_argument("--no-memory", action="store_true", help="toy table: skip the per-cell memory subprocesses")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(peak_memory(json.loads(args.worker)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.device == "cuda":
        partial = (
            None if args.no_write else (lambda b: update_section(args.results, "attention-cuda", "## Attention", b))
        )
        body, name = run_cuda(args, partial), "attention-cuda"
    elif args.small:
        body, name = run_cpu_small(args), "attention-small"
    else:  # a --flex run has its own section: the default table stays the reproducible default run
        body, name = run_cpu(args), "attention-flex" if args.flex else "attention"
    if body is None:
        return 0
    print(body)
    if not args.no_write:
        update_section(args.results, name, "## Attention", body)
        logger.info("wrote the %s section of %s", name, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
