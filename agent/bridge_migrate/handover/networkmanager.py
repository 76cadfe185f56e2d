"""NetworkManager: the NIC's profile is handed to the bridge as two new keyfiles, and the running
NetworkManager *assumes* the bridge the takeover made, addresses, routes and leases as they are.

- The bridge's profile: the NIC's [ipv4], [ipv6] and [proxy] sections, with what the bridge's
  own clients would otherwise present differently pinned to what the NIC's presented: the DHCPv4
  client identifier, the DHCPv6 DUID and IAID (NetworkManager derives the IAID from the interface
  name), the route metric (a bridge's default is 425, an Ethernet NIC's 100), and for SLAAC the
  NIC's interface identifier when it is not the MAC's EUI-64 (stable-privacy hashes the
  interface name). The bridge's MAC is the NIC's, STP off.
- The NIC's port profile: its Ethernet-level sections, one autoconnect priority above every
  profile that could take the NIC, so that a boot brings the bridge up. The NIC's own profile
  is left as it was (a boot finds it outranked); rollback only removes the two new files.

Why a restart. NetworkManager 1.42 deconfigures a device whenever it starts managing it at run
time: activating a profile on the bridge it watches as "external", setting it managed, or
Reapply each flushed the bridge's addresses first (IPv4 gone 90-100 ms, IPv6 230-300 ms at a
1 ms probe rate; measured in the lab). It keeps a configuration only when it *assumes* it, which
it does at start for the profile that its device state file (/run/NetworkManager/devices/IFINDEX,
`connection-uuid=`) names, checking no more than the profile's type ("indicated"). So adopt
stops it, names the new profiles there and starts it again (no probe lost at 1 ms; ~150 ms).
A restart drops NetworkManager's checkpoints (they live in its memory), so none is taken: the
transaction's dead man is the second safety net.

The way back: NetworkManager is stopped before the netlink inverses (it holds the profiles in
memory and would make the bridge again the moment the inverses delete it), the files go, and it
starts with the NIC's state file naming the NIC's profile, which it assumes as it was.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from jeepney import DBusAddress
from jeepney.io.blocking import DBusConnection

from ..bus import DBUS, BusError, call, prop, system_bus
from ..model import AF_INET, AF_INET6, RT_TABLE_MAIN, Address, HostState
from . import unitfile
from .files import ABSENT, FileChange, FileState, read_state, write_states
from .unitfile import Section

DIRECTORY = "/etc/NetworkManager/system-connections"
DEVICES = "/run/NetworkManager/devices"  # its device state files (NMRUNDIR/devices/IFINDEX)
UNIT = "NetworkManager.service"
_NAME = "org.freedesktop.NetworkManager"
_ROOT = "/org/freedesktop/NetworkManager"
_SYSTEMD = "org.freedesktop.systemd1"
_ETHERNET = "802-3-ethernet"
_ACTIVATED = 2  # NMActiveConnectionState
_EXTERNAL = 0x80  # NMActivationStateFlags: it only watches what someone else configured
_DISCONNECTED = 30  # NMDeviceState
_MAX_PRIORITY = 999  # connection.autoconnect-priority
_POLL = 0.02
_MODE = 0o600  # NetworkManager ignores keyfiles that others can read
# The new profiles' UUIDs derive from the NIC's profile's and the names: a replan from the
# record makes the same files.
_UUIDS = uuid.UUID("8a3e9f4c-7f0b-4c57-9d3e-5b1c2f6a0e11")
_IFA_F_TEMPORARY = 0x01  # IPv6: an RFC 4941 privacy address


@dataclass(frozen=True)
class Profile:
    """A profile as NetworkManager holds it: what decides whether it competes for the NIC or
    stands on it."""

    uuid: str
    id: str
    type: str
    interface_name: str  # "" matches any device of its type
    autoconnect: bool
    priority: int
    parent: str  # the device or profile it is stacked on (VLAN parent, bridge/bond master)
    filename: str  # "" held in memory only


@dataclass(frozen=True)
class NetworkManagerView:
    nic: str
    unreadable: str  # why NetworkManager could not be asked ("" when it was)
    profile: Profile | None  # the NIC's active profile
    external: bool  # NetworkManager only watches the NIC: someone else configured it
    keyfile: FileState  # that profile's file
    profiles: tuple[Profile, ...]  # every profile it holds
    client_id: str  # what the NIC's DHCPv4 client presented ("" none)
    duid: str  # ... and its DHCPv6 client
    iaid: str  # "2b:50:67:35" as NetworkManager shows it
    vpns: tuple[str, ...]  # active VPN profiles: a restart would end them
    others: tuple[str, ...]  # other devices' active profiles ("id (type) on dev")
    unit: str  # the systemd unit it runs as ("" unknown)
    targets: tuple[tuple[str, FileState], ...]  # the new profiles' files, as they are now


@dataclass(frozen=True)
class NetworkManagerAdoption:
    nic: str
    bridge: str
    bridge_uuid: str  # assumed on the bridge (adopt) ...
    port_uuid: str  # ... and on the NIC
    nic_uuid: str  # assumed on the NIC again (readopt)


class NetworkManagerError(Exception):
    pass


def profile_files(nic: str, bridge: str) -> tuple[str, str]:
    port = _port_id(nic, bridge)
    return (f"{DIRECTORY}/{bridge}.nmconnection", f"{DIRECTORY}/{port}.nmconnection")


def _port_id(nic: str, bridge: str) -> str:
    return f"{bridge}-port-{nic}"


# -- reading (before the snapshot) ----------------------------------------------------------


def read(nic: str, bridge: str) -> NetworkManagerView:
    try:
        targets = tuple((p, read_state(p)) for p in profile_files(nic, bridge))
        with system_bus() as conn:
            return _read(conn, nic, targets)
    except BusError as e:
        return _unreadable(nic, str(e))
    except OSError as e:  # its profiles are root's (0600): `plan` as another user
        return _unreadable(nic, f"{e.filename}: {e.strerror} (as root it can be read)")


def _unreadable(nic: str, why: str) -> NetworkManagerView:
    return NetworkManagerView(nic, why, None, False, ABSENT, (), "", "", "", (), (), "", ())


def _read(
    conn: DBusConnection, nic: str, targets: tuple[tuple[str, FileState], ...]
) -> NetworkManagerView:
    device = call(conn, _nm(_ROOT, ""), "GetDeviceByIpIface", "s", nic)[0]
    listed = call(conn, _nm(f"{_ROOT}/Settings", ".Settings"), "ListConnections")[0]
    profiles = tuple(_profile(conn, p) for p in listed)
    active = _get(conn, device, ".Device", "ActiveConnection")
    profile, external, keyfile = None, False, ABSENT
    if active != "/":
        path = _get(conn, active, ".Connection.Active", "Connection")
        profile = _profile(conn, path)
        external = bool(_get(conn, active, ".Connection.Active", "StateFlags") & _EXTERNAL)
        keyfile = read_state(profile.filename) if profile.filename else ABSENT
    dhcp4 = _options(conn, _get(conn, device, ".Device", "Dhcp4Config"), ".DHCP4Config")
    dhcp6 = _options(conn, _get(conn, device, ".Device", "Dhcp6Config"), ".DHCP6Config")
    vpns, others = _other_active(conn, active)
    return NetworkManagerView(
        nic=nic,
        unreadable="",
        profile=profile,
        external=external,
        keyfile=keyfile,
        profiles=profiles,
        client_id=dhcp4.get("dhcp_client_identifier", ""),
        duid=dhcp6.get("dhcp6_client_id", ""),
        iaid=dhcp6.get("iaid", ""),
        vpns=vpns,
        others=others,
        unit=_unit_of(conn),
        targets=targets,
    )


def _nm(path: str, interface: str) -> DBusAddress:
    return DBusAddress(path, _NAME, _NAME + interface)


def _get(conn: DBusConnection, path: str, interface: str, what: str) -> Any:
    return prop(conn, _NAME, path, _NAME + interface, what)


def _profile(conn: DBusConnection, path: str) -> Profile:
    settings = call(conn, _nm(path, ".Settings.Connection"), "GetSettings")[0]
    c = _plain(settings.get("connection", {}))
    parents = [_plain(s).get("parent", "") for s in settings.values()]
    return Profile(
        uuid=str(c.get("uuid", "")),
        id=str(c.get("id", "")),
        type=str(c.get("type", "")),
        interface_name=str(c.get("interface-name", "")),
        autoconnect=bool(c.get("autoconnect", True)),
        priority=int(c.get("autoconnect-priority", 0)),
        parent=str(c.get("master") or next((p for p in parents if p), "")),
        filename=str(_get(conn, path, ".Settings.Connection", "Filename")),
    )


def _plain(setting: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    return {k: v[1] for k, v in setting.items()}  # (signature, value) pairs


def _options(conn: DBusConnection, path: str, interface: str) -> dict[str, str]:
    if path == "/":
        return {}
    return {k: str(v) for k, v in _plain(_get(conn, path, interface, "Options")).items()}


def _other_active(conn: DBusConnection, own: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The active VPN profiles, and NetworkManager's own active profiles on other devices
    (those it only watches, and the loopback, excepted): a restart would touch them all."""
    a = ".Connection.Active"
    vpns, others = [], []
    for path in _get(conn, _ROOT, "", "ActiveConnections"):
        if path == own or _get(conn, path, a, "StateFlags") & _EXTERNAL:
            continue
        name, kind = str(_get(conn, path, a, "Id")), str(_get(conn, path, a, "Type"))
        if _get(conn, path, a, "Vpn"):
            vpns.append(name)
        elif kind != "loopback":
            devices = [
                str(_get(conn, d, ".Device", "Interface")) for d in _get(conn, path, a, "Devices")
            ]
            others.append(f"{name} ({kind}) on {', '.join(devices) or 'no device'}")
    return tuple(vpns), tuple(others)


