"""A lock that keeps a second run of a workflow out of the folders a run writes.

The lock is an ``flock`` on ``<folder>/.<workflow>.lock``, which holds who took it (pid, host, start time, command).
The kernel releases it when its process ends however it ends, so a lock left by a killed run is stale by
construction: the next run takes it over and warns, naming the old holder.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_HELD: dict[Path, RunLock] = {}


class FolderInUseError(RuntimeError):
    """Another run of the same workflow holds the folder's lock."""


def _describe(holder: dict) -> str:
    command = " ".join(holder.get("command", []))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}" + (
        f" ({command})" if command else ""
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive, non-blocking lock on ``<directory>/.<workflow>.lock`` for this process.

    Args:
        directory: the folder to protect (created if needed).
        workflow: the lock's name: runs of different workflows (training, evaluation) may share a folder.
    """

    def __init__(self, directory: str | os.PathLike, workflow: str = "run") -> None:
        self.path = Path(directory).resolve() / f".{workflow}.lock"
        self.workflow = workflow
        self._fd: int | None = None

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _open_locked(self) -> int | None:
        """A descriptor of the lock file holding the flock, or None when another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder released (and deleted) it between our open and flock
                same_file = False
            if same_file:
                return fd
            os.close(fd)

    def acquire(self) -> RunLock:
        """Takes the lock, or takes over a stale one with a warning.

        Returns:
            This lock.

        Raises:
            FolderInUseError: another live process holds it; the message names it (pid, host, start time).
        """
        if self.path in _HELD:  # this process already holds it (a second workflow run in-process)
            return _HELD[self.path]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_locked()
        if fd is None:
            raise FolderInUseError(
                f"'{self.path.parent}' is in use by another {self.workflow} run: {_describe(self._read_holder())}. "
                "Wait for it to end or give this run another output folder."
            )
        self._warn_if_taken_over(self._read_holder())
        self._write_holder(fd)
        self._fd = fd
        _HELD[self.path] = self
        atexit.register(self.release)
        return self

    def _warn_if_taken_over(self, previous: dict) -> None:
        """A holder recorded in a lock that was free: its run ended without releasing it (killed)."""
        if not previous:
            return
        same_host = previous.get("host") == socket.gethostname()
        gone = ", which no longer runs" if same_host and not _pid_alive(int(previous.get("pid", 0))) else ""
        logger.warning(
            f"Taking over the stale {self.workflow} lock of '{self.path.parent}' from {_describe(previous)}{gone}."
        )

    @staticmethod
    def _write_holder(fd: int) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": list(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Deletes the lock file and releases the lock; does nothing when not held."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        _HELD.pop(self.path, None)


def lock_folders(directories: Sequence[str | os.PathLike], workflow: str) -> list[RunLock]:
    """Locks each folder for ``workflow`` (see :class:`RunLock`); released when the process ends or by
    :func:`release_folders`. Call it first in ``initialize``, before anything is written.

    Args:
        directories: the folders the run writes (duplicates and nested repeats are fine).
        workflow: the lock's name, e.g. ``"training"``.

    Returns:
        The locks held.

    Raises:
        FolderInUseError: a folder is held by another live run of ``workflow``; names the holder.
    """
    locks = []
    for directory in dict.fromkeys(Path(d).resolve() for d in directories):
        locks.append(RunLock(directory, workflow).acquire())
    return locks


def release_folders(directories: Sequence[str | os.PathLike], workflow: str) -> None:
    """Releases the locks this process holds on ``directories`` for ``workflow``; call it in ``finalize``."""
    for directory in directories:
        held = _HELD.get(Path(directory).resolve() / f".{workflow}.lock")
        if held is not None:
            held.release()
