"""systemd-networkd: the NIC's .network becomes the bridge's, the NIC's is reduced to
`Bridge=`, a .netdev makes the bridge with the NIC's MAC; then networkd reloads and adopts the
bridge the takeover made (it uses an existing netdev as it is) with the addressing it had.

A DHCP client on the bridge must present the NIC's identity to renew the NIC's lease: networkd's
client identifier is DUID-based (0xff, IAID, DUID) and the IAID derives from the interface, so
the bridge's file gets the NIC's IAID. The DUID is the machine's, the MAC is the NIC's: the rest
of the identity is the same already.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jeepney import DBusAddress
from jeepney.io.blocking import DBusConnection

from ..bus import BusError, call, system_bus
from ..model import HostState
from . import unitfile
from .files import ABSENT, FileChange, FileState, read_state
from .unitfile import Section

DIRECTORY = "/etc/systemd/network"
RUNTIME = "/run/systemd/network"  # gone at the next boot
# networkd drops "foreign" addresses and routes when it configures a link, the takeover's among
# them, and acquires them again (seconds without IPv6 while SLAAC and DHCPv6 redo their work;
# v252 also drops an IPv4 address that has a broadcast). KeepConfiguration=yes has it adopt them
# instead. In /run, it lasts until the next boot, which configures the bridge from scratch:
# until then, networkd also keeps the bridge's addresses should their lease run out.
ADOPT_DROP_IN = "bridge-migrate-adopt.conf"
_ADOPT = "# Written by bridge-migrate: adopt the takeover's addresses (until the next boot).\n"
# Where networkd looks for drop-ins of a .network file, in its order.
_DIRECTORIES = (
    DIRECTORY,
    "/run/systemd/network",
    "/usr/local/lib/systemd/network",
    "/usr/lib/systemd/network",
    "/lib/systemd/network",
)
_STATE = "/run/systemd/netif/links"  # what sd_network_link_get_*() read (sd-network)
_NAME = "org.freedesktop.network1"
_POLL = 0.05
_CONFIGURED = {"configured"}


@dataclass(frozen=True)
class NetworkdView:
    nic: str
    network_file: str  # the NIC's .network, as networkd names it
    network: FileState
    dropins: tuple[str, ...]  # drop-ins of that file (not carried: refused)
    iaid: int | None  # the IAID of the NIC's DHCP client, when one runs
    targets: tuple[tuple[str, FileState], ...]  # the bridge's would-be files, as they are


@dataclass(frozen=True)
class NetworkdAdoption:
    nic: str
    bridge: str
    network_file: str  # what networkd must configure the bridge with (adopt) ...
    nic_file: str  # ... and the NIC with (readopt)


def bridge_files(network_file: str, bridge: str) -> tuple[str, str, str]:
    """The bridge's .netdev and .network, beside the NIC's file and with its number, so they
    sort where the NIC's did among files that could also match the bridge; and the runtime
    drop-in under which networkd adopts what the takeover put on the bridge."""
    path = PurePosixPath(network_file)
    number = re.match(r"\d+-", path.name)
    prefix = number.group(0) if number else ""
    network = f"{prefix}{bridge}.network"
    return (
        f"{DIRECTORY}/{prefix}{bridge}.netdev",
        f"{DIRECTORY}/{network}",
        f"{RUNTIME}/{network}.d/{ADOPT_DROP_IN}",
    )


def read(network_file: str, nic: str, bridge: str, ifindex: int) -> NetworkdView:
    name = PurePosixPath(network_file).name
    dropins = tuple(
        str(p) for d in _DIRECTORIES for p in sorted(Path(d, f"{name}.d").glob("*.conf"))
    )
    targets = tuple((p, read_state(p)) for p in bridge_files(network_file, bridge))
    return NetworkdView(
        nic, network_file, read_state(network_file), dropins, link_iaid(ifindex), targets
    )


def link_iaid(ifindex: int) -> int | None:
    """The IAID networkd's DHCP clients use on the link (DHCPv6's, and DHCPv4's client id)."""
    try:
        text = Path(f"{_STATE}/{ifindex}").read_text()
    except OSError:
        return None
    found = re.search(r"^DHCP6_CLIENT_IAID=0x([0-9a-f]{1,8})$", text, re.MULTILINE)
    if found:
        return int(found.group(1), 16)
    lease = re.search(r"^DHCP_LEASE=(\S+)$", text, re.MULTILINE)
    try:
        leased = Path(lease.group(1)).read_text() if lease else ""
    except OSError:
        return None
    client = re.search(r"^CLIENTID=ff([0-9a-f]{8})", leased, re.MULTILINE)
    return int(client.group(1), 16) if client else None