def _unit_of(conn: DBusConnection) -> str:
    """The systemd unit NetworkManager's process runs in ("" when systemd cannot say)."""
    try:
        pid = call(conn, DBUS, "GetConnectionUnixProcessID", "s", _NAME)[0]
        manager = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")
        unit = call(conn, manager, "GetUnitByPID", "u", pid)[0]
        return str(prop(conn, _SYSTEMD, unit, f"{_SYSTEMD}.Unit", "Id"))
    except BusError:
        return ""


# -- planning (pure) ------------------------------------------------------------------------

# The NIC's profile's sections: where each goes. Any other section is refused by name.
_TO_BRIDGE = ("ipv4", "ipv6", "proxy")
_TO_PORT = ("ethernet", _ETHERNET, "ethtool", "match", "link")
# Its [connection] keys: what the new profiles set themselves, what is dropped as meaningless
# for them, what goes to the bridge (layer 3) or the port (layer 2). Others are refused.
_SET = {"id", "uuid", "type", "interface-name", "autoconnect", "autoconnect-priority"}
_DROPPED = {"timestamp", "permissions", "stable-id"}  # stable-id: its products are pinned
_CONNECTION_TO_BRIDGE = {"zone", "mdns", "llmnr", "dns-over-tls", "metered", "mptcp-flags"}
_CONNECTION_TO_PORT = {"lldp", "autoconnect-retries", "wait-device-timeout"}
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEADER = "# Written by bridge-migrate: {what}. Rollback deletes it.\n"


