"""Bare DHCP clients bound to the NIC: dhclient and dhcpcd, each handed over to the bridge.

dhclient (ISC): SIGTERM ends it at once with no DHCPRELEASE and no script run (the address stays
where the takeover put it); `-r` would release, `-x` runs the script's STOP, which flushes. Its
identity is the MAC (the bridge has the NIC's) or, with `-i` and for DHCPv6, the DUID in its lease
file's `default-duid`, which the bridge's lease file gets, with the NIC's lease renamed: the new
client asks for that lease (INIT-REBOOT) instead of discovering one. Its script adds the address
on that ACK with `ip addr add`, which fails on an address already there, so the address would
keep the lifetime it had until the first renewal, and expire first if less was left than half a
lease: once the client is bound, the address gets the lease's lifetimes, as a renewal would.

dhcpcd (the dhcpcd_ part of this module), as measured in booted labs with dhcpcd 9.4 and a
dnsmasq LAN (2-minute leases, RAs, DHCPv6):

- Left alone on a NIC that becomes a port, dhcpcd drops the lease state of the moved addresses,
  rebinds on the port and puts the address there again (a duplicate of the bridge's, which
  expires unrenewed); when the rollback takes the NIC out of the bridge it tears down its routes
  and exits: the host is left without a default route.
- Its hand-over: told over its control socket `-x -p NIC` (exit, persistent) it stops without a
  RELEASE and leaves its addresses and routes in place, whatever dhcpcd.conf says about
  `persistent` (`dhcpcd -x` from the shell ignores -p: it only sends SIGTERM). Started on the
  bridge with the NIC's lease file, the same DUID file, the NIC's IAID and the NIC's route metric,
  it rebinds the same address at once (no ARP probe: the address is already there), confirms the
  DHCPv6 lease and generates the same SLAAC and link-local addresses (the bridge has the NIC's
  MAC). Measured at 100 ms: no probe lost, stopped after the batch or before it alike.
- Under systemd it runs as a transient unit of the same name, started over the system bus
  (StartTransientUnit); the rollback stops the bridge's client the same way and starts the
  original command line on the NIC in its original unit, with the lease renewed meanwhile.
- No file of dhcpcd's configuration changes: a hand-started dhcpcd has none that names the NIC,
  and nothing starts it at boot, before the move or after (`plan` says so).

Refused (nothing changed, with what to do by hand): a dhcpcd serving every interface (it would
take the bridge as soon as it appears), one a unit file starts (it would configure the NIC again
at the next boot, where nothing makes the bridge), one whose command line is unknown (dhcpcd
rewrites its process title; only its systemd unit keeps it), and one whose dhcpcd.conf has an
`interface NIC` block (those options would not follow it onto the bridge).
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jeepney import DBusAddress
from jeepney.io.blocking import DBusConnection

from ..bus import BusError, call, prop, socket_exists, system_bus
from ..model import AF_INET, HostState
from . import transient
from .files import ABSENT, FileState, read_state, write_states
from .files import FileChange as _Change

# -- dhcpcd ---------------------------------------------------------------------------------

DHCPCD_RUN = "/run/dhcpcd"  # dhcpcd 9: pid files and control sockets
DHCPCD_DB = "/var/lib/dhcpcd"  # dhcpcd 9 (Debian): leases, the DUID, the secret
DHCPCD_CONF = "/etc/dhcpcd.conf"
# A dhcpcd per address family ("-4", "-6") has its own pid file and socket, and its leases.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "": (".lease", ".lease6"),
    "-4": (".lease",),
    "-6": (".lease6",),
}
_RTPROT_RA, _RTPROT_DHCP = 9, 16  # the protocols of dhcpcd's routes
_DHCPCD_PROTOS = (_RTPROT_RA, _RTPROT_DHCP)
_DHCPCD_METRIC_BASE = 1000  # dhcpcd on Linux: 1000 + ifindex unless -m/--metric
_CONTROL_TIMEOUT = 2.0
_POLL = 0.02
# What a unit name may be (systemd's unit_name_is_valid, for the services we start).
_UNIT = re.compile(r"[A-Za-z0-9:_.\\-]{1,246}\.service")


@dataclass(frozen=True)
class DhcpcdView:
    """A dhcpcd that serves the NIC, read before the snapshot (pid 0: none was found)."""

    nic: str
    pid: int  # its main process (from its pid file)
    title: str  # its process title, e.g. "dhcpcd: eth0 [ip4] [ip6]"
    family: str  # "", "-4" or "-6": a dhcpcd per address family has its own files
    unit: str  # the systemd unit it runs in ("" if none)
    transient: bool  # the unit is transient (systemd-run): nothing starts it at boot
    unit_file_state: str  # "enabled", "static", "disabled", "transient", ... ("" if unknown)
    argv: tuple[str, ...]  # its command line from the unit's ExecStart (() if unknown)
    control: str  # its control socket ("" if none)
    leases: tuple[str, ...]  # the suffixes of its lease files that exist (".lease", ".lease6")
    conf_blocks: tuple[str, ...]  # `interface NIC` lines of dhcpcd.conf (path:line)
    why_unknown: str = ""  # why the unit could not be asked ("" if it was)
    with_systemd: bool = True  # in systemd's network namespace (where a unit it starts runs)

    @property
    def master(self) -> bool:
        """dhcpcd 9 titles its process serving every interface "dhcpcd: [manager] [ip4] [ip6]"
        ("[master]" before 9.3)."""
        return "[manager]" in self.title or "[master]" in self.title


@dataclass(frozen=True)
class DhcpcdAdoption:
    """Stop dhcpcd on the NIC without a release, start it on the bridge with the same identity;
    the inverse for the rollback. Everything the dead man needs is here."""

    nic: str
    bridge: str
    unit: str  # the same unit name on both sides
    argv_nic: tuple[str, ...]  # the original command line
    argv_bridge: tuple[str, ...]  # the same, on the bridge, identity and metric pinned
    family: str  # "", "-4", "-6"
    leases: tuple[str, ...]  # lease file suffixes to carry: ".lease", ".lease6"


class DhcpcdError(Exception):
    """A step of the hand-over failed: what, and what was left."""


# -- reading (I/O, before the snapshot) ----------------------------------------------------


def dhcpcd_read(nic: str) -> tuple[DhcpcdView, ...]:
    """The dhcpcds serving the NIC in this network namespace: those bound to it (one, or one
    per family), else one serving every interface; else a view with pid 0 (refused)."""
    bound = [_dhcpcd_view(nic, f"{nic}{family}.", family) for family in _FAMILIES]
    found = tuple(v for v in bound if v is not None)
    if found:
        return found
    master = _dhcpcd_view(nic, "", "")
    return (master,) if master is not None else (_nobody(nic),)


def _nobody(nic: str) -> DhcpcdView:
    return DhcpcdView(nic, 0, "", "", "", False, "", (), "", (), ())


def _dhcpcd_view(nic: str, stem: str, family: str) -> DhcpcdView | None:
    pid = _pidfile(Path(DHCPCD_RUN, f"{stem}pid"))
    if pid is None or not _same_netns(pid):  # a container's dhcpcd is not ours
        return None
    unit = _unit_of(pid)
    props, why = _unit_props(unit) if unit else (_UnitProps(), "it runs in no systemd unit")
    control = Path(DHCPCD_RUN, f"{stem}sock")
    leases = tuple(s for s in _FAMILIES[family] if stem and Path(DHCPCD_DB, f"{nic}{s}").exists())
    return DhcpcdView(
        nic=nic,
        pid=pid,
        title=_title(pid),
        family=family,
        unit=unit,
        transient=props.transient,
        unit_file_state=props.unit_file_state,
        argv=props.argv,
        control=str(control) if control.exists() else "",
        leases=leases,
        conf_blocks=_interface_blocks(Path(DHCPCD_CONF), nic),
        why_unknown=why,
        with_systemd=_same_netns(1),
    )


def _pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if _comm(pid) == "dhcpcd" else None  # a stale file names another process


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _same_netns(pid: int) -> bool:
    """`pid` shares our network namespace (for pid 1, systemd: a unit it starts runs in its
    namespace unless the unit says otherwise, and the transient unit of ours says nothing)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return True  # not ours to read (plan without root): counted, to be safe


