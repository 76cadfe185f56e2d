"""Checks made before anything changes. Input errors give exit 2, refusals exit 3."""

from __future__ import annotations

import math
import os

from .errors import Refused, UsageError
from .model import HostState
from .plan import bridge_label, is_migrated, moved_addresses
from .snapshot import Dumps, default_route_device, links_of

IFNAMSIZ = 16
MAX_TIMEOUT = 3600.0


def check_name(what: str, name: str) -> None:
    """The kernel's rules for an interface name (dev_valid_name)."""
    if not name or len(name) >= IFNAMSIZ:
        raise UsageError(f"{what} {name!r}: an interface name has 1 to {IFNAMSIZ - 1} characters")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise UsageError(f"{what} {name!r}: an interface name has no '/', ':' or white space")
    if not name.isprintable() or not name.isascii():
        raise UsageError(f"{what} {name!r}: use printable ASCII characters only")


def check_timeout(what: str, seconds: float) -> None:
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise UsageError(f"{what} {seconds:g}: give seconds, more than 0 and at most 3600")


def check_root() -> None:
    if os.geteuid() != 0:
        raise Refused("not running as root: changing the network needs CAP_NET_ADMIN", "use sudo")


def choose_nic(dumps: Dumps, nic: str | None, bridge: str) -> str:
    """The named NIC, else the device of the default route (or, once migrated, its port)."""
    links = links_of(dumps)
    if nic is not None:
        if nic not in links:
            raise Refused(f"no such NIC {nic!r}", f"devices here: {', '.join(sorted(links))}")
        return nic
    found = default_route_device(dumps)
    if found is None:
        raise Refused("no default route, so no NIC to take over", "name it with --nic")
    if found == bridge and links[found].kind == "bridge":
        ports = [link.name for link in links.values() if link.master == bridge]
        if len(ports) == 1:
            return ports[0]
    return found


def refusals(state: HostState, bridge: str) -> list[str]:
    """Why this host cannot be taken over as it is (empty: it can)."""
    nic = state.nic
    found = []
    if nic.name == bridge:
        found.append(f"{nic.name} is the bridge name itself")
    if nic.is_loopback:
        found.append(f"{nic.name} is a loopback device")
    if nic.kind == "bridge":
        found.append(f"{nic.name} is a bridge")
    if nic.master is not None:
        found.append(f"{nic.name} is already a port of {nic.master}")
    if not nic.is_up or nic.operstate not in ("UP", "UNKNOWN"):
        found.append(f"{nic.name} is down (operstate {nic.operstate})")
    if not any(a.is_global for a in state.addresses_on(nic.name)):
        found.append(f"{nic.name} has no global address to move")
    if state.bridge is not None and not is_migrated(state, bridge):
        found.append(f"{bridge} exists and is not a completed migration of {nic.name}")
    for a in moved_addresses(state):
        label = bridge_label(a.label, nic.name, bridge)
        if label is not None and len(label) >= IFNAMSIZ:
            found.append(f"label {a.label!r} of {a} would become {label!r}: too long")
    found.extend(state.unsupported)
    return found