def plan(
    view: NetworkManagerView, state: HostState, bridge: str
) -> tuple[tuple[FileChange, ...], NetworkManagerAdoption] | str:
    """The two profiles and how NetworkManager takes them, or why it cannot (nothing changed)."""
    checked = _checked(view)
    if isinstance(checked, str):
        return checked
    profile, sections = checked
    bridge_uuid, port_uuid = _new_uuids(profile, view.nic, bridge)
    why = _conflicts(view, profile, bridge, bridge_uuid, port_uuid)
    if why:
        return why
    priority = 1 + max(
        (p.priority for p in view.profiles if _competes(p, view.nic, port_uuid)), default=0
    )
    if priority > _MAX_PRIORITY:
        return (
            f"a profile for {view.nic} has autoconnect priority {_MAX_PRIORITY}: the port's "
            "cannot rank above it"
        )
    bridge_sections = _bridge_profile(view, state, bridge, bridge_uuid, sections)
    if isinstance(bridge_sections, str):
        return bridge_sections
    what = f"{view.nic}'s addressing (profile {profile.id!r}), now {bridge}'s"
    bridge_text = unitfile.render(bridge_sections, _HEADER.format(what=what))
    port_text = _port_profile(view, bridge, bridge_uuid, port_uuid, priority, sections, profile)
    (bridge_path, bridge_before), (port_path, port_before) = view.targets
    files = (
        FileChange(bridge_path, bridge_before, FileState(bridge_text, _MODE)),
        FileChange(port_path, port_before, FileState(port_text, _MODE)),
    )
    adoption = NetworkManagerAdoption(view.nic, bridge, bridge_uuid, port_uuid, profile.uuid)
    return files, adoption


