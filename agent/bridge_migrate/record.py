"""The transaction record on disk: what was there, what was planned, how far it got.

One file, `record`, in the state directory:

    block 0       "bridge-migrate record 2": the format, checked before anything else is read
    blocks 1-8    status slots (phase, deadline, dead man, detail), each with a checksum and a
                  sequence number: the newest readable one is the transaction's status
    block 9 on    the transaction as it started (ids, snapshot, probes, and what its plan is
                  made from besides the snapshot: the plan itself is made again when the
                  record is read, as the agent's plans are pure), JSON

The whole file is written before the first change (temporary file, every byte, fsync, rename,
fsync of the directory): a full or read-only disk refuses the transaction instead of stopping it
half-way. A phase change then overwrites one slot in place, in blocks the file already holds, so
it needs no new space; a slot torn by a crash fails its checksum and the one before it stands.

Trust: the record drives root (it names links to delete, routes to install, a process to kill),
so it is read only from a directory that nobody but root can change. Every directory from `/`
down is opened relative to its parent without following symbolic links and must be owned by
root; the ancestors must not be writable by group or others unless they are sticky (like /tmp:
others may add entries there but not replace root's); the state directory itself not at all.
The record must be a regular file owned by root and readable by root only, and what it says is
checked against what this agent writes before it is used. The lock is a flock on the
directory itself: there is no lock file to plant.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import typing
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, assert_never

from . import deadman, handover, nslock, serde
from .contract import Phase
from .errors import Refused, UsageError
from .giveback import plan_giveback
from .model import HostState
from .plan import Direction, Plan, plan_takeover
from .preflight import check_name
from .probes import Probe

RECORD = "record"
FORMAT = 3  # 3: the plan's recipe instead of the plan (a third of the size)
MAGIC = b"bridge-migrate record"
BLOCK = 4096
SLOTS = 8
HEADER_AT = BLOCK * (1 + SLOTS)
MAX_SIZE = 16 * 1024 * 1024  # far above a host's snapshot; bounds what is read and parsed
MAX_DEPTH = 32  # the transaction nests about 8 deep
ID_SHAPE = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], as transaction.apply makes it
DEAD_MAN_LABELS = ("deadline", "confirm")
_TEMP = f".{RECORD}."
_UNDO_HINT = (
    "it was not used. To start over, move it aside (as root); to put the host back on its NIC "
    "without a record, use `bridge-migrate undo`"
)


@dataclass(frozen=True)
class Transaction:
    id: str
    phase: Phase
    pid: int
    pid_start: int  # the agent's start time (/proc/PID/stat): a reused PID is not the agent
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

    @property
    def agent_running(self) -> bool:
        """The agent that wrote this record is still alive (not just its PID, reused)."""
        return (
            self.pid > 1
            and self.pid != os.getpid()
            and not self.from_another_boot
            and process_start(self.pid) == self.pid_start
        )


@dataclass(frozen=True)
class _Status:
    """What a phase change writes: one slot."""

    id: str
    seq: int
    phase: Phase
    updated: float
    deadline: float
    dead_man: str | None
    detail: str


def current_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    return int(text.rsplit(")", 1)[1].split()[19])


def check_id(tx_id: str) -> None:
    if not ID_SHAPE.fullmatch(tx_id):
        raise UsageError(f"transaction id {tx_id!r}: expected 12 hex digits, as `status` shows")


class RecordError(Refused):
    """The state directory or the record cannot be used; the message names the path."""


class Locked(RecordError):
    pass


class Store:
    def __init__(self, directory: Path) -> None:
        if not directory.is_absolute():
            raise ValueError(f"state directory {directory} is not absolute")
        self.directory = directory
        self.path = directory / RECORD

    def load(self) -> Transaction | None:
        """The recorded transaction; None if there is none. RecordError if it cannot be
        trusted or is not one this agent wrote."""
        dirfd = self._open_directory(create=False)
        if dirfd is None:
            return None
        try:
            fd = self._open_record(dirfd, os.O_RDONLY)
            if fd is None:
                return None
            try:
                data = self._read(fd)
            finally:
                os.close(fd)
        finally:
            os.close(dirfd)
        return self._parse(data)

    def create(self, tx: Transaction) -> None:
        """Write the whole record of a new transaction (replacing the last one), before the
        first change: if it cannot be written in full, nothing has changed yet."""
        slots = [_encode_slot(_status_of(tx, 0)), *([_EMPTY_SLOT] * (SLOTS - 1))]
        header = json.dumps(_stored(tx), separators=(",", ":")).encode()
        data = b"".join([_preamble(), *slots, header])
        dirfd = self._open_directory(create=True)
        assert dirfd is not None  # created if missing
        try:
            self._remove_temporaries(dirfd)
            self._replace(dirfd, RECORD, f"{_TEMP}{tx.id}", data)
        finally:
            os.close(dirfd)

    def save(self, tx: Transaction, *, sync: bool = True) -> None:
        """Record the phase, deadline, dead man and detail of `tx`: one slot, in place.
        `sync=False` for a slot a crash may lose: one whose phase is recovered from as the
        slot before it is (verifying, after applying)."""
        dirfd = self._open_directory(create=False)
        if dirfd is None:
            raise RecordError(f"{self.directory} has gone: cannot record {tx.phase}")
        try:
            fd = self._open_record(dirfd, os.O_RDWR)
            if fd is None:
                raise RecordError(f"{self.path} has gone: cannot record {tx.phase}")
            try:
                slots = os.pread(fd, BLOCK * SLOTS, BLOCK)
                latest = _newest(self._slots(slots))
                if latest is None or latest.id != tx.id:
                    raise RecordError(f"{self.path} no longer records transaction {tx.id}")
                status = _status_of(tx, latest.seq + 1)
                _write_all(fd, _encode_slot(status), _slot_offset(status.seq))
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._cannot_write(e) from None
        finally:
            os.close(dirfd)

    def read_side_file(self, name: str) -> bytes | None:
        """Another small file of this directory (the attached guests), under the record's
        trust rules; None if there is none."""
        dirfd = self._open_directory(create=False)
        if dirfd is None:
            return None
        try:
            fd = self._open_file(dirfd, name, os.O_RDONLY)
            if fd is None:
                return None
            try:
                return self._read(fd)
            finally:
                os.close(fd)
        finally:
            os.close(dirfd)

    def write_side_file(self, name: str, data: bytes) -> None:
        """Replace file `name` whole (temporary file, fsync, rename, fsync of the directory)."""
        temp = f"{_TEMP}{name}"
        dirfd = self._open_directory(create=True)
        assert dirfd is not None  # created if missing
        try:
            with suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dirfd)
            self._replace(dirfd, name, temp, data)
        finally:
            os.close(dirfd)

    def _replace(self, dirfd: int, name: str, temp: str, data: bytes) -> None:
        """`name` replaced whole: a new temporary file written in full, fsync, rename, fsync of
        the directory; on failure the temporary file goes and RecordError names `name`."""
        try:
            fd = os.open(temp, _NEW | os.O_WRONLY, 0o600, dir_fd=dirfd)
            try:
                _write_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            os.fsync(dirfd)
        except OSError as e:
            with suppress(OSError):
                os.unlink(temp, dir_fd=dirfd)
            raise self._cannot_write(e, None if name == RECORD else self.directory / name) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's lock; Locked (naming the holder) if another agent has it."""
        dirfd = self._open_directory(create=True)
        assert dirfd is not None  # created if missing
        try:
            try:
                fcntl.flock(dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Locked(
                    f"another bridge-migrate{_holder(dirfd)} is working on {self.directory}",
                    "wait for it to finish; `bridge-migrate status` shows the transaction",
                ) from None
            try:
                with nslock.held():
                    yield
            except nslock.Busy as e:
                raise Locked(
                    f"another bridge-migrate (pid {e.pid}) is changing this network namespace"
                    f"{_running(e.state_dir)}",
                    "wait for it to finish; one transaction per network namespace",
                ) from None
        finally:
            os.close(dirfd)

    # The directory, walked from / without following symbolic links -----------------------

    def _open_directory(self, create: bool) -> int | None:
        """A descriptor of the state directory once every component passed the trust rule;
        None if it does not exist (and `create` is false)."""
        if os.geteuid() != 0:
            raise RecordError(
                f"reading the transaction record in {self.directory} needs root", "use sudo"
            )
        fd = os.open("/", _DIR)
        try:
            self._check_directory(fd, Path("/"), last=len(self.directory.parts) == 1)
            path = Path("/")
            for i, name in enumerate(self.directory.parts[1:], 2):
                path /= name
                last = i == len(self.directory.parts)
                child = self._open_child(fd, name, path, create, 0o700 if last else 0o755)
                os.close(fd)
                fd = -1
                if child is None:
                    return None
                fd = child
                self._check_directory(fd, path, last)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd

    def _open_child(
        self, parent: int, name: str, path: Path, create: bool, mode: int
    ) -> int | None:
        try:
            return os.open(name, _DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as e:
            raise self._bad_directory(parent, name, path, e) from None
        try:
            with suppress(FileExistsError):  # made meanwhile, or a symbolic link: looked at next
                os.mkdir(name, mode, dir_fd=parent)  # the umask can only take bits away
            return os.open(name, _DIR, dir_fd=parent)
        except OSError as e:
            raise self._bad_directory(parent, name, path, e) from None

    def _check_directory(self, fd: int, path: Path, last: bool) -> None:
        st = os.fstat(fd)
        if st.st_uid != 0:
            raise RecordError(
                f"{path} is owned by uid {st.st_uid}, not root: the state directory "
                f"{self.directory} cannot be trusted",
                "choose a state directory that only root can change",
            )
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (last or not st.st_mode & stat.S_ISVTX):
            raise RecordError(
                f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"the state directory {self.directory} cannot be trusted",
                f"run `chmod go-w {path}`, or choose a state directory that only root can change",
            )

    def _bad_directory(self, parent: int, name: str, path: Path, e: OSError) -> RecordError:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return RecordError(
                f"{path} is a symbolic link: the state directory and every directory above it "
                "must be real directories",
                f"give the real path (`realpath {self.directory}`)",
            )
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return RecordError(
                f"{path} is not a directory",
                "remove it, or choose another state directory (--state-dir)",
            )
        return RecordError(f"cannot open {path}: {e.strerror}", "check it, or use --state-dir")

    # The record file -----------------------------------------------------------------------

    def _open_record(self, dirfd: int, flags: int) -> int | None:
        return self._open_file(dirfd, RECORD, flags)

    def _open_file(self, dirfd: int, name: str, flags: int) -> int | None:
        try:
            # Non-blocking: a FIFO in its place must not hang the agent.
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise self._untrusted("is not a regular file", name) from None
            raise RecordError(
                f"cannot open {self.directory / name}: {e.strerror}",
                f"make {self.directory} writable, or use another --state-dir",
            ) from None
        st = os.fstat(fd)
        problem = (
            "is not a regular file"
            if not stat.S_ISREG(st.st_mode)
            else f"is owned by uid {st.st_uid}, not root"
            if st.st_uid != 0
            else f"is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            if st.st_mode & 0o077
            else ""
        )
        if problem:
            os.close(fd)
            raise self._untrusted(problem, name)
        return fd

    def _read(self, fd: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for _ in range(MAX_SIZE // _CHUNK + 2):  # bounded even if the file grows meanwhile
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SIZE:
                break
        raise self._damaged(f"larger than {MAX_SIZE} bytes")

    def _parse(self, data: bytes) -> Transaction:
        first = data[:BLOCK].split(b"\n", 1)[0].split()
        if data[: len(MAGIC)] != MAGIC or len(first) != 3 or len(data) < HEADER_AT:
            raise self._damaged("not a bridge-migrate record, or cut short")
        if first[2] != str(FORMAT).encode():
            version = first[2].decode(errors="replace")
            raise self._damaged(f"format {version!r}; this bridge-migrate reads format {FORMAT}")
        try:
            stored = _json(data[HEADER_AT:])
            recipe = serde.load(Recipe, stored["plan"])
            fields = {n: serde.from_data(_TX_HINTS[n], stored[n]) for n in _TX_HINTS if n != "plan"}
        except (ValueError, KeyError, TypeError) as e:
            raise self._damaged(f"the transaction cannot be read: {e}") from None
        try:
            plan = recipe.plan(fields["snapshot"])
        except Exception as e:  # a crafted snapshot may trip the planner anywhere: not ours
            raise self._damaged(f"its snapshot cannot be planned: {e!r}") from None
        tx = Transaction(**fields, plan=plan)
        latest = _newest(self._slots(data[BLOCK:HEADER_AT]))
        if latest is None:
            raise self._damaged("no readable status")
        if latest.id != tx.id:
            raise self._damaged(f"its status is of transaction {latest.id}, not {tx.id}")
        tx = replace(
            tx,
            phase=latest.phase,
            updated=latest.updated,
            deadline=latest.deadline,
            dead_man=latest.dead_man,
            detail=latest.detail,
        )
        problem = _implausible(tx)
        if problem:
            raise self._damaged(problem)
        return tx

    def _slots(self, data: bytes) -> list[_Status]:
        statuses = []
        for i in range(SLOTS):
            raw = data[i * BLOCK : (i + 1) * BLOCK].rstrip(b" \n")
            checksum, _, body = raw.partition(b" ")
            if not raw or checksum != b"%08x" % zlib.crc32(body):
                continue  # never written, or torn by a crash: the previous slot stands
            try:
                statuses.append(serde.load(_Status, _json(body)))
            except (ValueError, KeyError, TypeError) as e:
                raise self._damaged(f"status slot {i + 1}: {e}") from None
        return statuses

    def _remove_temporaries(self, dirfd: int) -> None:
        """Left by an agent that died while writing (we hold the lock: none is being written)."""
        for name in os.listdir(dirfd):
            if name.startswith(_TEMP):
                os.unlink(name, dir_fd=dirfd)

    def _cannot_write(self, e: OSError, path: Path | None = None) -> RecordError:
        what = f"the record {path}" if path else f"the transaction record {self.path}"
        return RecordError(
            f"cannot write {what}: {e.strerror or e}",
            f"make room in {self.directory} (or make it writable), or use another --state-dir",
        )

    def _untrusted(self, problem: str, name: str = RECORD) -> RecordError:
        return RecordError(
            f"{self.directory / name} {problem}: it was not read",
            "remove it if you did not put it there",
        )

    def _damaged(self, problem: str) -> RecordError:
        return RecordError(f"{self.path} is not a usable record: {problem}", _UNDO_HINT)


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EMPTY_SLOT = b" " * (BLOCK - 1) + b"\n"
_CHUNK = 1024 * 1024


def _preamble() -> bytes:
    line = MAGIC + b" %d" % FORMAT
    return line + b"\n" + b" " * (BLOCK - len(line) - 2) + b"\n"


def _status_of(tx: Transaction, seq: int) -> _Status:
    return _Status(tx.id, seq, tx.phase, tx.updated, tx.deadline, tx.dead_man, tx.detail)


def _slot_offset(seq: int) -> int:
    return BLOCK * (1 + seq % SLOTS)


def _encode_slot(status: _Status) -> bytes:
    """Checksum, JSON, padding: one block. A detail too long for it is cut."""
    keep = len(status.detail)
    while True:
        detail = status.detail if keep == len(status.detail) else status.detail[:keep] + "..."
        body = json.dumps(serde.to_data(replace(status, detail=detail))).encode()
        excess = len(body) + 10 - BLOCK  # checksum, space, newline
        if excess <= 0 or keep == 0:
            break
        keep = max(0, keep - excess - 3)  # strictly shorter each time
    line = b"%08x " % zlib.crc32(body) + body
    return line + b" " * (BLOCK - len(line) - 1) + b"\n"


def _newest(statuses: list[_Status]) -> _Status | None:
    return max(statuses, key=lambda s: s.seq, default=None)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until every byte is written: a short write is continued, not taken as done."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(28, os.strerror(28))  # ENOSPC: a disk that takes nothing more
        view, offset = view[written:], offset + written


def _json(data: bytes) -> Any:
    """JSON, refused before parsing if nested deeper than any record (the parser recurses)."""
    text = data.decode()
    depth = 0
    for token in re.findall(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH}")
        elif token in "]}":
            depth -= 1
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a record holds")


def _implausible(tx: Transaction) -> str:
    """Why `tx` is not a transaction this agent would have written ('' if it is)."""
    if not ID_SHAPE.fullmatch(tx.id):
        return f"transaction id {tx.id!r} is not one bridge-migrate makes"
    units = {deadman.unit_name(tx.id, label) for label in DEAD_MAN_LABELS}
    if tx.dead_man is not None and tx.dead_man not in units:
        return f"dead man {tx.dead_man!r} is not a unit bridge-migrate makes"
    try:
        for name in _device_names(tx):
            check_name("device", name)
    except UsageError as e:
        return e.message
    return ""


@dataclass(frozen=True)
class Recipe:
    """What a plan is made from besides the snapshot: the record keeps this rather than the
    plan, and the plan is made again when the record is read, so a record cannot carry a plan
    this agent would not make for its snapshot."""

    direction: Direction
    bridge: str
    detached: tuple[str, ...]
    views: tuple[handover.View, ...]

    @classmethod
    def of(cls, plan: Plan) -> Recipe:
        return cls(plan.direction, plan.bridge, plan.detached, plan.views)

    def plan(self, snapshot: HostState) -> Plan:
        match self.direction:
            case "takeover":
                return plan_takeover(snapshot, self.bridge, self.views)
            case "giveback":
                return plan_giveback(snapshot, self.bridge, self.detached)
            case _:
                assert_never(self.direction)


_TX_HINTS = typing.get_type_hints(Transaction)


def _stored(tx: Transaction) -> dict[str, Any]:
    """The transaction as the record keeps it: the plan's recipe in place of the plan."""
    data = {n: serde.to_data(getattr(tx, n)) for n in _TX_HINTS if n != "plan"}
    return {**data, "plan": serde.to_data(Recipe.of(tx.plan))}


def _device_names(tx: Transaction) -> Iterator[str]:
    s = tx.snapshot
    links = [s.nic] if s.bridge is None else [s.nic, s.bridge]
    for link in links:
        yield link.name
        if link.master is not None:
            yield link.master
    yield from (dev for dev, _ in s.addresses)
    yield from (r.dev for r in s.routes)
    yield from (n.dev for n in s.neighbours)
    yield from (tx.plan.nic, tx.plan.bridge, *tx.plan.detached)


def _running(state_dir: Path | None) -> str:
    """What the other agent is doing, as far as its record says."""
    if state_dir is None:
        return ""
    try:
        tx = Store(state_dir).load()
    except RecordError:
        tx = None
    what = f": transaction {tx.id} ({tx.plan.nic} -> {tx.plan.bridge}) is {tx.phase}" if tx else ""
    return f"{what}, recorded in {state_dir}"


def _holder(dirfd: int) -> str:
    """' (pid N)' for the process holding the directory's flock, from /proc/locks."""
    st = os.fstat(dirfd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
                return f" (pid {fields[4]})"
    return ""
