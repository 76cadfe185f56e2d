"""netplan (rendering for systemd-networkd): the YAML that defines the NIC gains the bridge.

The NIC keeps only what belongs to the device (match-free name, MTU, offloads, ...) and becomes
the port of `bridges: {BR: {interfaces: [NIC], macaddress: MAC, parameters: {stp: false,
forward-delay: 0}, ...}}`, which takes the NIC's addressing keys as they were. Then `netplan
generate` (a subprocess: netplan has no API for it; never `netplan apply`, which re-triggers udev
and restarts what it likes) renders networkd's files, and networkd adopts the bridge the takeover
made (networkd.adopt). At boot netplan's own generator renders the same files: the host comes up
on the bridge with nothing of ours.

Beside the YAML, two networkd drop-ins for the bridge's generated .network, since netplan has no
key for either:
- the NIC's DHCP IAID, in /etc (it lasts): networkd derives the IAID from the interface, and the
  bridge would present another client identity and get another lease;
- KeepConfiguration=yes, in /run (gone at the next boot): without it networkd drops the
  addresses and routes it finds on a link it starts to manage, and acquires them again (a DHCP
  DISCOVER, the IPv6 routes back only at the next router advertisement, ~1 s). The price, until
  the next boot: networkd treats the bridge's DHCPv4 lease as critical (the address shows no
  expiry; the client still renews it).

The YAML is read and written with PyYAML, every scalar taken as the string it is written as
(BaseLoader: `52:54:00:12:34:56` stays a MAC, not a base-60 number; `yes` stays `yes`), and
written back plain where YAML allows it. Comments inside the document are not kept (PyYAML
drops them); the leading comment block is. The record holds the file as it was, and rollback
puts it back byte for byte.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from jeepney import DBusAddress
from jeepney.io.blocking import DBusConnection

from ..bus import BusError, call, system_bus
from ..model import HostState
from . import networkd
from .files import ABSENT, FileChange, FileState, read_state

# netplan reads *.yaml from these; a name in a later directory hides the same name in an
# earlier one (/run over /etc over /lib), then all are taken in the order of their names.
DIRECTORIES = ("/lib/netplan", "/etc/netplan", "/run/netplan")
EDITABLE = "/etc/netplan"
_GENERATED = "/run/systemd/network"  # where netplan renders networkd's files
_PERSISTENT = "/etc/systemd/network"
_IDENTITY = "50-bridge-migrate.conf"  # not networkd.ADOPT_DROP_IN: the same name in /etc hides /run
_GENERATE_TIMEOUT = 30.0
_SYSTEMD = "/run/systemd/system"  # systemd runs (sd_booted)
_POLL = 0.05
_NETWORKD = "org.freedesktop.network1"
_DEVICE_TYPES = (
    "ethernets",
    "bonds",
    "bridges",
    "vlans",
    "wifis",
    "tunnels",
    "vrfs",
    "modems",
    "dummy-devices",
    "virtual-ethernets",
    "nm-devices",
)
# The NIC's keys that describe its addressing: they move to the bridge, as they are. Everything
# else (the device's own settings: mtu, offloads, wakeonlan, macaddress override, ...) stays.
_ADDRESSING = (
    "dhcp4",
    "dhcp6",
    "dhcp4-overrides",
    "dhcp6-overrides",
    "dhcp-identifier",
    "accept-ra",
    "ra-overrides",
    "addresses",
    "gateway4",
    "gateway6",
    "nameservers",
    "routes",
    "routing-policy",
    "ipv6-address-generation",
    "ipv6-address-token",
    "ipv6-privacy",
    "ipv6-mtu",
    "link-local",
    "critical",
    "optional-addresses",
    "ignore-carrier",
    "neigh-suppress",
)
_TRUE = {"true", "yes", "on", "y"}


@dataclass(frozen=True)
class NetplanView:
    nic: str
    network_file: str  # the NIC's .network as netplan rendered it (networkd's NetworkFile)
    yaml: tuple[tuple[str, FileState], ...]  # every netplan file, by path
    iaid: int | None  # the IAID of the NIC's DHCP clients (networkd's), when they run
    targets: tuple[tuple[str, FileState], ...]  # our drop-ins for the bridge, as they are
    owned: tuple[str, ...] = ()  # the NIC's addresses networkd configured (not foreign)


@dataclass(frozen=True)
class NetplanAdoption:
    nic: str
    bridge: str
    network_file: str  # what networkd must configure the bridge with (adopt) ...
    nic_file: str  # ... and the NIC with (readopt)
    addresses: tuple[str, ...] = ()  # the NIC's global addresses, back on it after readopt


class NetplanError(Exception):
    pass


def generated(device: str) -> str:
    """The .network netplan renders for a device (its ID)."""
    return f"{_GENERATED}/10-netplan-{device}.network"


def dropins(bridge: str) -> tuple[str, str]:
    """The bridge's drop-ins: its DHCP identity (lasting), and the adoption's (until boot)."""
    name = PurePosixPath(generated(bridge)).name
    return (
        f"{_PERSISTENT}/{name}.d/{_IDENTITY}",
        f"{_GENERATED}/{name}.d/{networkd.ADOPT_DROP_IN}",
    )


def read(network_file: str, nic: str, bridge: str, ifindex: int) -> NetplanView:
    paths = [p for d in DIRECTORIES for p in sorted(Path(d).glob("*.yaml"))]
    return NetplanView(
        nic=nic,
        network_file=network_file,
        yaml=tuple((str(p), read_state(p)) for p in paths),
        iaid=networkd.link_iaid(ifindex),
        targets=tuple((p, read_state(p)) for p in dropins(bridge)),
        owned=_owned_now(nic),
    )


def _owned_now(nic: str) -> tuple[str, ...]:
    """What networkd counts as its own on the NIC now; nothing if it cannot be asked."""
    try:
        with system_bus() as conn:
            return tuple(sorted(_owned(_describe(conn, nic))))
    except BusError:
        return ()


# -- the plan (pure) ------------------------------------------------------------------------


def plan(view: NetplanView, state: HostState, bridge: str) -> tuple[FileChange, ...] | str:
    """The files, or why netplan's configuration cannot be handed over (nothing changed)."""
    docs = _documents(view)
    if isinstance(docs, str):
        return docs
    nic = view.nic
    problem = _check(docs, nic, bridge, state.nic.mac)
    if problem:
        return problem
    path, doc = next((p, d) for p, d in docs if nic in _section(d, "ethernets"))
    if PurePosixPath(path).parent != PurePosixPath(EDITABLE):
        return (
            f"{path} defines {nic}, and it is not in {EDITABLE}: a file in /run/netplan is made "
            "again at boot, one in /lib/netplan belongs to a package"
        )
    taken = [p for p, s in view.targets if s.exists]
    if taken:
        return f"{', '.join(taken)} exist already"
    before = dict(view.yaml)[path]
    assert before.text is not None  # _documents parsed it
    new_doc, moved = _with_bridge(doc, nic, bridge, state.nic.mac)
    changes = [FileChange(path, before, FileState(_render(before.text, new_doc), before.mode))]
    identity, adoption = (p for p, _ in view.targets)
    if view.iaid is not None and _dhcp(moved):
        changes.append(FileChange(identity, ABSENT, FileState(_identity(view, bridge), 0o644)))
    changes.append(FileChange(adoption, ABSENT, FileState(_KEEP, 0o644)))
    return tuple(changes)


