"""DHCP clients bound to the NIC (started by hand, or by ifupdown): the NIC's client is stopped
without a release and the same client is started on the bridge, with the same identity and the
lease it holds, so that it renews that lease; the way back is the same move the other way.

dhclient (ISC): SIGTERM ends it at once with no DHCPRELEASE and no script run (the address stays
where the takeover put it); `-r` would release, `-x` runs the script's STOP, which flushes. Its
identity is the MAC (the bridge has the NIC's) or, with `-i` and for DHCPv6, the DUID in its lease
file's `default-duid`, which the bridge's lease file gets, with the NIC's lease renamed: the new
client asks for that lease (INIT-REBOOT) instead of discovering one. Its script adds the address
on that ACK with `ip addr add`, which fails on an address already there, so the address would
keep the lifetime it had until the first renewal, and expire first if less was left than half a
lease: once the client is bound, the address gets the lease's lifetimes, as a renewal would.
"""

from __future__ import annotations

import calendar
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from ..model import AF_INET, HostState
from . import transient
from .files import ABSENT, FileState, read_state, write_states
from .files import FileChange as _Change

# -- dhclient -----------------------------------------------------------------------------

DHCLIENT_CONF = "/etc/dhcp/dhclient.conf"
# Debian's compiled-in paths, per family, where the command line names none.
_DHCLIENT_LEASES = {4: "/var/lib/dhcp/dhclient.leases", 6: "/var/lib/dhcp/dhclient6.leases"}
_DHCLIENT_PIDS = {4: "/run/dhclient.pid", 6: "/run/dhclient6.pid"}
# Options that take a value (dhclient(8), 4.4).
_DHCLIENT_VALUED = {
    "-p",
    "-D",
    "-s",
    "-g",
    "-cf",
    "-df",
    "-lf",
    "-pf",
    "-e",
    "-sf",
    "--dad-wait-time",
    "--prefix-len-hint",
    "--decline-wait-time",
    "--address-prefix-len",
}
_DHCLIENT_ONE_SHOT = {"-r", "-x"}  # release or stop a running client, then exit
_DHCLIENT_POLL = 0.02
_DHCLIENT_SLACK = 2  # seconds: a lifetime this close to the lease's is left alone


class DhclientError(Exception):
    pass


@dataclass(frozen=True)
class DhclientArgs:
    """What a dhclient command line means (its defaults filled in)."""

    family: int  # 4 or 6
    interfaces: tuple[str, ...]
    lease_file: str
    pid_file: str  # "" with --no-pid
    duid_file: str | None
    config_file: str
    one_shot: bool  # -r / -x: not a running client


