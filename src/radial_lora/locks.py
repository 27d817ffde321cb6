"""One writer per folder: ``data prepare``, ``train``, ``generate`` and ``evaluate`` hold a lock on the folder they
write for their whole run, so a second run into it (a scheduler's retry, a second terminal) stops at once
instead of interleaving its files with the first one's (a manifest listing every clip twice, two trainings'
checkpoints mixed in one folder).

Why refuse rather than wait: a job queued silently behind a running one looks hung, and whatever it was
started for (a retry, a typo'd folder) is rarely meant to run after the first anyway; the refusal names the
folder and the holder (pid, host, start time, command), so the user decides. It exits with its own status
(:data:`EXIT_BUSY`, 75: ``EX_TEMPFAIL`` of sysexits.h, "try again later"), distinct from a usage error.

How: ``fcntl.flock`` on ``FOLDER/.radial-lora.lock``. The kernel drops the lock when the process dies,
whatever kills it (SIGKILL, OOM killer, a node losing power: the lock is on the open file, not in the file),
so a crashed run never leaves a stale lock behind and no cleanup is needed; the file itself stays, holding
the last holder's description, which is only read to name a live holder. (On NFS, Linux maps flock to
NFS byte-range locks; a forked child that inherits the descriptor keeps the lock until it exits too.)

Under ``torchrun`` the processes of one job are one writer: :func:`job_lock` lets rank 0 take the lock and
shares the outcome with every rank, so each fails (or goes on) with the same line. Imports no torch (it looks
for an initialised ``torch.distributed`` only when asked), so every layer can use it, like :mod:`files`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; see FolderLock.acquire
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".radial-lora.lock"
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL: the folder is busy now, the same command may work later
# A probe (:func:`holder`) holds a shared lock for microseconds; a writer retries this long before refusing.
_GRACE_S = 1.0

_held: dict[str, list[Any]] = {}  # resolved folder -> [FolderLock, depth]: a process may nest its own lock


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (its description is not written yet)"
    return (
        f"{info.get('command', 'radial-lora')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"started {info.get('started', '?')})"
    )


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing) for one process; a context manager.

    ``command`` names the holder in a refusal (e.g. ``"radial-lora train"``)."""

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderBusy` naming the folder and its holder."""
        key = str(self.folder.resolve())
        if key in _held:  # this process holds it already (a nested step of the same run)
            _held[key][1] += 1
            self._fd = -1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        if fcntl is not None:
            deadline = time.monotonic() + _GRACE_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    info = _read_info(fd)
                    os.close(fd)
                    raise FolderBusy(
                        f"{self.folder} is in use by {_describe(info)}; one run writes a folder at a time: wait for "
                        "it to end (or stop it), or write somewhere else"
                    ) from None
                except OSError:
                    os.close(fd)
                    raise
        info = {
            "command": self.command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        _held[key] = [self, 1]
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would let two processes lock two different files)."""
        if self._fd is None:
            return
        key = str(self.folder.resolve())
        if self._fd == -1:
            _held[key][1] -= 1
            self._fd = None
            return
        _held.pop(key, None)
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # before unlocking: no later holder's description is ever cut
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(folder: str | os.PathLike[str]) -> str | None:
    """Who holds ``folder``'s lock now (a description for a message), or None when nobody does.

    Takes a shared lock for an instant to ask the kernel; a writer starting in that instant retries."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file() or str(Path(folder).resolve()) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe(_read_info(fd))
    finally:
        os.close(fd)
    return None


def _distributed() -> Any:
    """``torch.distributed`` when this process is one of an initialised process group, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


@contextmanager
def job_lock(
    folder: str | os.PathLike[str], command: str, *, setup: Callable[[], None] | None = None
) -> Iterator[None]:
    """The folder's lock for a whole job: one process, or every rank of an initialised ``torch.distributed``
    group (rank 0 holds it). ``setup`` runs on the holder right after it takes the lock (e.g. refusing, or
    moving an old run aside) before any other rank goes on; a :class:`FolderBusy` or ``ValueError`` there
    reaches every rank as the same exception and line."""
    dist = _distributed()
    lock, error = None, None
    if dist is None or dist.get_rank() == 0:
        try:
            lock = FolderLock(folder, command).acquire()
            if setup is not None:
                setup()
        except (FolderBusy, ValueError) as exc:
            error = exc
    if dist is not None:
        box = [None if error is None else (isinstance(error, FolderBusy), str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:  # another rank's: the same line here
            error = (FolderBusy if box[0][0] else ValueError)(box[0][1])
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