def adoption(view: NetplanView, state: HostState, bridge: str) -> NetplanAdoption:
    """How networkd takes the bridge, and gives the NIC back: with the global addresses it
    had configured on the NIC (an address someone added by hand stays foreign to it)."""
    nic = view.nic
    held = tuple(
        a.address for a in state.addresses_on(nic) if a.is_global and a.address in view.owned
    )
    return NetplanAdoption(nic, bridge, generated(bridge), view.network_file, held)


def _documents(view: NetplanView) -> list[tuple[str, dict[str, Any]]] | str:
    """The files netplan reads (a name in /run hides it in /etc, ...), each parsed."""
    import yaml  # here: only a netplan host pays for it, not every start (about 20 ms)

    effective: dict[str, tuple[str, FileState]] = {}
    for path, st in view.yaml:
        if st.text is not None:
            effective[PurePosixPath(path).name] = (path, st)
    docs = []
    for name in sorted(effective):
        path, st = effective[name]
        try:
            doc = yaml.load(st.text or "", Loader=yaml.BaseLoader)
        except yaml.YAMLError as e:
            return f"{path} is not YAML that can be read back: {e}"
        if doc is None:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("network", {}), dict):
            return f"{path}: `network:` is not a mapping"
        docs.append((path, doc))
    return docs


