"""What the agent knows about the host: typed, immutable records read from the kernel.

Devices are referred to by name, not index, so that a plan can name a bridge that does not
exist yet; the netlink encoder resolves names to indexes at send time.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

from .netfilter import NftRule

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

IFF_UP = 0x1
IFF_LOOPBACK = 0x8

IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80
IFA_F_NOPREFIXROUTE = 0x200
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
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4  # the one route flag a request sets; the others report link state
KERNEL_METRIC: dict[int, int] = {
    AF_INET: 0,
    AF_INET6: 256,
}  # of the prefix route the kernel makes per address

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_STALE = 0x04
NUD_REACHABLE = 0x02
NUD_DELAY = 0x08
NUD_PROBE = 0x10
# States whose entry carries a usable link-layer address.
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE
NUD_STATIC = NUD_PERMANENT | NUD_NOARP
NTF_PROXY = 0x08

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
    rt_priority: int = 0  # IFA_RT_PRIORITY: the metric of the prefix route the kernel makes

    @property
    def makes_prefix_route(self) -> bool:
        """The kernel adds (and removes) a route to this address's prefix by itself: IPv4 for
        a prefix shorter than /32, IPv6 for any (a DHCPv6 /128 gets a /128 route)."""
        whole = self.family == AF_INET and self.prefixlen == 32
        return not self.flags & IFA_F_NOPREFIXROUTE and not whole and not self.peer

    @property
    def finite(self) -> bool:
        return self.valid_lft != FOREVER

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
    flags: int  # RTNH_F_ONLINK: what was configured (not linkdown/dead, which follow the carrier)
    metrics: tuple[tuple[str, int], ...]  # RTAX_* name and value, e.g. ("RTAX_MTU", 1400)
    pref: int | None  # IPv6 router preference
    via: str | None = None  # RTA_VIA: a gateway of the other family (IPv4 via inet6 ...)
    expires: int | None = None  # seconds left at snapshot time (IPv6: RA-learned, expiring)
    src: str | None = None  # RTA_SRC: an IPv6 source-specific route (`from PREFIX`)
    src_len: int = 0

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0

    def on(self, dev: str) -> Route:
        return replace(self, dev=dev)

    @property
    def next_hop(self) -> str | None:
        return self.gateway or self.via

    def __str__(self) -> str:
        dst = "default" if self.dst is None else f"{self.dst}/{self.dst_len}"
        via = f" via {self.next_hop}" if self.next_hop else ""
        table = "" if self.table == RT_TABLE_MAIN else f" table {self.table}"
        proto = " proto kernel" if self.protocol == RTPROT_KERNEL else ""
        expires = f" expires {self.expires}s" if self.expires is not None else ""
        src = f" from {self.src}/{self.src_len}" if self.src else ""
        return f"{dst}{src}{via} dev {self.dev}{proto} metric {self.priority}{table}{expires}"


@dataclass(frozen=True)
class Neighbour:
    family: int
    dst: str
    lladdr: str  # "" for a proxy entry
    state: int
    flags: int  # NTF_PROXY marks a proxy entry (answered for, not resolved)
    dev: str

    @property
    def is_static(self) -> bool:
        return bool(self.state & NUD_STATIC)

    @property
    def is_proxy(self) -> bool:
        return bool(self.flags & NTF_PROXY)

    def on(self, dev: str) -> Neighbour:
        return replace(self, dev=dev)

    def __str__(self) -> str:
        if self.is_proxy:
            return f"proxy {self.dst} dev {self.dev}"
        return f"{self.dst} lladdr {self.lladdr} dev {self.dev}"


RuleValue = int | str


@dataclass(frozen=True)
class Rule:
    """A policy routing rule that names the NIC (`iif` or `oif`); the rest of it kept as read.

    `attrs` holds every other FRA_* attribute with its value, sorted, so the rule can be sent
    back as it was.
    """

    family: int
    priority: int
    action: int
    table: int
    src_len: int
    dst_len: int
    tos: int
    flags: int  # FIB_RULE_INVERT and friends
    iifname: str | None
    oifname: str | None
    attrs: tuple[tuple[str, RuleValue], ...]

    def on(self, old: str, new: str) -> Rule:
        return replace(
            self,
            iifname=new if self.iifname == old else self.iifname,
            oifname=new if self.oifname == old else self.oifname,
        )

    def names(self, dev: str) -> bool:
        return dev in (self.iifname, self.oifname)

    def __str__(self) -> str:
        where = " ".join(f"{k} {v}" for k, v in (("iif", self.iifname), ("oif", self.oifname)) if v)
        family = "-6 " if self.family == AF_INET6 else ""
        return f"rule {family}pref {self.priority} {where} table {self.table}"


@dataclass(frozen=True)
class Sysctl:
    """One per-device setting (net.ipv4.conf.DEV.KEY or net.ipv6.conf.DEV.KEY)."""

    family: int
    dev: str  # a device, or "default": what a new device starts with
    key: str
    value: str

    def on(self, dev: str) -> Sysctl:
        return replace(self, dev=dev)

    @property
    def path(self) -> str:
        return f"net.ipv{4 if self.family == AF_INET else 6}.conf.{self.dev}.{self.key}"

    def __str__(self) -> str:
        return f"{self.path} = {self.value}"


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
    # What names the NIC that a move could not keep exact (multipath routes, nexthop objects,
    # upper devices, ...): each a sentence naming the object and what to do.
    unsupported: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()  # policy rules naming the NIC or the bridge
    sysctls: tuple[Sysctl, ...] = ()  # of the NIC, the bridge and "default"
    firewall: tuple[NftRule, ...] = ()  # nftables rules naming the NIC or the bridge

    def sysctls_on(self, dev: str) -> tuple[Sysctl, ...]:
        return tuple(s for s in self.sysctls if s.dev == dev)

    def addresses_on(self, dev: str) -> tuple[Address, ...]:
        return tuple(a for d, a in self.addresses if d == dev)

    def routes_on(self, dev: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.dev == dev)

    def neighbours_on(self, dev: str) -> tuple[Neighbour, ...]:
        return tuple(n for n in self.neighbours if n.dev == dev)


@dataclass(frozen=True)
class BridgeSide:
    """What `undo` reads about a bridge beyond HostState: the device, its ports, and everything
    naming it that a move back onto the NIC could not carry (each a sentence naming it)."""

    name: str
    device: Link | None  # None: there is no device of that name
    ports: tuple[Link, ...]  # every device enslaved to it, the NIC among them
    blockers: tuple[str, ...] = ()

    def kept_port(self, detach: tuple[str, ...]) -> Link | None:
        """The NIC to give the host back to: the one port not named to be detached."""
        kept = [p for p in self.ports if p.name not in detach]
        return kept[0] if len(kept) == 1 else None