def _checked(view: NetworkManagerView) -> tuple[Profile, tuple[Section, ...]] | str:
    """The NIC's profile and its keyfile's sections, if NetworkManager runs it in a way this
    hand-over can carry."""
    nic, profile = view.nic, view.profile
    if view.unreadable:
        return f"NetworkManager could not be asked: {view.unreadable}"
    if profile is None:
        return f"NetworkManager manages {nic} but has no profile active on it"
    if view.external:
        return f"NetworkManager only watches {nic}: something else configured it"
    if view.unit != UNIT:
        return (
            f"NetworkManager does not run as {UNIT} ({view.unit or 'no systemd unit found'}); "
            "it is restarted once to take the bridge over as it is"
        )
    if view.vpns:
        return (
            f"VPN connection(s) {', '.join(view.vpns)} are active: NetworkManager is restarted "
            "once to take the bridge over, which would end them"
        )
    if view.others:
        return (
            f"NetworkManager has other profiles active ({'; '.join(view.others)}): it is "
            f"restarted once to take the bridge over, and this hand-over is for a host whose "
            f"one NIC it manages"
        )
    if profile.type != _ETHERNET:
        return f"profile {profile.id!r} is of type {profile.type}: only Ethernet is handed over"
    name = PurePosixPath(profile.filename).name
    if not profile.filename.endswith(".nmconnection") or view.keyfile.text is None:
        where = profile.filename or "in NetworkManager's memory only"
        return f"profile {profile.id!r} is not a keyfile ({where})"
    if name.startswith("netplan-"):
        return f"profile {profile.id!r} is generated by netplan ({profile.filename}) at every boot"
    try:
        sections = unitfile.parse(view.keyfile.text)
    except unitfile.UnitFileError as e:
        return f"{profile.filename}: {e}"
    why = _not_carried(sections, profile.filename)
    return why or (profile, sections)


def _not_carried(sections: tuple[Section, ...], filename: str) -> str:
    for s in sections:
        if s.name not in ("connection", *_TO_BRIDGE, *_TO_PORT):
            return f"{filename}: section [{s.name}] is not carried to a bridge"
        odd = [k for k, _ in s.lines if not _KEY.fullmatch(k)]
        if odd:
            return f"{filename}: [{s.name}] key {odd[0]!r} is not one NetworkManager writes"
    carried = _SET | _DROPPED | _CONNECTION_TO_BRIDGE | _CONNECTION_TO_PORT
    for s in unitfile.named(sections, "connection"):
        other = [k for k, _ in s.lines if k not in carried]
        if other:
            return (
                f"{filename}: [connection] {other[0]}= is not carried to a bridge (the profile "
                "is a port, has secondaries, or sets what this hand-over does not know)"
            )
    return ""


def _new_uuids(profile: Profile, nic: str, bridge: str) -> tuple[str, str]:
    base = f"{profile.uuid}/{nic}/{bridge}"
    return str(uuid.uuid5(_UUIDS, base + "/bridge")), str(uuid.uuid5(_UUIDS, base + "/port"))


