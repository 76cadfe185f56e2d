"""What `attach` is asked for and what it made, as data. Pure: no I/O here.

An address is pipework's `ADDRESS/PREFIX[@GATEWAY]`; the guest gets each address on one veth end
and, for each gateway, a default route through it. What was made is recorded as an `Attachment`,
so `detach` removes exactly that and `status` and `undo` can name it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from .errors import UsageError
from .preflight import check_name

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class GuestAddress:
    address: str
    prefixlen: int
    gateway: str | None

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}")

    def __str__(self) -> str:
        gateway = f"@{self.gateway}" if self.gateway else ""
        return f"{self.address}/{self.prefixlen}{gateway}"


@dataclass(frozen=True)
class AttachSpec:
    """The guest's interface as asked for: compared whole to tell "already attached"."""

    bridge: str
    ifname: str
    addresses: tuple[GuestAddress, ...]
    mtu: int | None  # None: the bridge's
    mac: str | None  # None: the kernel's random one

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(a.gateway for a in self.addresses if a.gateway)


@dataclass(frozen=True)
class Attachment:
    """What one `attach` made: the record's entry."""

    guest: str  # GUEST as given (netns:NAME, pid:PID, a container)
    netns_inode: int  # the guest's namespace: a restarted container has another
    spec: AttachSpec
    host_end: str  # the veth end on the bridge, in the host
    guest_mac: str  # the guest end's MAC, to know it is ours when detaching
    mtu: int  # as set

    def __str__(self) -> str:
        addresses = ", ".join(map(str, self.spec.addresses))
        where = f"on {self.spec.bridge} via {self.host_end}"
        return f"{self.guest} {self.spec.ifname} ({addresses}) {where}"


def parse_address(text: str) -> GuestAddress:
    """`ADDRESS/PREFIX`, `ADDRESS/PREFIX@GATEWAY`; IPv4 or IPv6. UsageError if malformed."""
    where, _, gateway = text.partition("@")
    address, slash, prefix = where.partition("/")
    if not slash or not prefix.isdigit():
        raise UsageError(f"address {text!r}: expected ADDRESS/PREFIX or ADDRESS/PREFIX@GATEWAY")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"address {text!r}: {address!r} is not an IP address") from None
    if int(prefix) > ip.max_prefixlen:
        raise UsageError(f"address {text!r}: an IPv{ip.version} prefix is 0 to {ip.max_prefixlen}")
    net = ipaddress.ip_interface(f"{ip}/{prefix}").network
    problem = _unusable(ip, net)
    if problem:
        raise UsageError(f"address {text!r}: {problem}")
    if not gateway and "@" not in text:
        return GuestAddress(str(ip), int(prefix), None)
    try:
        gw = ipaddress.ip_address(gateway)
    except ValueError:
        raise UsageError(f"address {text!r}: gateway {gateway!r} is not an IP address") from None
    if gw.version != ip.version or gw not in net or gw == ip:
        raise UsageError(f"address {text!r}: the gateway must be another address in {net}")
    return GuestAddress(str(ip), int(prefix), str(gw))


def _unusable(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> str:
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        return f"{ip} cannot be a guest's address"
    edges = (net.network_address, net.broadcast_address)
    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen < 31 and ip in edges:
        return f"{ip} is the network or broadcast address of {net}"
    return ""


def parse_spec(
    bridge: str, ifname: str, texts: list[str], mtu: int | None, mac: str | None
) -> AttachSpec:
    check_name("--bridge", bridge)
    check_name("--ifname", ifname)
    addresses = tuple(parse_address(t) for t in texts)
    for version in (4, 6):
        gateways = {a.gateway for a in addresses if a.version == version and a.gateway}
        if len(gateways) > 1:
            raise UsageError(f"more than one IPv{version} gateway: {', '.join(sorted(gateways))}")
    if len({a.address for a in addresses}) < len(addresses):
        raise UsageError("the same address is given twice")
    if mtu is not None and not 68 <= mtu <= 65535:
        raise UsageError(f"--mtu {mtu}: give 68 to 65535")
    if mac is not None:
        mac = mac.lower()
        if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise UsageError(f"--mac {mac}: give a unicast MAC, as 02:42:c6:12:00:32")
    return AttachSpec(bridge, ifname, addresses, mtu, mac)


def host_end_name(netns_inode: int, ifname: str) -> str:
    """The bridge's port for this guest interface: stable, so a retry finds it, and short
    enough for an interface name."""
    digest = hashlib.sha256(f"{netns_inode}/{ifname}".encode()).hexdigest()
    return f"bmg{digest[:11]}"