def plan(view: NetworkdView, state: HostState, bridge: str) -> tuple[FileChange, ...] | str:
    """The files, or why networkd's configuration cannot be handed over."""
    nic = view.nic
    if PurePosixPath(view.network_file).parent != PurePosixPath(DIRECTORY):
        return (
            f"{view.network_file} is not in {DIRECTORY}: it is shipped or generated, and a "
            f"copy in {DIRECTORY} would change it for every link it matches"
        )
    if view.network.text is None:
        return f"{view.network_file} is gone since networkd read it"
    if view.dropins:
        return f"{view.network_file} has drop-ins ({', '.join(view.dropins)}), not carried"
    taken = [p for p, s in view.targets if s.exists]
    if taken:
        return f"{', '.join(taken)} exist already"
    try:
        sections = unitfile.parse(view.network.text)
    except unitfile.UnitFileError as e:
        return f"{view.network_file}: {e}"
    stacked = [k for s in unitfile.named(sections, "Network") for k, _ in s.lines if k in _STACKING]
    if stacked:
        return f"{view.network_file} already stacks {nic} ({', '.join(stacked)})"
    netdev_path, network_path, adopt_path = (p for p, _ in view.targets)
    mode = view.network.mode
    return (
        FileChange(netdev_path, ABSENT, FileState(_netdev(state, bridge), mode)),
        FileChange(network_path, ABSENT, FileState(_bridge_network(sections, view, bridge), mode)),
        FileChange(
            view.network_file, view.network, FileState(_port_network(sections, view, bridge), mode)
        ),
        FileChange(adopt_path, ABSENT, FileState(_ADOPT + "[Network]\nKeepConfiguration=yes\n")),
    )


_STACKING = {"Bridge", "Bond", "VRF", "VLAN", "MACVLAN", "MACVTAP", "IPVLAN", "VXLAN", "Tunnel"}
_HEADER = "# Written by bridge-migrate: {what}. The NIC's file before is in its record.\n"


def _netdev(state: HostState, bridge: str) -> str:
    netdev = Section(
        "NetDev", (("Name", bridge), ("Kind", "bridge"), ("MACAddress", state.nic.mac))
    )
    if state.nic.mtu != 1500:
        netdev = netdev.with_line("MTUBytes", str(state.nic.mtu))
    params = Section("Bridge", (("STP", "no"), ("ForwardDelaySec", "0")))
    return unitfile.render((netdev, params), _HEADER.format(what=f"{state.nic.name}'s bridge"))


def _bridge_network(sections: tuple[Section, ...], view: NetworkdView, bridge: str) -> str:
    """The NIC's file with the bridge's name to match, and its DHCP identity pinned."""
    out = [Section("Match", (("Name", bridge),))]
    out += [s for s in sections if s.name != "Match"]
    if view.iaid is not None:
        for name in ("DHCPv4", "DHCPv6"):
            if not any(s.values("IAID") for s in unitfile.named(out, name)):
                out = _with_line(out, name, "IAID", str(view.iaid))
    what = f"the addressing of {view.nic} ({view.network_file}), now {bridge}'s"
    return unitfile.render(out, _HEADER.format(what=what))


def _port_network(sections: tuple[Section, ...], view: NetworkdView, bridge: str) -> str:
    kept = [s for s in sections if s.name in ("Match", "Link")]
    port = Section("Network", (("Bridge", bridge),))
    return unitfile.render([*kept, port], _HEADER.format(what=f"{view.nic} is {bridge}'s port"))