def dhclient_args(argv: tuple[str, ...]) -> DhclientArgs | str:
    """The parsed command line, or what in it is not understood."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    interfaces: list[str] = []
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        if word in _DHCLIENT_VALUED:
            if not words:
                return f"{word} without its value"
            values[word] = words.pop(0)
        elif word.startswith("-"):
            flags.add(word)
        else:
            interfaces.append(word)
    family = 6 if "-6" in flags else 4
    return DhclientArgs(
        family=family,
        interfaces=tuple(interfaces),
        lease_file=values.get("-lf", _DHCLIENT_LEASES[family]),
        pid_file="" if "--no-pid" in flags else values.get("-pf", _DHCLIENT_PIDS[family]),
        duid_file=values.get("-df"),
        config_file=values.get("-cf", DHCLIENT_CONF),
        one_shot=bool(flags & _DHCLIENT_ONE_SHOT),
    )


def dhclient_renamed(argv: tuple[str, ...], nic: str, bridge: str) -> tuple[str, ...]:
    """The command line for `bridge`: the interface renamed, and in the files' names (ifup's
    /run/dhclient.eth0.pid, dhclient.eth0.leases); the rest as it was."""
    name = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(nic)}(?![A-Za-z0-9_])")
    out = [argv[0]]
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        if word in _DHCLIENT_VALUED and words:
            value = words.pop(0)
            out += [word, name.sub(bridge, value) if word in ("-pf", "-lf", "-df") else value]
        else:
            out.append(bridge if word == nic else word)
    return tuple(out)


# -- the lease database ---------------------------------------------------------------------


@dataclass(frozen=True)
class DhclientLease:
    """One `lease {...}` or `lease6 {...}` block of a dhclient lease file."""

    family: int
    interface: str
    text: str  # the block, as written, with its newline
    expiry: int | None  # seconds since the epoch (the latest address's, for DHCPv6)
    address: str | None  # DHCPv4: fixed-address
    prefixlen: int | None  # DHCPv4: from the subnet mask


_BLOCK_START = re.compile(r"^(lease6?)\s*\{", re.MULTILINE)
_INTERFACE = re.compile(r'^(\s*interface\s+)"([^"]*)";', re.MULTILINE)
_EXPIRE = re.compile(
    r"^\s*expire\s+(?:\d\s+(\d+/\d+/\d+ \d+:\d+:\d+)|epoch\s+(\d+));", re.MULTILINE
)
_IA_ADDRESS = re.compile(
    r"(?:iaaddr|iaprefix)\s+\S+\s*\{[^{}]*?starts\s+(\d+);[^{}]*?max-life\s+(\d+);", re.S
)


def dhclient_leases(text: str) -> tuple[DhclientLease, ...]:
    """The lease blocks in file order (a later block for the same interface is newer)."""
    found: list[DhclientLease] = []
    for start in _BLOCK_START.finditer(text):
        end = _block_end(text, start.end())
        if end is None:
            break  # cut short (a file being written): what came before is whole
        block = text[start.start() : end] + "\n"
        interface = _INTERFACE.search(block)
        if interface is None:
            continue
        family = 6 if start.group(1) == "lease6" else 4
        found.append(_lease(family, interface.group(2), block))
    return tuple(found)


def _block_end(text: str, at: int) -> int | None:
    """The index after the `}` that closes the block opened before `at` (quotes skipped)."""
    depth, quoted, escaped = 1, False, False
    for i in range(at, len(text)):
        c = text[i]
        if quoted:
            escaped, quoted = (not escaped and c == "\\"), quoted and (escaped or c != '"')
            continue
        if c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _lease(family: int, interface: str, block: str) -> DhclientLease:
    if family == 6:
        ends = [int(s) + int(life) for s, life in _IA_ADDRESS.findall(block)]
        return DhclientLease(6, interface, block, max(ends) if ends else None, None, None)
    expire = _EXPIRE.search(block)
    expiry = None
    if expire and expire.group(1):
        expiry = calendar.timegm(time.strptime(expire.group(1), "%Y/%m/%d %H:%M:%S"))
    elif expire:
        expiry = int(expire.group(2))
    address = re.search(r"^\s*fixed-address\s+([0-9.]+);", block, re.MULTILINE)
    mask = re.search(r"^\s*option subnet-mask\s+([0-9.]+);", block, re.MULTILINE)
    prefixlen = _prefixlen(mask.group(1)) if mask else None
    return DhclientLease(
        4, interface, block, expiry, address.group(1) if address else None, prefixlen
    )


def _prefixlen(mask: str) -> int | None:
    try:
        bits = "".join(f"{int(o):08b}" for o in mask.split("."))
    except ValueError:
        return None
    return bits.count("1") if "01" not in bits else None


def dhclient_latest(text: str, interface: str, family: int) -> DhclientLease | None:
    mine = [x for x in dhclient_leases(text) if x.interface == interface and x.family == family]
    return mine[-1] if mine else None


def dhclient_duid(*texts: str) -> str | None:
    """The `default-duid` line of the first text that has one."""
    for text in texts:
        found = re.search(r"^default-duid\s+\"(?:[^\"\\]|\\.)*\";$", text, re.MULTILINE)
        if found:
            return found.group(0)
    return None


def dhclient_moved_lease(
    source: str, target: str | None, nic: str, bridge: str, family: int, duid: str | None
) -> str | None:
    """The text of `bridge`'s lease file with `nic`'s latest lease as `bridge`'s: appended to
    `target` where both clients share one file, else `bridge`'s own file (the DUID first).
    None: `nic` holds no lease to carry."""
    latest = dhclient_latest(source, nic, family)
    if latest is None:
        return None
    block = _INTERFACE.sub(lambda m: f'{m.group(1)}"{bridge}";', latest.text, count=1)
    if target is not None:
        return target + ("" if target.endswith("\n") or not target else "\n") + block
    return (f"{duid}\n" if duid else "") + block


# -- what runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DhclientProcess:
    pid: int
    started: int  # its start time (clock ticks after boot): the same process, not a reused pid
    argv: tuple[str, ...]


@dataclass(frozen=True)
class DhclientView:
    nic: str
    bridge: str
    clients: tuple[DhclientProcess, ...]  # those serving the NIC
    bridge_clients: tuple[DhclientProcess, ...]  # those serving the bridge already
    files: tuple[tuple[str, FileState], ...]  # their lease, DUID and configuration files


@dataclass(frozen=True)
class DhclientMove:
    """One client (one family) moved from the NIC to the bridge."""

    family: int
    argv: tuple[str, ...]  # the NIC's client, as it ran
    bridge_argv: tuple[str, ...]
    lease_file: str
    bridge_lease_file: str
    bridge_lease_existed: bool  # else readopt removes the file adopt wrote
    duid_file: str | None


@dataclass(frozen=True)
class DhclientAdoption:
    nic: str
    bridge: str
    moves: tuple[DhclientMove, ...]


def dhclient_read(nic: str, bridge: str) -> DhclientView:
    """Every dhclient of this network namespace serving the NIC or the bridge, and its files."""
    procs = _dhclient_processes()
    mine = tuple(p for p in procs if _dhclient_serves(p.argv, nic))
    theirs = tuple(p for p in procs if _dhclient_serves(p.argv, bridge))
    paths: list[str] = []
    for p in mine:
        args = dhclient_args(p.argv)
        if isinstance(args, str):
            continue
        bridge_args = dhclient_args(dhclient_renamed(p.argv, nic, bridge))
        assert not isinstance(bridge_args, str)
        duid = [args.duid_file] if args.duid_file else []
        paths += [args.lease_file, bridge_args.lease_file, args.config_file, *duid]
    files = tuple((path, _dhclient_read_file(path)) for path in dict.fromkeys(paths))
    return DhclientView(nic, bridge, mine, theirs, files)


def _dhclient_read_file(path: str) -> FileState:
    try:
        return read_state(path)
    except (OSError, UnicodeDecodeError):
        return ABSENT  # unreadable: planned as absent, and checked again when used


def dhclient_plan(view: DhclientView, state: HostState, bridge: str) -> DhclientAdoption | str:
    """How each client moves, or why one cannot (nothing changed)."""
    nic = view.nic
    if view.bridge_clients:
        pids = ", ".join(str(p.pid) for p in view.bridge_clients)
        return f"dhclient already serves {bridge} (pid {pids})"
    files = dict(view.files)
    moves: list[DhclientMove] = []
    for p in view.clients:
        move = _dhclient_move(p, files, nic, bridge)
        if isinstance(move, str):
            return f"dhclient (pid {p.pid}): {move}"
        moves.append(move)
    families = [m.family for m in moves]
    if len(set(families)) != len(families):
        return f"more than one dhclient per family serves {nic}"
    return DhclientAdoption(nic, bridge, tuple(moves))


def _dhclient_move(
    p: DhclientProcess, files: dict[str, FileState], nic: str, bridge: str
) -> DhclientMove | str:
    args = dhclient_args(p.argv)
    if isinstance(args, str):
        return args
    if args.interfaces != (nic,):
        return f"it serves {', '.join(args.interfaces) or 'every interface'}, not {nic} alone"
    config = re.sub(r"#.*", "", files.get(args.config_file, ABSENT).text or "")
    if re.search(rf'interface\s+"{re.escape(nic)}"', config):
        return f'{args.config_file} has an `interface "{nic}"` block, not carried'
    renamed = dhclient_renamed(p.argv, nic, bridge)
    target = dhclient_args(renamed)
    assert not isinstance(target, str)
    lease = files.get(args.lease_file, ABSENT).text or ""
    duid_text = files.get(args.duid_file, ABSENT).text or "" if args.duid_file else ""
    duid_based = args.family == 6 or "-i" in p.argv
    if duid_based and dhclient_duid(lease, duid_text) is None:
        where = args.lease_file + (f" nor {args.duid_file}" if args.duid_file else "")
        return f"its DUID is not in {where}: the client on {bridge} would make another"
    return DhclientMove(
        family=args.family,
        argv=p.argv,
        bridge_argv=renamed,
        lease_file=args.lease_file,
        bridge_lease_file=target.lease_file,
        bridge_lease_existed=files.get(target.lease_file, ABSENT).exists,
        duid_file=args.duid_file,
    )


# -- the move -------------------------------------------------------------------------------


def dhclient_adopt(a: DhclientAdoption, until: float) -> None:
    """Each client: the bridge's lease file from the NIC's, the NIC's client stopped (no
    release), the bridge's started, and once it is bound, the address given the lease's time."""
    for m in a.moves:
        if _dhclient_serving(a.bridge, m.family):
            continue  # adopted already (the hand-over is idempotent)
        written = _dhclient_carry(m.lease_file, m.bridge_lease_file, a.nic, a.bridge, m, fresh=True)
        _dhclient_stop(a.nic, m.family, until)
        _dhclient_start(m.bridge_argv, a.bridge, until)
        _dhclient_refreshed(m, m.bridge_lease_file, a.bridge, written, until)


def dhclient_release(a: DhclientAdoption, until: float) -> None:
    """Before the bridge goes: its clients stopped (no release), so none of them acts on a
    bridge being taken apart."""
    for m in a.moves:
        _dhclient_stop(a.bridge, m.family, until)


def dhclient_readopt(a: DhclientAdoption, until: float) -> None:
    """The same the other way: the bridge's client stopped (no release), its newer lease back in
    the NIC's file, the NIC's client started again as it ran."""
    for m in reversed(a.moves):
        _dhclient_stop(a.bridge, m.family, until)
        written = _dhclient_carry(
            m.bridge_lease_file, m.lease_file, a.bridge, a.nic, m, fresh=False
        )
        if not m.bridge_lease_existed and m.bridge_lease_file != m.lease_file:
            write_states([_Change(m.bridge_lease_file, ABSENT, ABSENT)])
        if _dhclient_serving(a.nic, m.family):
            continue
        _dhclient_start(m.argv, a.nic, until)
        _dhclient_refreshed(m, m.lease_file, a.nic, written, until)


@dataclass(frozen=True)
class _Written:
    """What a lease file held for the interface once the lease was carried into it."""

    count: int  # lease blocks for the interface
    expiry: int | None


def _dhclient_carry(
    source: str, target: str, from_if: str, to_if: str, m: DhclientMove, *, fresh: bool
) -> _Written:
    """`from_if`'s latest lease into `to_if`'s file: `fresh`, as the file's only lease (with
    the DUID), unless both interfaces share the file; else appended, if it is the newer one."""
    source_text = _dhclient_text(source)
    target_text = _dhclient_text(target)
    shared = source == target
    have = None if fresh and not shared else dhclient_latest(target_text, to_if, m.family)
    carried = dhclient_latest(source_text, from_if, m.family)
    if carried is not None and (have is None or (carried.expiry or 0) > (have.expiry or 0)):
        duid = dhclient_duid(source_text, _dhclient_text(m.duid_file) if m.duid_file else "")
        base = None if fresh and not shared else target_text
        text = dhclient_moved_lease(source_text, base, from_if, to_if, m.family, duid)
        if text is not None:
            mode = read_state(source).mode if Path(source).exists() else 0o644
            write_states([_Change(target, ABSENT, FileState(text, mode))])
            target_text = text
    latest = dhclient_latest(target_text, to_if, m.family)
    count = sum(1 for x in dhclient_leases(target_text) if x.interface == to_if)
    return _Written(count, latest.expiry if latest else None)


def _dhclient_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _dhclient_refreshed(
    m: DhclientMove, path: str, interface: str, written: _Written, until: float
) -> None:
    """DHCPv4: once bound, the address gets the lease's lifetimes. DHCPv6: nothing to wait
    for, its script replaces the address with the lease's lifetimes (and a confirmed lease is
    not written again, so the file would not tell)."""
    if m.family == 4:
        bound = _dhclient_bound(path, interface, m.family, written, until)
        _dhclient_refresh(interface, bound)


def _dhclient_bound(
    path: str, interface: str, family: int, written: _Written, until: float
) -> DhclientLease:
    """The lease the client bound to: a lease block for the interface written after ours (a
    later expiry, or one more block)."""
    while True:
        text = _dhclient_text(path)
        latest = dhclient_latest(text, interface, family)
        count = sum(1 for x in dhclient_leases(text) if x.interface == interface)
        if latest is not None and (
            count > written.count or (latest.expiry or 0) > (written.expiry or 0)
        ):
            return latest
        if time.monotonic() >= until:
            raise DhclientError(f"dhclient on {interface} was not bound in time ({path})")
        if not _dhclient_serving(interface, family):
            raise DhclientError(f"dhclient on {interface} ended before it was bound")
        time.sleep(_DHCLIENT_POLL)


def _dhclient_refresh(interface: str, lease: DhclientLease) -> None:
    """The leased IPv4 address gets the lease's lifetimes (its client's script could not:
    the address was there already). IPv6: the script replaces, nothing to do."""
    if lease.family != 4 or lease.address is None or lease.expiry is None:
        return
    left = lease.expiry - int(time.time())
    if left <= 0:
        return
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=interface) or (0,)
        if not index:
            raise DhclientError(f"{interface} is gone")
        for msg in ipr.get_addr(index=index, family=AF_INET):
            if msg.get_attr("IFA_ADDRESS") != lease.address:
                continue
            cache = msg.get_attr("IFA_CACHEINFO")
            if cache is not None and abs(cache["ifa_valid"] - left) <= _DHCLIENT_SLACK:
                return
            # The kernel keeps label and broadcast; metric and protocol are sent as they are.
            kept = {k: msg.get_attr(k) for k in ("IFA_RT_PRIORITY", "IFA_PROTO")}
            ipr.addr(
                "replace",
                index=index,
                address=lease.address,
                prefixlen=msg["prefixlen"],
                IFA_CACHEINFO={"ifa_valid": left, "ifa_preferred": left, "cstamp": 0, "tstamp": 0},
                **{k: v for k, v in kept.items() if v is not None},
            )


def _dhclient_start(argv: tuple[str, ...], interface: str, until: float) -> None:
    """As it ran before: a client that forks once bound (ifup's) is a forking service, found by
    its pid file; one run with -d is held as it is."""
    args = dhclient_args(argv)
    assert not isinstance(args, str)
    try:
        transient.start_service(
            # one per family, named as ifup names their pid files
            f"dhclient{'6' if args.family == 6 else ''}-{interface}.service",
            argv,
            f"dhclient on {interface} (started by bridge-migrate)",
            until,
            forking=None if "-d" in argv else args.pid_file,
        )
    except transient.TransientError as e:
        raise DhclientError(str(e)) from e


def _dhclient_stop(interface: str, family: int, until: float) -> None:
    """SIGTERM: the client ends without a release and without running its script."""
    procs = _dhclient_serving(interface, family)
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    while any(_dhclient_alive(p) for p in procs):
        if time.monotonic() >= until:
            raise DhclientError(f"dhclient on {interface} did not end on SIGTERM")
        time.sleep(_DHCLIENT_POLL)


def _dhclient_serving(interface: str, family: int) -> list[DhclientProcess]:
    return [
        p
        for p in _dhclient_processes()
        if _dhclient_serves(p.argv, interface) and _dhclient_family(p.argv) == family
    ]


def _dhclient_family(argv: tuple[str, ...]) -> int | None:
    args = dhclient_args(argv)
    return None if isinstance(args, str) else args.family


def _dhclient_serves(argv: tuple[str, ...], interface: str) -> bool:
    args = dhclient_args(argv)
    return isinstance(args, DhclientArgs) and not args.one_shot and interface in args.interfaces


def _dhclient_processes() -> list[DhclientProcess]:
    """dhclient processes of this network namespace."""
    own = _dhclient_netns("self")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            started = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue  # gone, or not ours to read
        argv = tuple(raw.rstrip(b"\0").decode(errors="replace").split("\0"))
        if Path(argv[0]).name != "dhclient" or _dhclient_netns(entry) != own:
            continue
        found.append(DhclientProcess(int(entry), started, argv))
    return found


def _dhclient_netns(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _dhclient_alive(p: DhclientProcess) -> bool:
    try:
        stat = Path(f"/proc/{p.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19]) == p.started and fields[0] != "Z"
