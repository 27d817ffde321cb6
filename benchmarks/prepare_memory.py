"""Peak memory of cutting sliding clips from a long video: holding the whole decoded video vs streaming.

Why: `data prepare --clip-mode sliding/middle` used to decode the whole video into memory (a 10-minute
480x832 video is about 10 GB); it now streams, holding only max(lengths) frames. Each way runs in its own
process (peak RSS is per process), side by side on the same file.

Usage: ``python benchmarks/prepare_memory.py [--frames 1200] [--size 256]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _measure(way: str, video: Path, size: int) -> dict:
    from radial_lora.data.prepare import CutClips, cut_clips, load_resampled, resampled_frames

    if way == "whole":
        frames, _ = load_resampled(video, size, size, 16.0)
        clips = len(frames) // 17
    else:
        clips = sum(
            1 for _ in cut_clips(resampled_frames(video, size, size, 16.0), [17], "sliding", 17, None, None, CutClips())
        )
    return {"way": way, "clips": clips, "peak_rss_mb": _peak_mb()}


def _peak_mb() -> float:
    """This process's own peak RSS: VmHWM (ru_maxrss would include the parent's peak, inherited over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=1200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--way", choices=["whole", "stream"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--video", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.way:
        print(json.dumps(_measure(args.way, args.video, args.size)))
        return
    from radial_lora.data.video_io import write_video

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "long.mp4"
        frame = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
        frames = np.repeat(frame[None], args.frames, axis=0)
        frames[..., 0] = (np.arange(args.frames) % 256)[:, None, None]
        write_video(video, frames, 16.0)
        print(f"{args.frames} frames, {args.size}x{args.size}, sliding 17-frame clips; peak RSS per process:")
        for way in ("whole", "stream"):
            cmd = [sys.executable, __file__, "--way", way, "--video", str(video), "--size", str(args.size)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"  {row['way']:6s} {row['clips']} clips  {row['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
