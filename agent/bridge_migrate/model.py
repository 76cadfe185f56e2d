"""What the agent knows about the host: typed, immutable records read from the kernel.

Devices are referred to by name, not index, so that a plan can name a bridge that does not
exist yet; the netlink encoder resolves names to indexes at send time.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

IFF_UP = 0x1
IFF_LOOPBACK = 0x8

IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80
# Flags the kernel takes from a request (the rest it derives itself).
IFA_F_SETTABLE = IFA_F_NODAD | IFA_F_OPTIMISTIC | 0x100 | 0x200 | 0x400 | 0x800
# Flags that only say where DAD is; they change by themselves.
IFA_F_TRANSIENT = IFA_F_TENTATIVE | IFA_F_OPTIMISTIC

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTPROT_KERNEL = 2

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_STALE = 0x04
NUD_REACHABLE = 0x02
NUD_DELAY = 0x08
NUD_PROBE = 0x10
# States whose entry carries a usable link-layer address.
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE
NUD_STATIC = NUD_PERMANENT | NUD_NOARP

FOREVER = 0xFFFFFFFF


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # "" for a plain device, else the rtnl link kind ("bridge", "veth", ...)
    mac: str
    mtu: int
    flags: int
    operstate: str
    master: str | None  # name of the device this one is enslaved to

    @property
    def is_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def is_loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


@dataclass(frozen=True)
class Address:
    family: int
    address: str
    prefixlen: int
    scope: int
    flags: int
    label: str | None  # IPv4 only: the label, e.g. "eth0:1"
    broadcast: str | None  # IPv4 only
    peer: str | None  # the IFA_ADDRESS when it differs from the local address (point-to-point)
    valid_lft: int  # seconds left at snapshot time; FOREVER for permanent
    preferred_lft: int

    @property
    def secondary(self) -> bool:
        return bool(self.flags & IFA_F_SECONDARY)

    @property
    def is_global(self) -> bool:
        return self.scope == RT_SCOPE_UNIVERSE

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    family: int
    table: int
    dst: str | None  # None: the default route
    dst_len: int
    dev: str
    gateway: str | None
    priority: int
    protocol: int
    scope: int
    type: int
    tos: int
    prefsrc: str | None
    flags: int  # RTNH_F_ONLINK and friends
    metrics: tuple[tuple[str, int], ...]  # RTAX_* name and value, e.g. ("RTAX_MTU", 1400)
    pref: int | None  # IPv6 router preference

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0

    def on(self, dev: str) -> Route:
        return replace(self, dev=dev)

    def __str__(self) -> str:
        dst = "default" if self.dst is None else f"{self.dst}/{self.dst_len}"
        via = f" via {self.gateway}" if self.gateway else ""
        table = "" if self.table == RT_TABLE_MAIN else f" table {self.table}"
        return f"{dst}{via} dev {self.dev} metric {self.priority}{table}"


@dataclass(frozen=True)
class Neighbour:
    family: int
    dst: str
    lladdr: str
    state: int
    flags: int
    dev: str

    @property
    def is_static(self) -> bool:
        return bool(self.state & NUD_STATIC)

    def on(self, dev: str) -> Neighbour:
        return replace(self, dev=dev)

    def __str__(self) -> str:
        return f"{self.dst} lladdr {self.lladdr} dev {self.dev}"


@dataclass(frozen=True)
class HostState:
    """The NIC, the bridge if it exists, and everything configured on either of them.

    Addresses are in the kernel's dump order per device; routes and neighbours are those whose
    device is the NIC or the bridge.
    """

    nic: Link
    bridge: Link | None
    addresses: tuple[tuple[str, Address], ...]  # (device name, address)
    routes: tuple[Route, ...]
    neighbours: tuple[Neighbour, ...]
    # Routes through the NIC a move could not keep exact (multipath, nexthop objects).
    unsupported: tuple[str, ...] = ()

    def addresses_on(self, dev: str) -> tuple[Address, ...]:
        return tuple(a for d, a in self.addresses if d == dev)

    def routes_on(self, dev: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.dev == dev)

    def neighbours_on(self, dev: str) -> tuple[Neighbour, ...]:
        return tuple(n for n in self.neighbours if n.dev == dev)