def _conflicts(
    view: NetworkManagerView, profile: Profile, bridge: str, bridge_uuid: str, port_uuid: str
) -> str:
    taken = [p for p, s in view.targets if s.exists]
    if taken:
        return f"{', '.join(taken)} exist already"
    names = {bridge, _port_id(view.nic, bridge)}
    for p in view.profiles:
        if p.uuid in (bridge_uuid, port_uuid) or p.id in names:
            return f"profile {p.id!r} ({p.uuid}) exists already"
        if p.interface_name == bridge:
            return f"profile {p.id!r} ({p.filename or 'in memory'}) is for {bridge} already"
        if p.parent in (view.nic, profile.uuid, profile.id):
            return (
                f"profile {p.id!r} ({p.type}) stands on {view.nic}: it would not find it as "
                f"it was; move it onto {bridge} by hand first"
            )
    return ""


def _competes(p: Profile, nic: str, port_uuid: str) -> bool:
    """Could autoconnect on the NIC at boot, against the port's profile."""
    return (
        p.autoconnect
        and p.type == _ETHERNET
        and p.interface_name in ("", nic)
        and not p.parent
        and p.uuid != port_uuid
    )


def _bridge_profile(
    view: NetworkManagerView,
    state: HostState,
    bridge: str,
    bridge_uuid: str,
    sections: tuple[Section, ...],
) -> list[Section] | str:
    """The bridge's profile, or why the NIC's addressing cannot be carried."""
    connection = [("id", bridge), ("uuid", bridge_uuid), ("type", "bridge")]
    connection += [("interface-name", bridge), *_carried(sections, _CONNECTION_TO_BRIDGE)]
    # STP off: a port forwards at once. forward-delay is not written: with STP off it does
    # not apply, and NetworkManager 1.42 gives the kernel 15 s for its 0 anyway.
    out = [
        Section("connection", tuple(connection)),
        Section("bridge", (("mac-address", state.nic.mac.upper()), ("stp", "false"))),
    ]
    out += [s for s in sections if s.name in _TO_BRIDGE]
    return _pin_ipv6(_pin_ipv4(out, view, state), view, state)


def _carried(sections: tuple[Section, ...], keys: set[str]) -> list[tuple[str, str]]:
    lines = [line for s in unitfile.named(sections, "connection") for line in s.lines]
    autoconnect = [("autoconnect", v) for k, v in lines if k == "autoconnect"]
    return [*autoconnect[-1:], *((k, v) for k, v in lines if k in keys)]


def _pin_ipv4(out: list[Section], view: NetworkManagerView, state: HostState) -> list[Section]:
    if view.client_id:
        out = _with(out, "ipv4", "dhcp-client-id", view.client_id)
    return _pin_metric(out, "ipv4", _metric(state, AF_INET))


def _pin_ipv6(
    out: list[Section], view: NetworkManagerView, state: HostState
) -> list[Section] | str:
    if view.duid:
        out = _with(out, "ipv6", "dhcp-duid", view.duid)
    if view.iaid:
        out = _with(out, "ipv6", "dhcp-iaid", str(int(view.iaid.replace(":", ""), 16)))
    out = _pin_metric(out, "ipv6", _metric(state, AF_INET6))
    if _value(out, "ipv6", "method") not in ("", "auto") or _value(out, "ipv6", "token"):
        return out  # no SLAAC, or its interface identifier is pinned already
    identifiers = {_identifier(a) for a in _slaac(state)}
    if identifiers <= {_eui64(state.nic.mac)}:
        return out  # EUI-64 of the same MAC: the bridge makes the same address
    if len(identifiers) > 1:
        return (
            f"{view.nic}'s SLAAC addresses have {len(identifiers)} interface identifiers: the "
            "bridge could keep only one (ipv6.token)"
        )
    # stable-privacy hashes the interface's name: a token keeps the address the NIC had.
    out = _with(out, "ipv6", "addr-gen-mode", "eui64")
    return _with(out, "ipv6", "token", f"::{identifiers.pop()}")


def _pin_metric(out: list[Section], name: str, metric: int | None) -> list[Section]:
    if metric is None or _value(out, name, "route-metric") not in ("", "-1"):
        return out
    return _with(out, name, "route-metric", str(metric))