def _section(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    found = (doc.get("network") or {}).get(kind) or {}
    return found if isinstance(found, dict) else {}


def _check(docs: list[tuple[str, dict[str, Any]]], nic: str, bridge: str, mac: str) -> str:
    """What keeps the NIC's definition from being moved as it is: '' if nothing."""
    naming = [p for p, d in docs if nic in _section(d, "ethernets")]
    matched = [
        f"{p} ({device_id})"
        for p, d in docs
        for device_id, spec in _section(d, "ethernets").items()
        if isinstance(spec, dict) and _matches(spec, nic, mac)
    ]
    if matched:
        return (
            f"{nic} is defined by `match:` in {', '.join(matched)}: networkd would match the "
            f"bridge too (it gets {nic}'s MAC), or the name is only set at boot; define {nic} "
            "by its name"
        )
    if len(naming) != 1:
        where = ", ".join(naming) if naming else "no netplan file"
        return f"{nic} is defined in {where}: exactly one file must define it to be rewritten"
    spec = _section(next(d for p, d in docs if p == naming[0]), "ethernets")[nic]
    if not isinstance(spec, dict):
        return f"{naming[0]}: {nic} is not a mapping"
    renderer = _renderer(next(d for p, d in docs if p == naming[0]), spec)
    if renderer != "networkd":
        return f"{nic} is rendered by {renderer} in {naming[0]}, not by systemd-networkd"
    stacked = [
        f"{p} ({kind} {device_id})"
        for p, d in docs
        for kind in _DEVICE_TYPES
        for device_id, other in _section(d, kind).items()
        if isinstance(other, dict) and _stacks(other, nic)
    ]
    if stacked:
        return f"{nic} already carries other devices: {', '.join(stacked)}"
    clash = [
        f"{p} ({kind})" for p, d in docs for kind in _DEVICE_TYPES if bridge in _section(d, kind)
    ]
    if clash:
        return f"{bridge} is defined already in {', '.join(clash)}"
    return ""


def _matches(spec: dict[str, Any], nic: str, mac: str) -> bool:
    match = spec.get("match")
    if not isinstance(match, dict):
        return "set-name" in spec and spec["set-name"] == nic
    by_mac = str(match.get("macaddress", "")).lower() == mac.lower()
    return by_mac or match.get("name") == nic or spec.get("set-name") == nic


def _stacks(spec: dict[str, Any], nic: str) -> bool:
    interfaces = spec.get("interfaces")
    return spec.get("link") == nic or (isinstance(interfaces, list) and nic in interfaces)


def _renderer(doc: dict[str, Any], spec: dict[str, Any]) -> str:
    """The device's renderer, else its file's, else netplan's default."""
    network = doc.get("network") or {}
    ethernets = network.get("ethernets") or {}
    return str(
        spec.get("renderer") or ethernets.get("renderer") or network.get("renderer") or "networkd"
    )


def _with_bridge(
    doc: dict[str, Any], nic: str, bridge: str, mac: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The document with the NIC's addressing moved onto the bridge, and what moved."""
    new = copy.deepcopy(doc)
    network = new["network"]
    spec = network["ethernets"][nic]
    moved = {k: spec.pop(k) for k in list(spec) if k in _ADDRESSING}
    bridges = network.get("bridges") or {}
    bridges[bridge] = {
        "interfaces": [nic],
        "macaddress": mac,
        "parameters": {"stp": "false", "forward-delay": "0"},
        **({"renderer": spec["renderer"]} if "renderer" in spec else {}),
        **moved,
    }
    network["bridges"] = bridges
    return new, moved


def _dhcp(moved: dict[str, Any]) -> bool:
    return any(str(moved.get(k, "")).lower() in _TRUE for k in ("dhcp4", "dhcp6"))


def _render(before: str, doc: dict[str, Any]) -> str:
    """The document as YAML, under the comment lines that opened the file before."""
    import yaml  # as in _documents

    # Every scalar is a string that needs no tag (as BaseLoader read it): with no implicit
    # resolvers the emitter writes each one plain wherever YAML allows it, so `true`, `0` and
    # MACs come out as they were read, not quoted.
    dumper: Any = type("_Dumper", (yaml.SafeDumper,), {"yaml_implicit_resolvers": {}})
    lead = []
    for line in before.splitlines(keepends=True):
        if line.startswith("#") or not line.strip():
            lead.append(line)
        else:
            break
    body = str(yaml.dump(doc, Dumper=dumper, default_flow_style=False, sort_keys=False, width=100))
    header = "".join(lead)
    if header and not header.endswith("\n"):
        header += "\n"
    return header + body


def _identity(view: NetplanView, bridge: str) -> str:
    return (
        f"# Written by bridge-migrate: {bridge} renews the DHCP leases of {view.nic} with its\n"
        "# IAID (networkd derives it from the interface; netplan has no key for it).\n"
        f"[DHCPv4]\nIAID={view.iaid}\n\n[DHCPv6]\nIAID={view.iaid}\n"
    )


_KEEP = (
    "# Written by bridge-migrate: networkd takes over the link with the addresses and routes\n"
    "# already on it instead of dropping them. In /run: gone at the next boot.\n"
    "[Network]\nKeepConfiguration=yes\n"
)


# -- the running system ---------------------------------------------------------------------


def adopt(a: NetplanAdoption, until: float) -> None:
    """netplan renders networkd's files from the rewritten YAML; networkd adopts the bridge."""
    generate(until)
    networkd.adopt(_networkd(a), until)


def readopt(a: NetplanAdoption, until: float) -> None:
    """netplan renders the NIC's files again from the restored YAML (the bridge's are gone);
    networkd configures the NIC again from them. networkd drops the addresses the rollback put
    back and acquires them again (DHCP, SLAAC at the next router advertisement): "configured"
    comes before the last of them, so wait for them too, or the rollback's comparison misses
    them."""
    generate(until)
    networkd.readopt(_networkd(a), until)
    missing = _wait_addresses(a.nic, set(a.addresses), until)
    if missing:
        raise NetplanError(
            f"systemd-networkd configured {a.nic} again, but not (yet) with {', '.join(missing)}"
        )


def _wait_addresses(nic: str, want: set[str], until: float) -> list[str]:
    """The addresses of `want` that networkd does not yet count as its own on `nic` (a DHCP
    lease, a router's advertisement, its static configuration) once all are, or time is up:
    the ones the rollback put back are "foreign" to it until it has acquired them again."""
    try:
        with system_bus() as conn:
            while True:
                missing = sorted(want - _owned(_describe(conn, nic)))
                if not missing or time.monotonic() >= until:
                    return missing
                time.sleep(_POLL)
    except BusError as e:
        raise NetplanError(f"systemd-networkd: {e}") from e


def _describe(conn: DBusConnection, nic: str) -> dict[str, Any]:
    manager = DBusAddress("/org/freedesktop/network1", _NETWORKD, f"{_NETWORKD}.Manager")
    path = call(conn, manager, "GetLinkByName", "s", nic)[1]
    described = call(conn, DBusAddress(path, _NETWORKD, f"{_NETWORKD}.Link"), "Describe")[0]
    found: dict[str, Any] = json.loads(described)
    return found


def _owned(described: dict[str, Any]) -> set[str]:
    """The addresses networkd's Link.Describe lists as configured by networkd itself."""
    return {
        str(ipaddress.ip_address(bytes(a["Address"])))
        for a in described.get("Addresses", [])
        if a.get("ConfigSource") not in (None, "foreign")
    }


def _networkd(a: NetplanAdoption) -> networkd.NetworkdAdoption:
    return networkd.NetworkdAdoption(a.nic, a.bridge, a.network_file, a.nic_file)


def generate(until: float) -> None:
    """`netplan generate`: networkd's files in /run, from the YAML as it is now. netplan also
    writes udev rules and units under /run: where /run is read-only (the agent's unit sandbox,
    and it must be), systemd runs it as a transient service of its own, whose output goes to
    the journal (handing it our pipes kept them open past its end)."""
    left = max(0.1, min(_GENERATE_TIMEOUT, until - time.monotonic()))
    argv, unit = ["netplan", "generate"], ""
    if not os.access("/run", os.W_OK) and Path(_SYSTEMD).is_dir():
        unit = f"bridge-migrate-netplan-generate-{os.getpid()}-{time.monotonic_ns()}"
        argv = [
            "systemd-run",
            "--quiet",
            "--wait",
            "--collect",
            "--service-type=oneshot",
            f"--unit={unit}",
            f"--property=RuntimeMaxSec={math.ceil(left)}",
            "--",
            *argv,
        ]
    # Not our service manager's notification socket: a child that notifies would be refused.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=left + 5,
            check=False,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetplanError(f"netplan generate: {e}") from e
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        where = f" (its output: journalctl -u {unit})" if unit else ""
        raise NetplanError(
            f"netplan generate failed ({done.returncode}){where}: {' '.join(said[-3:])}"
        )
