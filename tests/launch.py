"""``torchrun`` launches for the multi-process tests (gloo on CPU, one torch thread per process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc ARGS``; ARGS[0] is a script path or a console script of the venv."""
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    first = args[0] if Path(args[0]).exists() else str(Path(sys.executable).with_name(args[0]))
    cmd = [str(torchrun_bin), "--nproc-per-node", str(nproc), "--master-port", str(free_port()), first, *args[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the one-process references run on one torch thread too
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun_train(config: dict, config_path: Path, *extra: str, nproc: int = 2) -> None:
    """Write ``config`` (a ``TrainConfig.to_dict()``) to ``config_path`` and run ``radial-lora train`` on it
    under torchrun; ``extra`` goes to the command (e.g. ``--resume DIR``)."""
    config_path.write_text(json.dumps(config))
    torchrun("radial-lora", "train", "--config", str(config_path), *extra, nproc=nproc)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from radial_lora.locks import FolderLock
lock = FolderLock(sys.argv[1], sys.argv[2]).acquire()
Path(sys.argv[3]).touch()
time.sleep(600)
"""


def hold_lock(folder: Path, command: str, barrier: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock as ``command`` (kill it when done); returns once it holds it
    (it touches ``barrier`` after taking the lock)."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), command, str(barrier)])
    end = time.monotonic() + 60
    while not barrier.exists():
        assert proc.poll() is None and time.monotonic() < end, "the lock holder did not start"
        time.sleep(0.01)
    return proc