def _metric(state: HostState, family: int) -> int | None:
    """The metric of the NIC's routes of that family, as its manager gave them (the default
    route's first): the bridge's, by the device type, would differ."""
    routes = [
        r
        for r in state.routes_on(state.nic.name)
        if r.family == family and r.table == RT_TABLE_MAIN and r.priority
    ]
    routes.sort(key=lambda r: not r.is_default)
    return routes[0].priority if routes else None


def _slaac(state: HostState) -> list[Address]:
    return [
        a
        for a in state.addresses_on(state.nic.name)
        if a.family == AF_INET6
        and a.is_global
        and a.finite
        and a.prefixlen == 64
        and not a.flags & _IFA_F_TEMPORARY
    ]


def _identifier(a: Address) -> str:
    low = int(ipaddress.IPv6Address(a.address)) & (2**64 - 1)
    return str(ipaddress.IPv6Address(low)).removeprefix("::")


def _eui64(mac: str) -> str:
    octets = [int(x, 16) for x in mac.split(":")]
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]]
    return str(ipaddress.IPv6Address(int.from_bytes(bytes(eui), "big"))).removeprefix("::")


def _value(sections: list[Section], name: str, key: str) -> str:
    values = [v for s in unitfile.named(sections, name) for v in s.values(key)]
    return values[-1] if values else ""


def _with(sections: list[Section], name: str, key: str, value: str) -> list[Section]:
    """`key` set to `value` in the (last) section `name`, which is added if missing."""
    at = [i for i, s in enumerate(sections) if s.name == name]
    if not at:
        return [*sections, Section(name, ((key, value),))]
    s = sections[at[-1]]
    lines = (*((k, v) for k, v in s.lines if k != key), (key, value))
    return [*sections[: at[-1]], Section(name, lines), *sections[at[-1] + 1 :]]


def _port_profile(
    view: NetworkManagerView,
    bridge: str,
    bridge_uuid: str,
    port_uuid: str,
    priority: int,
    sections: tuple[Section, ...],
    profile: Profile,
) -> str:
    connection = (
        ("id", _port_id(view.nic, bridge)),
        ("uuid", port_uuid),
        ("type", "ethernet"),
        ("interface-name", view.nic),
        ("master", bridge_uuid),
        ("slave-type", "bridge"),
        ("autoconnect-priority", str(priority)),
        *_carried(sections, _CONNECTION_TO_PORT),
    )
    out = [Section("connection", connection), *(s for s in sections if s.name in _TO_PORT)]
    what = f"{view.nic} is {bridge}'s port (it outranks profile {profile.id!r} at boot)"
    return unitfile.render(out, _HEADER.format(what=what))


# -- the running daemon ---------------------------------------------------------------------


def adopt(a: NetworkManagerAdoption, until: float) -> None:
    """NetworkManager restarted to assume the bridge with its profile, the NIC as its port."""
    want = {a.bridge: a.bridge_uuid, a.nic: a.port_uuid}
    if not _settled(want):
        _restart_assuming(want, until)
    _wait_active(want, until)


def release(a: NetworkManagerAdoption, until: float) -> None:
    """Stopped: with the profiles in its memory it would make the bridge again at once."""
    _unit("StopUnit", until)


def readopt(a: NetworkManagerAdoption, until: float) -> None:
    """Started with the NIC's state file naming the NIC's profile: it assumes it as it was."""
    want = {a.nic: a.nic_uuid}
    if not _settled(want):
        _restart_assuming(want, until)
    _wait_active(want, until)


def _restart_assuming(want: dict[str, str], until: float) -> None:
    from pyroute2.iproute.linux import IPRoute  # here: `plan` loads no netlink socket layer

    _unit("StopUnit", until)
    with IPRoute() as ipr:
        for device, profile in want.items():
            (index,) = ipr.link_lookup(ifname=device) or (0,)
            if not index:
                raise NetworkManagerError(f"{device} is gone")
            _name_profile(index, profile)
    _unit("StartUnit", until)


