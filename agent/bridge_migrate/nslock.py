"""One transaction per network namespace, whatever state directory each agent was given.

The lock is a listening socket in the abstract AF_UNIX namespace, which belongs to the network
namespace: two agents changing the same host see the same name, agents in other namespaces (lab
hosts, containers) do not. The kernel releases it when its holder dies, however it dies. A
second agent learns the holder's PID from the socket (SO_PEERCRED) and, from its command line,
which state directory, so the refusal can name the running transaction.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAME = b"\0bridge-migrate"
_UCRED = struct.Struct("=iII")  # pid, uid, gid


class Busy(Exception):
    def __init__(self, pid: int | None, state_dir: Path | None) -> None:
        super().__init__(f"pid {pid}")
        self.pid = pid
        self.state_dir = state_dir


@contextmanager
def held() -> Iterator[None]:
    """Hold this network namespace's lock; Busy if another agent does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(NAME)
        except OSError:
            raise _busy() from None
        sock.listen(8)
        yield
    finally:
        sock.close()


def _busy() -> Busy:
    pid = _holder()
    return Busy(pid, _state_dir(pid) if pid else None)


def _holder() -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(NAME)
            pid, _uid, _gid = _UCRED.unpack(
                probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            return None  # it let go meanwhile
    return int(pid) or None


def _state_dir(pid: int) -> Path | None:
    """The --state-dir the holder was started with (made absolute by its CLI)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"--state-dir":
            return Path(os.fsdecode(value))
    return None