def _title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _unit_of(pid: int) -> str:
    """The unit of the process's cgroup ("0::/system.slice/x.service" -> "x.service")."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        if line.startswith("0::"):
            last = line[3:].rstrip("/").rsplit("/", 1)[-1]
            return last if last.endswith((".service", ".scope")) else ""
    return ""


def _interface_blocks(conf: Path, nic: str) -> tuple[str, ...]:
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        return ()
    pattern = re.compile(rf"^\s*interface\s+{re.escape(nic)}\s*(#.*)?$")
    return tuple(
        f"{conf}:{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.match(line)
    )


# -- systemd over the system bus -------------------------------------------------------------

_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")


@dataclass(frozen=True)
class _UnitProps:
    transient: bool = False
    unit_file_state: str = ""
    argv: tuple[str, ...] = ()


def _unit_props(unit: str) -> tuple[_UnitProps, str]:
    if not socket_exists():
        return _UnitProps(), "there is no system bus to ask systemd about it"
    try:
        with system_bus() as conn:
            path = _unit_path(conn, unit)
            if path is None:
                return _UnitProps(), f"systemd does not know {unit}"
            argv: tuple[str, ...] = ()
            if unit.endswith(".service"):
                starts = prop(conn, _SYSTEMD, path, f"{_SYSTEMD}.Service", "ExecStart")
                if len(starts) == 1:  # (path, argv, ignore_errors, times..., pid, code, status)
                    argv = tuple(starts[0][1])
            return _UnitProps(
                bool(prop(conn, _SYSTEMD, path, f"{_SYSTEMD}.Unit", "Transient")),
                str(prop(conn, _SYSTEMD, path, f"{_SYSTEMD}.Unit", "UnitFileState")),
                argv,
            ), ""
    except BusError as e:
        return _UnitProps(), f"systemd could not be asked about {unit} ({e})"


def _unit_path(conn: DBusConnection, unit: str) -> str | None:
    try:
        return str(call(conn, _MANAGER, "GetUnit", "s", unit)[0])
    except BusError:
        return None  # not loaded


def _active(conn: DBusConnection, unit: str) -> str:
    path = _unit_path(conn, unit)
    if path is None:
        return "inactive"
    return str(prop(conn, _SYSTEMD, path, f"{_SYSTEMD}.Unit", "ActiveState"))


def _start_transient(conn: DBusConnection, unit: str, argv: tuple[str, ...]) -> None:
    with contextlib.suppress(BusError):  # not failed, or not loaded: nothing to reset
        call(conn, _MANAGER, "ResetFailedUnit", "s", unit)
    props = [
        ("Description", ("s", " ".join(argv))),
        ("ExecStart", ("a(sasb)", [(argv[0], list(argv), False)])),
    ]
    call(conn, _MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail", props, [])


# -- planning (pure) ------------------------------------------------------------------------


def dhcpcd_plan(view: DhcpcdView, state: HostState, bridge: str) -> DhcpcdAdoption | str:
    """The adoption, or why dhcpcd cannot be handed over (and what to do first). The view may
    come from a record: what it names is checked before anything is built from it."""
    why = _implausible(view, state) or _dhcpcd_refusal(view, bridge, state.nic.mac)
    if why:
        return why
    nic = view.nic
    argv = _on_bridge(view.argv, nic, bridge, _iaid(state.nic.mac), _metric(view.argv, state))
    return DhcpcdAdoption(
        nic=nic,
        bridge=bridge,
        unit=view.unit,
        argv_nic=view.argv,
        argv_bridge=argv,
        family=view.family,
        leases=view.leases,
    )


def _implausible(view: DhcpcdView, state: HostState) -> str:
    """Why the view is not one dhcpcd_read makes for this host ('' if it is): the adoption
    starts its command line as root and writes lease files under names built from it."""
    if view.nic != state.nic.name:
        return f"the view of dhcpcd is of {view.nic}, not {state.nic.name}"
    if view.family not in _FAMILIES:
        return f"{view.family!r} is not a dhcpcd address family option"
    if not set(view.leases) <= set(_FAMILIES[view.family]):
        return f"lease files {view.leases} are not dhcpcd's for {view.family or 'both families'}"
    stem = f"{view.nic}{view.family}." if not view.master else ""
    if view.control not in ("", f"{DHCPCD_RUN}/{stem}sock"):
        return f"{view.control} is not dhcpcd's control socket for {view.nic}"
    if view.unit and not (_UNIT.fullmatch(view.unit) or view.unit.endswith(".scope")):
        return f"{view.unit!r} is not a systemd service name"
    if view.argv and not _is_dhcpcd(view.argv):
        return f"`{' '.join(view.argv)}` is not a command line of dhcpcd"
    return ""


def _is_dhcpcd(argv: tuple[str, ...]) -> bool:
    program = PurePosixPath(argv[0])
    return (
        program.is_absolute()
        and program.name == "dhcpcd"
        and not any(c in w for w in argv for c in "\0\n")
    )


def _dhcpcd_refusal(view: DhcpcdView, bridge: str, mac: str) -> str:
    nic, line = view.nic, view.title or f"pid {view.pid}"
    by_hand = (
        f"by hand: stop it without a release (`persistent` in {DHCPCD_CONF}, then `dhcpcd -x "
        f"{nic}`), copy {DHCPCD_DB}/{nic}.lease to {bridge}.lease, and run it on {bridge} with "
        f"`--iaid {_iaid(mac)}`"
    )
    if view.pid == 0:
        return (
            f"no dhcpcd pid file under {DHCPCD_RUN} names {nic} (dhcpcd 9 keeps its files "
            f"there; an older one does not){'; ' + by_hand}"
        )
    if view.master:
        return (
            f"dhcpcd serves every interface ({line}): it would take {bridge} as soon as it "
            f"appears, with {nic}'s IAID, and configures {nic} again at every start; first add "
            f"`denyinterfaces {nic}` to {DHCPCD_CONF} and make {bridge} at boot with a manager "
            f"that can (systemd-networkd, ifupdown's bridge_ports), then let dhcpcd serve {bridge}"
        )
    if not view.unit.endswith(".service") or not view.argv:
        why = view.why_unknown or f"{view.unit} keeps no single ExecStart"
        return (
            f"the command line of dhcpcd on {nic} ({line}) is unknown: dhcpcd rewrites its "
            f"process title, and {why}; {by_hand}"
        )
    if not view.transient:
        return (
            f"{view.unit} ({view.unit_file_state or 'a unit file'}) is a unit file's: it starts "
            f"dhcpcd on {nic} again (at the next boot, where enabled), where nothing makes "
            f"{bridge}, and a unit of that name cannot be started on {bridge}; first make "
            f"{bridge} at boot with a manager that can (systemd-networkd, ifupdown's "
            f"bridge_ports) and point {view.unit} at {bridge}"
        )
    if nic not in view.argv[1:]:
        return f"the command line of dhcpcd (`{' '.join(view.argv)}`) does not name {nic}"
    if not view.with_systemd:
        return (
            f"systemd runs in another network namespace than dhcpcd on {nic}: a unit it "
            f"starts would run dhcpcd there; {by_hand}"
        )
    if not view.control:
        return (
            f"dhcpcd on {nic} ({line}) has no control socket under {DHCPCD_RUN}: it cannot be "
            f"stopped without removing its addresses (or releasing its lease); {by_hand}"
        )
    if view.conf_blocks:
        return (
            f"{', '.join(view.conf_blocks)}: `interface {nic}` options would not follow dhcpcd "
            f"onto {bridge}; first copy that block as `interface {bridge}` in {DHCPCD_CONF}"
        )
    return ""


def _iaid(mac: str) -> str:
    """dhcpcd's default IAID: the last 4 bytes of the hardware address (the bridge has the
    NIC's MAC, so this pins what it would choose anyway, whatever its IAID-conflict check)."""
    return ":".join(mac.lower().split(":")[-4:])