def _name_profile(index: int, profile: str) -> None:
    """The device's state file names `profile` as the one it had active: what NetworkManager
    assumes at start. The file's other keys (and sections) are NetworkManager's, kept."""
    path = f"{DEVICES}/{index}"
    before = read_state(path)
    try:
        sections = unitfile.parse(before.text or "")
    except unitfile.UnitFileError:
        sections = ()  # not what NetworkManager writes: replaced
    out = list(sections)
    out = _with(out, "device", "managed", "true")
    out = _with(out, "device", "connection-uuid", profile)
    write_states((FileChange(path, before, FileState(unitfile.render(out), 0o644)),))


_MANAGER = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")


def _unit(method: str, until: float) -> None:
    """Stop or start NetworkManager and wait until it is. Stopped with ignore-dependencies:
    the units that require it (its wait-online unit, say) are not to stop with it."""
    mode = "ignore-dependencies" if method == "StopUnit" else "replace"
    want = "inactive" if method == "StopUnit" else "active"
    seen = ""
    try:
        with system_bus() as conn:
            call(conn, _MANAGER, method, "ss", UNIT, mode)
            unit = call(conn, _MANAGER, "LoadUnit", "s", UNIT)[0]
            while time.monotonic() < until:
                seen = str(prop(conn, _SYSTEMD, unit, f"{_SYSTEMD}.Unit", "ActiveState"))
                if seen == want:
                    return
                if seen == "failed":
                    break
                time.sleep(_POLL / 4)
    except BusError as e:
        raise NetworkManagerError(f"systemd: {method} {UNIT}: {e}") from e
    raise NetworkManagerError(f"{UNIT} is {seen or 'unknown'}, not {want} ({method})")


def _settled(want: dict[str, str]) -> bool:
    """Each device has its profile active already (adopt or readopt ran before: idempotent)."""
    try:
        with system_bus() as conn:
            return all(_active(conn, d) == (p, True) for d, p in want.items())
    except BusError:
        return False


def _active(conn: DBusConnection, device: str) -> tuple[str, bool] | None:
    """The device's active profile's UUID and whether it is activated and NetworkManager's own
    (not only watched); None when it has none."""
    path = call(conn, _nm(_ROOT, ""), "GetDeviceByIpIface", "s", device)[0]
    active = _get(conn, path, ".Device", "ActiveConnection")
    if active == "/":
        return None
    a = ".Connection.Active"
    ours = not _get(conn, active, a, "StateFlags") & _EXTERNAL
    return str(_get(conn, active, a, "Uuid")), ours and _get(conn, active, a, "State") == _ACTIVATED


def _wait_active(want: dict[str, str], until: float) -> None:
    """Until every device has its profile activated. A device NetworkManager did not assume
    (it settled on another profile, or only watches it) is given its profile explicitly: that
    reconfigures it (a short outage), but leaves the host as it must be."""
    told: set[str] = set()
    seen = "NetworkManager did not answer"
    while time.monotonic() < until:
        try:
            with system_bus() as conn:
                seen = _missing(conn, want, told)
                if not seen:
                    return
        except BusError as e:
            seen = str(e)  # not on the bus yet
        time.sleep(_POLL)
    raise NetworkManagerError(f"NetworkManager did not take its profiles in time: {seen}")


def _missing(conn: DBusConnection, want: dict[str, str], told: set[str]) -> str:
    """What is still missing ("" nothing); a device that NetworkManager settled otherwise is
    told its profile, once."""
    for device, profile in want.items():
        state = _active(conn, device)
        if state == (profile, True):
            continue
        path = call(conn, _nm(_ROOT, ""), "GetDeviceByIpIface", "s", device)[0]
        idle = state is None and _get(conn, path, ".Device", "State") == _DISCONNECTED
        other = state is not None and state[0] != profile
        if (idle or other) and device not in told:
            settings = _nm(f"{_ROOT}/Settings", ".Settings")
            found = call(conn, settings, "GetConnectionByUuid", "s", profile)[0]
            call(conn, _nm(_ROOT, ""), "ActivateConnection", "ooo", found, path, "/")
            told.add(device)
        return f"{device} has {state[0] if state else 'no profile'} active, not {profile}"
    return ""
