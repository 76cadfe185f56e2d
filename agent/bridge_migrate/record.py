"""The transaction record on disk: what was there, what was planned, how far it got.

Written atomically (temporary file, fsync, rename, fsync of the directory) and readable by root
only. A lock file keeps a second agent out while one works.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from . import serde
from .contract import Phase
from .model import HostState
from .plan import Plan
from .verify import Probe

RECORD = "transaction.json"
LOCK = "lock"


@dataclass(frozen=True)
class Transaction:
    id: str
    phase: Phase
    pid: int
    started: float  # wall clock, seconds since the epoch
    updated: float
    boot_id: str  # the kernel's boot id: a pending record from another boot was interrupted
    deadline: float  # wall clock: verification (or confirmation) must happen before this
    dead_man: str | None  # the systemd timer that rolls back at the deadline, if armed
    snapshot: HostState
    plan: Plan
    probes: tuple[Probe, ...]
    detail: str  # why the last phase change happened, for `status`

    def at(self, phase: Phase, now: float, detail: str = "") -> Transaction:
        return replace(self, phase=phase, updated=now, detail=detail)

    @property
    def from_another_boot(self) -> bool:
        return self.boot_id != current_boot_id()


def current_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


class StoreError(OSError):
    pass


class Locked(StoreError):
    pass


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / RECORD

    def load(self) -> Transaction | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return serde.load(Transaction, json.loads(text))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(errno.EINVAL, f"{self.path} is not a valid record: {e}") from e

    def save(self, tx: Transaction) -> None:
        self._ensure_directory()
        tmp = self.path.with_name(f".{RECORD}.{os.getpid()}")
        data = json.dumps(serde.to_data(tx), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's lock; Locked (naming the holder) if another agent has it."""
        self._ensure_directory()
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise Locked(
                    errno.EBUSY, f"another bridge-migrate (pid {holder}) is working"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