def _metric(argv: tuple[str, ...], state: HostState) -> int | None:
    """The metric of dhcpcd's routes on the NIC, to keep them identical on the bridge (its
    default is 1000 + ifindex, which differs there); None if the command line sets it."""
    if any(w in ("-m", "--metric") or w.startswith(("--metric=", "-m")) for w in argv[1:]):
        return None
    mine = [r.priority for r in state.routes_on(state.nic.name) if r.protocol in _DHCPCD_PROTOS]
    return mine[0] if mine else _DHCPCD_METRIC_BASE + state.nic.index


def _on_bridge(
    argv: tuple[str, ...], nic: str, bridge: str, iaid: str, metric: int | None
) -> tuple[str, ...]:
    """The NIC's command line on the bridge, with the NIC's IAID and metric unless given."""
    pinned: list[str] = []
    if not any(w == "--iaid" or w.startswith("--iaid=") for w in argv[1:]):
        pinned += ["--iaid", iaid]
    if metric is not None:
        pinned += ["--metric", str(metric)]
    rest = [bridge if w == nic else w for w in argv[1:]]
    return (argv[0], *pinned, *rest)


def dhcpcd_notes(a: DhcpcdAdoption) -> tuple[str, ...]:
    """For `plan`: what the hand-over does, and what a reboot does."""
    return (
        f"dhcpcd on {a.nic} ({a.unit}): stopped without a release, its addresses and routes "
        f"left to the move; started on {a.bridge} as `{' '.join(a.argv_bridge)}` in {a.unit}, "
        f"with {a.nic}'s lease, DUID and IAID: it rebinds the same addresses",
        f"at reboot nothing starts dhcpcd ({a.unit} is transient, as before the move): the "
        f"host comes up on the bare {a.nic} without addresses; start it by hand "
        f"(`{' '.join(a.argv_nic)}`), or make {a.bridge} and its DHCP client persistent "
        "(systemd-networkd, ifupdown)",
    )


