"""Peak memory, measured one way everywhere: CUDA's allocator peak on a GPU, the process's resident set on a
CPU (the training log's per-step number and the generation sidecars' peak)."""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def process_peak_mb(device: torch.device) -> float:
    """The run's peak so far, MiB: ``max_memory_allocated`` on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the block: CUDA ``max_memory_allocated``, else the process RSS sampled every 10 ms.

    The RSS peak includes the weights already loaded (it is the process's footprint during the run);
    without /proc the process-lifetime ``ru_maxrss`` is reported instead.
    """
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(bytes=int(torch.cuda.max_memory_allocated(device)), kind="cuda_max_memory_allocated")
        return
    if _rss_bytes() is None:
        yield out
        scale = 1 if sys.platform == "darwin" else 1024
        out.update(bytes=int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, kind="cpu_ru_maxrss")
        return
    peak = [_rss_bytes() or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        out.update(bytes=int(peak[0]), kind="cpu_rss_peak")
