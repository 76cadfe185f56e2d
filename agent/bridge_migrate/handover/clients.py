"""Bare DHCP clients bound to the NIC: dhclient and dhcpcd, each handed over to the bridge.

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
- Under systemd it runs as a transient unit of the same name, started over D-Bus
  (StartTransientUnit); the rollback stops the bridge's client the same way and starts the
  original command line on the NIC in its original unit, with the lease renewed meanwhile.

Refused (nothing changed, with what to do by hand): a dhcpcd serving every interface (it would
take the bridge as soon as it appears), one a boot-time service starts (it would configure the NIC
again at the next boot, where nothing makes the bridge), one whose command line is unknown
(dhcpcd rewrites its process title; only its systemd unit keeps it), and one whose dhcpcd.conf
has an `interface NIC` block (those options would not follow it onto the bridge).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.bus import get_connectable_addresses
from jeepney.io.blocking import (
    DBusConnection,
    DBusConnectionBase,
    open_dbus_connection,
    prep_socket,
)

from ..model import HostState

# -- dhcpcd ---------------------------------------------------------------------------------

DHCPCD_RUN = "/run/dhcpcd"  # dhcpcd 9: pid files and control sockets
DHCPCD_DB = "/var/lib/dhcpcd"  # dhcpcd 9 (Debian): leases, the DUID, the secret
DHCPCD_CONF = "/etc/dhcpcd.conf"
_RTPROT_RA, _RTPROT_DHCP = 9, 16  # the protocols of dhcpcd's routes
_DHCPCD_METRIC_BASE = 1000  # dhcpcd on Linux: 1000 + ifindex unless -m/--metric
_CONTROL_TIMEOUT = 2.0
_POLL = 0.02
_TRANSIENT_DIR = "/run/systemd/transient/"


@dataclass(frozen=True)
class DhcpcdView:
    """A dhcpcd that serves the NIC, read before the snapshot."""

    nic: str
    pid: int  # its main process (from its pid file)
    title: str  # its process title, e.g. "dhcpcd: eth0 [ip4] [ip6]"
    family: str  # "", "-4" or "-6": a dhcpcd per address family has its own files
    unit: str  # the systemd unit it runs in ("" if none)
    transient: bool  # the unit is transient (systemd-run): nothing starts it at boot
    unit_file_state: str  # "enabled", "static", "disabled", "transient", ... ("" if unknown)
    argv: tuple[str, ...]  # its command line from the unit's ExecStart (() if unknown)
    control: str  # its control socket ("" if none)
    leases: tuple[str, ...]  # its lease files that exist (NIC.lease, NIC.lease6)
    conf_blocks: tuple[str, ...]  # `interface NIC` lines of dhcpcd.conf (path:line)
    why_unknown: str = ""  # why the unit could not be asked ("" if it was)

    @property
    def master(self) -> bool:
        return "[master]" in self.title


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
    netns_path: str = ""  # NetworkNamespacePath for the unit ("" : systemd's own namespace)


@dataclass(frozen=True)
class DhcpcdRefusal:
    reason: str
    alternative: str


class DhcpcdError(Exception):
    """A step of the hand-over failed: what, and what was left."""


# -- reading (I/O, before the snapshot) ----------------------------------------------------


def dhcpcd_read(nic: str) -> DhcpcdView | None:
    """The dhcpcd serving the NIC in this network namespace, if any: one bound to it (per family
    or not), else one serving every interface."""
    for family in ("", "-4", "-6"):
        view = _dhcpcd_view(nic, f"{nic}{family}.", family)
        if view is not None:
            return view
    return _dhcpcd_view(nic, "", "")


def _dhcpcd_view(nic: str, stem: str, family: str) -> DhcpcdView | None:
    pid = _pidfile(Path(DHCPCD_RUN, f"{stem}pid"))
    if pid is None or not _ours(pid):
        return None
    title = _title(pid)
    unit = _unit_of(pid)
    props, why = _unit_props(unit) if unit else ({}, "it runs in no systemd unit")
    control = Path(DHCPCD_RUN, f"{stem}sock")
    leases = tuple(
        s for s in (".lease", ".lease6") if Path(DHCPCD_DB, f"{nic}{s}").exists() and stem
    )
    return DhcpcdView(
        nic=nic,
        pid=pid,
        title=title,
        family=family,
        unit=unit,
        transient=bool(props.get("Transient", False)),
        unit_file_state=str(props.get("UnitFileState", "")),
        argv=tuple(props.get("argv", ())),
        control=str(control) if control.exists() else "",
        leases=leases,
        conf_blocks=_interface_blocks(Path(DHCPCD_CONF), nic),
        why_unknown=why,
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


def _ours(pid: int) -> bool:
    """In this network namespace (a container's dhcpcd is not ours to move)."""
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


# -- systemd over D-Bus ---------------------------------------------------------------------

_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")
_PROPS = "org.freedesktop.DBus.Properties"
_PRIVATE = "unix:path=/run/systemd/private"  # systemd's own socket, root only, no bus daemon
_SYSTEM_BUS = "/run/dbus/system_bus_socket"
_BUS_TIMEOUT = 5.0


class _Systemd:
    """A connection to systemd: over the system bus where its socket exists, else over
    systemd's private socket (root only, no bus daemon needed). In booted labs, new private
    connections opened just as systemd reaped a stopped dhcpcd went unanswered for 5 to 10 s
    (2 of 6 hand-overs); the system bus answered every time (12 of 12)."""

    def __init__(self) -> None:
        self.conn: DBusConnectionBase | DBusConnection
        if os.path.exists(_SYSTEM_BUS):
            self.conn = open_dbus_connection(bus="SYSTEM", auth_timeout=_BUS_TIMEOUT)
            return
        addr = next(get_connectable_addresses(_PRIVATE))
        self.conn = DBusConnectionBase(prep_socket(addr, False, timeout=_BUS_TIMEOUT))

    def __enter__(self) -> _Systemd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def call(self, where: DBusAddress, method: str, sig: str = "", *args: Any) -> Any:
        msg = new_method_call(where, method, sig or None, args)
        reply = self._send_and_get_reply(msg)
        if reply.header.message_type is MessageType.error:
            raise DhcpcdError(f"systemd {method}: {' '.join(map(str, reply.body))}")
        return reply.body

    def _send_and_get_reply(self, msg: Any) -> Any:
        if isinstance(self.conn, DBusConnection):
            return self.conn.send_and_get_reply(msg, timeout=_BUS_TIMEOUT)
        # The private socket is peer to peer: no Hello, replies matched by serial here.
        conn = self.conn
        serial = next(conn.outgoing_serial)
        data, _ = conn._serialise(msg, serial)
        conn.sock.sendall(data)
        deadline = time.monotonic() + _BUS_TIMEOUT
        while True:
            reply = conn._receive(deadline)
            if reply.header.fields.get(5) == serial:  # HeaderFields.reply_serial
                return reply

    def prop(self, path: str, interface: str, name: str) -> Any:
        where = DBusAddress(path, _SYSTEMD, _PROPS)
        return self.call(where, "Get", "ss", interface, name)[0][1]

    def unit_path(self, unit: str) -> str | None:
        try:
            return str(self.call(_MANAGER, "GetUnit", "s", unit)[0])
        except DhcpcdError:
            return None  # not loaded

    def active(self, unit: str) -> str:
        path = self.unit_path(unit)
        return (
            "inactive" if path is None else str(self.prop(path, f"{_SYSTEMD}.Unit", "ActiveState"))
        )

    def reset_failed(self, unit: str) -> None:
        with contextlib.suppress(DhcpcdError):  # not failed, or not loaded: nothing to reset
            self.call(_MANAGER, "ResetFailedUnit", "s", unit)

    def start_transient(self, unit: str, argv: tuple[str, ...], netns_path: str) -> None:
        props: list[tuple[str, tuple[str, Any]]] = [
            ("Description", ("s", " ".join(argv))),
            ("ExecStart", ("a(sasb)", [(argv[0], list(argv), False)])),
        ]
        if netns_path:
            props.append(("NetworkNamespacePath", ("s", netns_path)))
        self.call(_MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail", props, [])


def _unit_props(unit: str) -> tuple[dict[str, Any], str]:
    try:
        with _Systemd() as sd:
            path = sd.unit_path(unit)
            if path is None:
                return {}, f"systemd does not know {unit}"
            props: dict[str, Any] = {
                "Transient": sd.prop(path, f"{_SYSTEMD}.Unit", "Transient"),
                "UnitFileState": sd.prop(path, f"{_SYSTEMD}.Unit", "UnitFileState"),
            }
            if unit.endswith(".service"):
                starts = sd.prop(path, f"{_SYSTEMD}.Service", "ExecStart")
                if len(starts) == 1:  # (path, argv, ignore_errors, times..., pid, code, status)
                    props["argv"] = tuple(starts[0][1])
    except (OSError, TimeoutError, DhcpcdError) as e:
        return {}, f"systemd could not be asked about {unit} ({e})"
    return props, ""


# -- planning (pure) ------------------------------------------------------------------------


def dhcpcd_plan(
    view: DhcpcdView, state: HostState, bridge: str, netns_path: str = ""
) -> DhcpcdAdoption | DhcpcdRefusal:
    refusal = _dhcpcd_refusal(view, bridge, state.nic.mac)
    if refusal is not None:
        return refusal
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
        netns_path=netns_path,
    )


def _dhcpcd_refusal(view: DhcpcdView, bridge: str, mac: str) -> DhcpcdRefusal | None:
    nic, line = view.nic, view.title or f"pid {view.pid}"
    by_hand = (
        f"stop it without a release (`dhcpcd -x -p {nic}` sent over its control socket, or "
        f"`persistent` in dhcpcd.conf and SIGTERM), then run it on {bridge} (which takes "
        f"{nic}'s MAC, {mac}) with `--iaid {_iaid(mac)}` and {nic}'s lease file copied to "
        f"{DHCPCD_DB}/{bridge}.lease"
    )
    if view.master:
        return DhcpcdRefusal(
            f"dhcpcd serves every interface ({line}): it would take {bridge} as soon as it "
            f"appears, with {nic}'s IAID, and configures {nic} again at every start",
            f"add `denyinterfaces {nic}` to {DHCPCD_CONF}, make {bridge} at boot with a "
            f"manager that can (systemd-networkd, ifupdown's bridge_ports), and let dhcpcd "
            f"serve {bridge}",
        )
    if not view.unit.endswith(".service") or not view.argv:
        why = view.why_unknown or f"{view.unit} keeps no single ExecStart"
        return DhcpcdRefusal(
            f"the command line of dhcpcd on {nic} ({line}) is unknown: dhcpcd rewrites its "
            f"process title, and {why}",
            by_hand,
        )
    if not view.transient:
        return DhcpcdRefusal(
            f"{view.unit} ({view.unit_file_state or 'a unit file'}) starts dhcpcd on {nic} "
            f"again at the next boot, where nothing makes {bridge}",
            f"make {bridge} at boot with a manager that can (systemd-networkd, ifupdown's "
            f"bridge_ports), point {view.unit} at {bridge} (ExecStart= … {bridge}), then "
            + by_hand,
        )
    if not view.control:
        return DhcpcdRefusal(
            f"dhcpcd on {nic} ({line}) has no control socket under {DHCPCD_RUN}: it cannot be "
            "stopped without it removing its addresses (or releasing its lease)",
            by_hand,
        )
    if view.conf_blocks:
        return DhcpcdRefusal(
            f"{', '.join(view.conf_blocks)}: `interface {nic}` options would not follow "
            f"dhcpcd onto {bridge}",
            f"copy that block as `interface {bridge}` in {DHCPCD_CONF}, then " + by_hand,
        )
    return None


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


_DHCPCD_PROTOS = (_RTPROT_RA, _RTPROT_DHCP)


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


def dhcpcd_notes(a: DhcpcdAdoption) -> list[str]:
    """For `plan`: what the hand-over does, and what a reboot does."""
    return [
        f"dhcpcd on {a.nic} ({a.unit}): stopped without a release, its addresses and routes "
        f"left to the move; started on {a.bridge} as `{' '.join(a.argv_bridge)}` in {a.unit}, "
        f"with {a.nic}'s lease, DUID and IAID: it rebinds the same addresses",
        f"at reboot nothing starts dhcpcd ({a.unit} is transient, as before the move): the "
        f"host comes up on the bare {a.nic} without addresses; start it by hand "
        f"(`{' '.join(a.argv_nic)}`), or make {a.bridge} and its DHCP client persistent "
        "(systemd-networkd, ifupdown)",
    ]


# -- executing (side effects, bounded, idempotent) ------------------------------------------


def dhcpcd_adopt(a: DhcpcdAdoption, deadline: float) -> None:
    """NIC -> bridge. The dead man may find it half done: each step checks before it acts.
    systemd is connected to before dhcpcd stops: a connection opened while systemd reaps the
    stopped client was seen to go unanswered for up to 10 s."""
    with _systemd() as sd:
        _stop(a.nic, a.family, deadline)
        _carry_leases(a.nic, a.bridge, a.leases)
        _start(sd, a.unit, a.bridge, a.family, a.argv_bridge, a.netns_path, deadline)


def dhcpcd_readopt(a: DhcpcdAdoption, deadline: float) -> None:
    """bridge -> NIC, with the lease as renewed meanwhile. Also when adopt never ran."""
    with _systemd() as sd:
        _stop(a.bridge, a.family, deadline)
        _carry_leases(a.bridge, a.nic, a.leases)
        for suffix in a.leases:
            with contextlib.suppress(FileNotFoundError):
                Path(DHCPCD_DB, f"{a.bridge}{suffix}").unlink()
        _start(sd, a.unit, a.nic, a.family, a.argv_nic, a.netns_path, deadline)


def _systemd() -> _Systemd:
    try:
        return _Systemd()
    except (OSError, TimeoutError) as e:
        raise DhcpcdError(f"systemd cannot be reached over D-Bus: {e}") from None


def _running(ifname: str, family: str) -> int | None:
    return _pidfile(Path(DHCPCD_RUN, f"{ifname}{family}.pid"))


def _stop(ifname: str, family: str, deadline: float) -> None:
    """Exit, persistent: no RELEASE, addresses and routes stay (dhcpcd.conf notwithstanding)."""
    pid = _running(ifname, family)
    if pid is None:
        return  # not running (the rollback deleted its bridge, or it was stopped already)
    control = Path(DHCPCD_RUN, f"{ifname}{family}.sock")
    _control(control, ["-x", "-p", ifname])
    while _comm(pid) == "dhcpcd":
        if time.monotonic() > deadline:
            raise DhcpcdError(f"dhcpcd on {ifname} (pid {pid}) did not exit after `-x -p`")
        time.sleep(_POLL)


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
    """Copy src's lease files to dst's names (atomically: a dhcpcd reads them at start)."""
    for suffix in suffixes:
        source, target = Path(DHCPCD_DB, f"{src}{suffix}"), Path(DHCPCD_DB, f"{dst}{suffix}")
        if not source.exists():
            continue
        temp = target.with_name(f".{target.name}.bridge-migrate")
        shutil.copy2(source, temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)


def _start(
    sd: _Systemd,
    unit: str,
    ifname: str,
    family: str,
    argv: tuple[str, ...],
    netns: str,
    deadline: float,
) -> None:
    """Start dhcpcd on ifname in `unit`, unless it runs there already; wait until it is bound."""
    if _running(ifname, family) is not None:
        return
    try:
        _wait(lambda: sd.active(unit) not in _BUSY, deadline, f"{unit} to stop")
        sd.reset_failed(unit)
        sd.start_transient(unit, argv, netns)
    except TimeoutError:
        raise DhcpcdError(f"systemd did not answer about {unit} in {_BUS_TIMEOUT} s") from None
    control = Path(DHCPCD_RUN, f"{ifname}{family}.sock")
    _wait(control.exists, deadline, f"dhcpcd on {ifname} to open {control}")
    if family != "-6" and Path(DHCPCD_DB, f"{ifname}.lease").exists():
        # Bound: dhcpcd rewrites the lease file when the server acknowledged it.
        lease, started = Path(DHCPCD_DB, f"{ifname}.lease"), time.time()
        _wait(lambda: lease.stat().st_mtime >= started - 1, deadline, f"a lease on {ifname}")


_BUSY = ("active", "activating", "deactivating", "reloading")


def _wait(done: Callable[[], bool], deadline: float, what: str) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise DhcpcdError(f"timed out waiting for {what}")
        time.sleep(_POLL)