# -- executing (side effects, bounded, idempotent) ------------------------------------------


def dhcpcd_adopt(a: DhcpcdAdoption, until: float) -> None:
    """NIC -> bridge. The dead man may find it half done: each step checks before it acts.
    The bus is connected to before dhcpcd stops: a connection opened to systemd while it reaps
    the stopped client was seen to go unanswered for seconds."""
    try:
        with system_bus() as conn:
            _stop(a.nic, a.family, until)
            _carry_leases(a.nic, a.bridge, a.leases)
            _start(conn, a.unit, a.bridge, a.family, a.argv_bridge, until)
    except BusError as e:
        raise DhcpcdError(f"dhcpcd on {a.bridge} in {a.unit}: {e}") from e


def dhcpcd_release(a: DhcpcdAdoption, until: float) -> None:
    """Before the rollback's netlink inverses: the bridge's client exits without a release,
    leaving its addresses to the inverses (left running, it would see them leave, drop its
    lease state, rebind on the bridge, and tear down and exit as the bridge goes)."""
    _stop(a.bridge, a.family, until)


def dhcpcd_readopt(a: DhcpcdAdoption, until: float) -> None:
    """bridge -> NIC, with the lease as renewed meanwhile. Also when adopt never ran (the
    bridge's client is not running, and the NIC's lease is the newer one: nothing is carried),
    and after a reboot (nothing runs: the NIC's client is started again).

    A client still on the NIC (adopt never ran: the agent died after the batch) is restarted
    too: it saw the NIC become a port, dropped its lease state and re-added the address there,
    and when the rollback takes the NIC out of the bridge it may tear its routes down and exit,
    at a moment of its own (seen 2 times in 4, after the rollback had compared)."""
    try:
        with system_bus() as conn:
            _stop(a.bridge, a.family, until)
            _carry_leases(a.bridge, a.nic, a.leases)
            for suffix in a.leases:
                with contextlib.suppress(FileNotFoundError):
                    Path(DHCPCD_DB, f"{a.bridge}{suffix}").unlink()
            _stop(a.nic, a.family, until)
            _start(conn, a.unit, a.nic, a.family, a.argv_nic, until)
    except BusError as e:
        raise DhcpcdError(f"dhcpcd on {a.nic} in {a.unit}: {e}") from e