def _with_line(sections: list[Section], name: str, key: str, value: str) -> list[Section]:
    if not unitfile.named(sections, name):
        return [*sections, Section(name, ((key, value),))]
    at = max(i for i, s in enumerate(sections) if s.name == name)
    return [*sections[:at], sections[at].with_line(key, value), *sections[at + 1 :]]


# -- the running daemon -------------------------------------------------------------------


def adopt(a: NetworkdAdoption, until: float) -> None:
    """Reload: networkd reads the new files and configures the bridge it finds. It takes the
    existing bridge as its netdev but counts it ready only on news of the link, which a reload
    does not bring: a change to the bridge's own setting (STP off, as it is) brings it."""
    from pyroute2.iproute.linux import IPRoute  # here: `plan` loads no netlink socket layer

    _reload(until)
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=a.bridge) or (0,)
        if not index:
            raise NetworkdError(f"{a.bridge} is gone")
        ipr.link("set", index=index, kind="bridge", br_stp_state=0)
    _wait_configured(until, a.bridge, a.network_file, a.nic)


def readopt(a: NetworkdAdoption, until: float) -> None:
    """Reload with the files restored: networkd configures the NIC again as before."""
    _reload(until)
    _wait_configured(until, a.nic, a.nic_file)


class NetworkdError(Exception):
    pass


_MANAGER = DBusAddress("/org/freedesktop/network1", _NAME, f"{_NAME}.Manager")


def _reload(until: float) -> None:
    try:
        with system_bus() as conn:
            call(conn, _MANAGER, "Reload", timeout=max(0.1, until - time.monotonic()))
    except BusError as e:
        raise NetworkdError(f"systemd-networkd: {e}") from e


def _wait_configured(until: float, link: str, network_file: str, port: str | None = None) -> None:
    """Until `link` is configured. networkd reads netlink events as they come, so a reload can
    meet its reaction to the takeover or the rollback: it may give up on a link ("failed": the
    bridge it was to join went away) or leave one configuring with a request lost. Such a link
    is configured again, a bounded number of times."""
    seen: _Missing | None = _Missing(link, "was not asked")
    nudged, since = 0, time.monotonic()
    try:
        with system_bus() as conn:
            while time.monotonic() < until:
                seen = _state(conn, link, network_file, port)
                if seen is None:
                    return
                stalled = time.monotonic() - since > _STALLED or seen.what == "is failed"
                if stalled and nudged < _NUDGES:
                    path = call(conn, _MANAGER, "GetLinkByName", "s", seen.link)[1]
                    call(conn, DBusAddress(path, _NAME, f"{_NAME}.Link"), "Reconfigure")
                    nudged, since = nudged + 1, time.monotonic()
                time.sleep(_POLL)
    except BusError as e:
        raise NetworkdError(f"systemd-networkd: {e}") from e
    raise NetworkdError(
        f"systemd-networkd did not configure {link} in time ({nudged} reconfiguration(s)): {seen}"
    )


_STALLED = 3.0  # seconds a link may stay configuring before it is configured again
_NUDGES = 3


@dataclass(frozen=True)
class _Missing:
    link: str
    what: str

    def __str__(self) -> str:
        return f"{self.link} {self.what}"


def _state(conn: DBusConnection, link: str, network_file: str, port: str | None) -> _Missing | None:
    """What is still missing: None once `link` is configured with `network_file` (and `port`
    is configured too)."""
    for name, want in ((link, network_file), *(((port, ""),) if port else ())):
        try:
            path = call(conn, _MANAGER, "GetLinkByName", "s", name)[1]
        except BusError:
            return _Missing(name, "is unknown to networkd")
        data = json.loads(call(conn, DBusAddress(path, _NAME, f"{_NAME}.Link"), "Describe")[0])
        admin = data.get("AdministrativeState")
        if want and data.get("NetworkFile") != want:
            return _Missing(name, f"is configured by {data.get('NetworkFile') or 'no file'}")
        if admin not in _CONFIGURED:
            return _Missing(name, f"is {admin}")
    return None
