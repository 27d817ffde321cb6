"""Run under torchrun (gloo): the processes of one job share one folder lock (``locks.job_lock``). Each rank
writes what it saw to ``OUT/rank<r>.json``: the lock holder's pid, whether setup ran once, and the lines a busy
folder and a refusing setup gave it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from radial_lora.locks import LOCK_NAME, FolderBusy, job_lock


def main() -> None:
    folder, busy, out = map(Path, sys.argv[1:4])
    dist.init_process_group("gloo")
    seen: dict = {"pid": os.getpid()}

    def setup() -> None:
        with open(folder / "setup_ran", "a") as fh:
            fh.write(f"{os.getpid()}\n")

    with job_lock(folder, "radial-lora test", setup=setup):
        dist.barrier()  # every rank inside at once: one lock for the job
        seen["holder"] = json.loads((folder / LOCK_NAME).read_text())["pid"]
        dist.barrier()
    try:
        with job_lock(busy, "radial-lora test"):
            seen["busy"] = None
    except FolderBusy as exc:
        seen["busy"] = str(exc)

    def refuse() -> None:
        raise ValueError("refused by the holder's setup")

    try:
        with job_lock(folder, "radial-lora test", setup=refuse):
            seen["refused"] = None
    except ValueError as exc:
        seen["refused"] = str(exc)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
