"""One writer per folder (radial_lora.locks): a second process is refused naming the holder, a SIGKILLed holder
leaves no lock, the processes of a torchrun job share one lock."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from launch import hold_lock, torchrun
from radial_lora.locks import EXIT_BUSY, LOCK_NAME, FolderBusy, FolderLock, holder, job_lock

WORKER = Path(__file__).parent / "workers" / "job_lock.py"


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    proc = hold_lock(folder, "radial-lora data prepare", tmp_path / "held")
    try:
        expected = rf"^{folder} is in use by radial-lora data prepare \(pid {proc.pid} on {socket.gethostname()}, "
        with pytest.raises(FolderBusy, match=expected + r"started 20\d\d-\d\d-\d\dT[\d:]+[+-][\d:]+\); one run writes"):
            FolderLock(folder, "radial-lora train").acquire()
        assert holder(folder).startswith(f"radial-lora data prepare (pid {proc.pid} on ")
        assert EXIT_BUSY == 75
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid  # the file stays; the lock does not
    assert holder(folder) is None
    with FolderLock(folder, "radial-lora train"):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (folder / LOCK_NAME).read_text() == ""  # released: no holder described


def test_one_process_may_nest_its_own_lock(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "outer"), FolderLock(tmp_path, "inner"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "outer"
    with FolderLock(tmp_path, "again"):  # released by the outer one
        pass


def test_job_lock_runs_setup_once_and_passes_its_refusal_on(tmp_path: Path) -> None:
    ran = []
    with job_lock(tmp_path, "one", setup=lambda: ran.append(1)):
        assert ran == [1]
    with pytest.raises(ValueError, match="^no$"):
        with job_lock(tmp_path, "one", setup=lambda: (_ for _ in ()).throw(ValueError("no"))):
            pass
    with FolderLock(tmp_path, "after"):  # a refusing setup released the lock
        pass


@pytest.mark.slow
def test_the_processes_of_a_torchrun_job_share_one_lock(tmp_path: Path) -> None:
    folder, busy, out = tmp_path / "job", tmp_path / "busy", tmp_path / "seen"
    out.mkdir()
    with FolderLock(busy, "radial-lora evaluate"):  # this test process holds the other folder
        torchrun(str(WORKER), str(folder), str(busy), str(out), nproc=2)
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["holder"] == seen[1]["holder"] == seen[0]["pid"]  # rank 0 holds it for both
    assert (folder / "setup_ran").read_text() == f"{seen[0]['pid']}\n"  # setup ran once, on the holder
    assert seen[0]["busy"] == seen[1]["busy"]  # every rank stops with the same line
    assert seen[0]["busy"].startswith(f"{busy} is in use by radial-lora evaluate (pid {os.getpid()} on ")
    assert seen[0]["refused"] == seen[1]["refused"] == "refused by the holder's setup"
