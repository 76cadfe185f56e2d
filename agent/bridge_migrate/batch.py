"""Send many rtnetlink requests in one sendmsg() and match every ACK to its request.

The kernel runs the messages of one buffer in order and acks each one, carrying on after a
failure (docs/kernel-facts.md): atomicity is ours to build from this per-message table.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import handover, netfilter, sysctl
from .encode import Resolve, encode, is_netlink
from .handover.files import FileError, write_states
from .plan import (
    Adopt,
    Op,
    Readopt,
    Release,
    RestoreConfig,
    RestoreFirewall,
    RewriteFirewall,
    SetMaster,
    SetSysctl,
    WriteConfig,
)

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSG_ERROR = 2
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
_HEADER = struct.Struct("=IHHII")
_BUFFER = 4 << 20  # room for the requests and ACKs of a 1000-route batch, with margin
_ACK_WAIT = 2.0  # the kernel acks inside the send; this only bounds a broken socket


@dataclass(frozen=True)
class Outcome:
    op: Op
    error: int  # 0: done; else the errno the kernel answered with
    message: str  # the kernel's extended ACK text, if it gave one

    @property
    def ok(self) -> bool:
        return self.error == 0

    def describe(self) -> str:
        if self.ok:
            return f"ok: {self.op}"
        text = f" ({self.message})" if self.message else ""
        return f"failed: {self.op}: {os.strerror(self.error)}{text}{self.hint}"

    @property
    def hint(self) -> str:
        if isinstance(self.op, SetMaster) and self.op.master and self.error == errno.EBUSY:
            return (
                f" — {self.op.dev} has a macvlan, macvtap or ipvlan device stacked on it, "
                "perhaps in a container's namespace (Docker: a macvlan network with "
                f"parent={self.op.dev}); recreate it with the bridge as parent, or attach the "
                "guest to the bridge (`bridge-migrate attach`)"
            )
        return ""


@dataclass(frozen=True)
class BatchResult:
    outcomes: tuple[Outcome, ...]
    seconds: float  # the send and the reading of every ACK

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def done(self) -> tuple[Op, ...]:
        return tuple(o.op for o in self.outcomes if o.ok)

    @property
    def failures(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)


class BatchError(OSError):
    """The batch could not be sent or its ACKs not all read: what the kernel did is unknown."""


def send_batch(
    ops: Sequence[Op], resolve: Resolve, age: float = 0.0, until: float | None = None
) -> BatchResult:
    """Run `ops` in order and return the outcome of each: every run of netlink operations as
    one buffer, a setting that only /proc/sys takes (or an nftables transaction, a manager's
    files or the manager itself) on its own where it stands. The time counted is the kernel's:
    from each send to its last ACK. `until` (monotonic) bounds a manager's adoption."""
    outcomes: list[Outcome] = []
    seconds = 0.0
    for netlink, group in itertools.groupby(ops, key=is_netlink):
        run = list(group)
        if netlink:
            sent, took = _send(run, resolve, age)
            outcomes += sent
            seconds += took
        else:
            for op in run:
                started = time.perf_counter()
                outcomes.append(_run_alone(op, until))
                seconds += time.perf_counter() - started
    return BatchResult(tuple(outcomes), seconds)


def _run_alone(op: Op, until: float | None) -> Outcome:
    """An operation that is not a netlink message: a /proc/sys write, an nftables transaction,
    a manager's files or the manager itself."""
    match op:
        case SetSysctl():
            return Outcome(op, sysctl.write(op.sysctl), "")
        case RewriteFirewall():
            return _nft_outcome(op, netfilter.apply_change(op.change))
        case RestoreFirewall():
            return _nft_outcome(op, netfilter.undo_change(op.change))
        case WriteConfig() | RestoreConfig() | Adopt() | Readopt() | Release():
            return _handover_outcome(op, until or time.monotonic() + handover.WAIT)
    raise ValueError(f"a netlink operation: {op}")


def _handover_outcome(
    op: WriteConfig | RestoreConfig | Adopt | Readopt | Release, until: float
) -> Outcome:
    try:
        match op:
            case WriteConfig():
                write_states(op.files)
            case RestoreConfig():
                write_states(f.inverse() for f in op.files)
            case Adopt():
                handover.adopt(op.adoption, until)
            case Readopt():
                handover.readopt(op.adoption, until)
            case Release():
                handover.release(op.adoption, until)
    except OSError as e:
        return Outcome(op, e.errno or errno.EIO, f"{e.filename or ''}: {e.strerror}")
    except (FileError, handover.HandoverError) as e:
        return Outcome(op, errno.EPROTO, str(e))
    return Outcome(op, 0, "")


def _nft_outcome(op: Op, result: netfilter.NftResult) -> Outcome:
    return Outcome(op, 0 if result.ok else errno.EPROTO, result.error)


def _send(ops: list[Op], resolve: Resolve, age: float) -> tuple[list[Outcome], float]:
    base = int(time.monotonic_ns() & 0x3FFFFFFF) + 1
    payload = b"".join(encode(op, base + i, resolve, age) for i, op in enumerate(ops))
    with _socket() as sock:
        started = time.perf_counter()
        sock.send(payload)
        acks = _read_acks(sock, base, len(ops))
        took = time.perf_counter() - started
    return [Outcome(op, *acks[base + i]) for i, op in enumerate(ops)], took


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        _grow_buffers(sock)
        sock.bind((0, 0))
        sock.settimeout(_ACK_WAIT)
    except OSError:
        sock.close()
        raise
    return sock


def _grow_buffers(sock: socket.socket) -> None:
    # The *FORCE variants pass the sysctl caps but need CAP_NET_ADMIN; plan-less readers lack it.
    for force, plain in ((33, socket.SO_SNDBUF), (32, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, _BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, _BUFFER)


def _read_acks(sock: socket.socket, base: int, count: int) -> dict[int, tuple[int, str]]:
    acks: dict[int, tuple[int, str]] = {}
    deadline = time.monotonic() + _ACK_WAIT
    while len(acks) < count:
        if time.monotonic() > deadline:
            raise BatchError(errno.ETIMEDOUT, f"{count - len(acks)} of {count} ACKs missing")
        try:
            data = sock.recv(_BUFFER)
        except TimeoutError as e:
            raise BatchError(errno.ETIMEDOUT, f"{count - len(acks)} of {count} ACKs missing") from e
        for seq, error, text in _parse_errors(data):
            if base <= seq < base + count:
                acks[seq] = (error, text)
    return acks


def _parse_errors(data: bytes) -> list[tuple[int, int, str]]:
    """(sequence, errno, extended ACK text) of each NLMSG_ERROR in a datagram."""
    found = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            text = ""
            if flags & NLM_F_ACK_TLVS:
                # The TLVs follow the echoed header (capped: header only, thanks to CAP_ACK).
                tlvs = data[offset + _HEADER.size + 4 + _HEADER.size : offset + length]
                text = _ext_ack_text(tlvs)
            found.append((seq, -error, text))
        offset += (length + 3) & ~3
    return found


def _ext_ack_text(tlvs: bytes) -> str:
    offset = 0
    while offset + 4 <= len(tlvs):
        length, kind = struct.unpack_from("=HH", tlvs, offset)
        if length < 4:
            break
        if kind == NLMSGERR_ATTR_MSG:
            return tlvs[offset + 4 : offset + length].rstrip(b"\0").decode(errors="replace")
        offset += (length + 3) & ~3
    return ""