def _running(ifname: str, family: str) -> int | None:
    return _pidfile(Path(DHCPCD_RUN, f"{ifname}{family}.pid"))


def _stop(ifname: str, family: str, until: float) -> None:
    """Exit, persistent: no RELEASE, addresses and routes stay (dhcpcd.conf notwithstanding).
    One exiting on its own (its interface gone) may have closed its socket already."""
    pid = _running(ifname, family)
    if pid is None:
        return  # not running (the rollback deleted its bridge, or it was stopped already)
    what = f"dhcpcd on {ifname} (pid {pid}) to exit"
    try:
        _control(Path(DHCPCD_RUN, f"{ifname}{family}.sock"), ["-x", "-p", ifname])
    except DhcpcdError as e:
        _wait(
            lambda: _comm(pid) != "dhcpcd", min(until, time.monotonic() + _EXITING), f"{what} ({e})"
        )
    _wait(lambda: _comm(pid) != "dhcpcd", until, what)


_EXITING = 2.0  # seconds a dhcpcd whose socket is gone has to finish exiting


def _control(path: Path, words: list[str]) -> None:
    """dhcpcd's control protocol: its argv, each word NUL-terminated, on a stream socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_CONTROL_TIMEOUT)
        try:
            s.connect(str(path))
            s.sendall(b"".join(w.encode() + b"\0" for w in ["dhcpcd", *words]))
        except OSError as e:
            raise DhcpcdError(f"dhcpcd's control socket {path}: {e}") from None


def _carry_leases(src: str, dst: str, suffixes: tuple[str, ...]) -> None:
    """Copy src's lease files to dst's names where they are newer (the adoption's copy when the
    rollback never got to run, a lease a client renewed since), atomically: dhcpcd reads them
    at start."""
    for suffix in suffixes:
        source, target = Path(DHCPCD_DB, f"{src}{suffix}"), Path(DHCPCD_DB, f"{dst}{suffix}")
        try:
            newer = source.stat().st_mtime > _mtime(target)
        except FileNotFoundError:
            continue
        if not newer:
            continue
        temp = target.with_name(f".{target.name}.bridge-migrate")
        shutil.copy2(source, temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("-inf")


def _start(
    conn: DBusConnection,
    unit: str,
    ifname: str,
    family: str,
    argv: tuple[str, ...],
    until: float,
) -> None:
    """Start dhcpcd on ifname in `unit`, unless it runs there already; wait until it is bound."""
    if _running(ifname, family) is not None:
        return
    _wait(lambda: _active(conn, unit) not in _BUSY, until, f"{unit} to stop")
    # Bound: dhcpcd rewrites the DHCPv4 lease file when the server acknowledged it, last in
    # practice (its RA routes came about 0.5 s in, its DHCPv6 Confirm about 1 s in, the DHCPv4
    # rebind about 1.7 s in). After a DHCPv6 Confirm it leaves the lease6 file as it was. The
    # file as it was before the start: a client that exited just before may have written it.
    lease = Path(DHCPCD_DB, f"{ifname}.lease")
    before = _mtime(lease)
    _start_transient(conn, unit, argv)
    control = Path(DHCPCD_RUN, f"{ifname}{family}.sock")
    _wait(control.exists, until, f"dhcpcd on {ifname} to open {control}")
    if family != "-6" and before > float("-inf"):
        _wait(lambda: _mtime(lease) > before, until, f"{lease} to be renewed")


_BUSY = ("active", "activating", "deactivating", "reloading")


def _wait(done: Callable[[], bool], until: float, what: str) -> None:
    while not done():
        if time.monotonic() > until:
            raise DhcpcdError(f"timed out waiting for {what}")
        time.sleep(_POLL)


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
    unit: str = ""  # the systemd unit it runs in ("networking.service": ifup started it)


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
    by_hand: bool = True  # not started by ifupdown: nothing starts it at boot


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
        by_hand=p.unit not in _IFUPDOWN_UNITS and not p.unit.startswith("ifup@"),
    )


_IFUPDOWN_UNITS = ("networking.service",)


def dhclient_notes(a: DhclientAdoption) -> tuple[str, ...]:
    """For `plan`: what the hand-over does, and what a reboot does to a client run by hand."""
    notes = []
    for m in a.moves:
        notes.append(
            f"dhclient -{m.family} on {a.nic}: stopped without a release (SIGTERM); started on "
            f"{a.bridge} as `{' '.join(m.bridge_argv)}` with {a.nic}'s lease and DUID in "
            f"{m.bridge_lease_file}: it asks for the same lease"
        )
        if m.by_hand:
            notes.append(
                f"at reboot nothing starts this dhclient (run by hand, as before the move): the "
                f"host comes up on the bare {a.nic} without its lease; start it by hand "
                f"(`{' '.join(m.argv)}`), or make {a.bridge} and its DHCP client persistent "
                "(ifupdown, systemd-networkd)"
            )
    return tuple(notes)


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
    from pyroute2.iproute.linux import IPRoute  # here: `plan` loads no netlink socket layer

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
        found.append(DhclientProcess(int(entry), started, argv, _dhclient_unit(entry)))
    return found


def _dhclient_unit(pid: str) -> str:
    """The unit of the process's cgroup (cgroup v2: "0::/system.slice/networking.service")."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    paths = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    units = [part for part in (paths[0] if paths else "").split("/") if part.endswith(".service")]
    return units[-1] if units else ""


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
