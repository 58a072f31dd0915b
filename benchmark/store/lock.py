"""Cell locks: two runs (or two shards by mistake) on one store never compute the same cell at once.

A cell's lock is the file ``<results>/cells/.../fold<k>.lock`` beside its record, created with ``O_CREAT | O_EXCL``
(atomic on local filesystems and on NFS v3+). It holds the owner's host, pid, a run token and the time it was
taken; a thread of the owner touches it every ``HEARTBEAT_S`` seconds. A lock is **stale**, and is taken over, when

- its owner runs on this host and its pid is not alive (a killed process), or
- its owner runs on another host and the file was not touched for ``STALE_AFTER_S`` seconds (a dead node), or
- it carries the same run token as the caller: the same run retries the cell after its previous attempt died
  (Ray retries a task only once its worker is gone).

Take-over is serialised by a short-lived guard file, so two processes that both find a stale lock never both win.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Seconds between two touches of a held lock.
HEARTBEAT_S = 10.0
#: A lock of another host not touched for this long belongs to a dead process.
STALE_AFTER_S = 60.0
#: A take-over guard older than this was left by a process that died while taking over (it holds it < 1 s).
GUARD_STALE_S = 30.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # a killed child that was not reaped yet is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or garbage: judged by its age alone


def stale_reason(path: Path, owner: dict | None, token: str | None = None, now: float | None = None) -> str | None:
    """Why the lock at ``path`` (with ``owner`` read from it) may be taken over, or None while it is held."""
    if owner is None:
        return "released"
    if token is not None and owner.get("token") == token:
        return "an earlier attempt of this run"
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return None if pid_alive(owner["pid"]) else f"pid {owner['pid']} is not alive"
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return "released"
    return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_S else None


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


class LockBusy(Exception):
    """The cell is being computed by a live process (``owner`` says which)."""

    def __init__(self, path: Path, owner: dict) -> None:
        self.path, self.owner = path, owner
        super().__init__(f"{path}: held by {describe_owner(owner)}")


def describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"


@dataclass
class CellLock:
    """The lock of one cell. Use as a context manager, or :meth:`acquire` / :meth:`release`.

    Parameters
    ----------
    path : Path
        The lock file (``ResultStore.lock_path(cell)``).
    token : str, optional
        The run's token: a lock left by an earlier attempt of the same run is taken over at once.
    heartbeat_s : float
        Seconds between touches of the held lock.
    """

    path: Path
    token: str | None = None
    heartbeat_s: float = HEARTBEAT_S
    took_over: str | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def _owner_text(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def acquire(self) -> "CellLock":
        """Take the lock, taking a stale one over. Raises :class:`LockBusy` when a live owner holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock released or taken over between our steps: look again
            if _create_exclusive(self.path, self._owner_text()):
                self._start_heartbeat()
                return self
            owner = _read_owner(self.path)
            why = stale_reason(self.path, owner, self.token)
            if why is None:
                raise LockBusy(self.path, owner or {})
            if self._take_over(owner):
                self.took_over = why
                self._start_heartbeat()
                return self
        raise LockBusy(self.path, _read_owner(self.path) or {})

    def _take_over(self, stale_owner: dict | None) -> bool:
        """Replace the stale lock by ours, unless someone else replaced it first."""
        guard = self.path.with_name(self.path.name + ".takeover")
        if not _create_exclusive(guard, str(os.getpid())):
            try:
                if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            if _read_owner(self.path) != stale_owner:  # another process took it over meanwhile
                return False
            self.path.unlink(missing_ok=True)
            return _create_exclusive(self.path, self._owner_text())
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        owner = _read_owner(self.path)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "CellLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
