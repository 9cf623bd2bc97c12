"""The dev stack's state directory: who owns it, and where its parts listen.

One stack per directory: two nats-servers restoring one JetStream store would
corrupt it. The stack holds an exclusive ``flock`` on ``<state>/dev.lock``
(holding its PID) for as long as it runs; the kernel drops the lock when the
process ends, however it ends, so a stale lock cannot keep a directory busy.

Once serving, the stack writes ``<state>/stack.json`` (its PID and URLs), so
commands such as ``emailrelay dev event`` find it even on ports picked at
random (``--nats-port 0``). The file is only trusted while the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

LOCK_FILE = "dev.lock"
STACK_FILE = "stack.json"


class StateDirInUse(Exception):
    """Another stack holds the directory; ``pid`` is its process id when known."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"another emailrelay dev (PID {pid})" if pid else "another emailrelay dev"
        super().__init__(
            f"{who} is using {state_dir}: stop it, or pass --state-dir to use another directory"
        )
        self.pid = pid


class NoStackRunning(Exception):
    """No stack runs on the directory (or it has not finished starting)."""


class StateDirLock:
    """The exclusive lock on a state directory, held until :meth:`release`."""

    def __init__(self, state_dir: Path, fd: int) -> None:
        self.state_dir = state_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> Self:
        """Lock ``state_dir`` (created if missing) for this process, or raise
        :class:`StateDirInUse`."""
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateDirInUse(state_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(state_dir, fd)

    def publish(self, info: StackInfo) -> None:
        """Write ``stack.json`` (atomically: a reader never sees half of it)."""
        path = self.state_dir / STACK_FILE
        partial = path.with_suffix(".json.part")
        partial.write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
        partial.replace(path)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.state_dir / STACK_FILE).unlink(missing_ok=True)
        fd, self._fd = self._fd, None
        os.close(fd)  # drops the lock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(frozen=True)
class StackInfo:
    """Where a running stack's parts listen (``stack.json``)."""

    pid: int
    nats_url: str
    smtp_url: str
    http_url: str
    capture_dir: str
    events_subject: str
    inbox_url: str = ""


def running_stack(state_dir: Path) -> StackInfo:
    """The stack serving ``state_dir``; :class:`NoStackRunning` when there is none."""
    lock_path = state_dir / LOCK_FILE
    hint = (
        f"start one with: emailrelay dev --state-dir {state_dir} (add --nats-port 0 "
        "--smtp-port 0 --port 0 --nats-monitoring-port 0 beside another stack), "
        "or pass --server URL of the one that runs"
    )
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        raise NoStackRunning(f"no emailrelay dev has run in {state_dir} ({hint})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a stack is running
        else:
            raise NoStackRunning(f"no emailrelay dev is running in {state_dir} ({hint})")
    finally:
        os.close(fd)
    try:
        fields = json.loads((state_dir / STACK_FILE).read_text(encoding="utf-8"))
        return StackInfo(**fields)
    except (OSError, ValueError, TypeError):
        raise NoStackRunning(
            f"the emailrelay dev in {state_dir} is still starting; try again when it says Ready"
        ) from None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
