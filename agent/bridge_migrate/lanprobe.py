"""Is an address already in use on the LAN? Asked before a guest gets it, and without claiming it.

IPv4: RFC 5227 ARP probes (sender IP 0.0.0.0, so no neighbour's cache learns anything); IPv6:
duplicate address detection, a neighbour solicitation from the unspecified address to the
target's solicited-node group (RFC 4862). Both are sent from a packet socket on the bridge in the
host with the bridge's own MAC: the frames go out of every port (the uplink and the guests), an
owner's answer comes back to the bridge, and nothing has to be created for it. Bounded: a few
probes within PROBE_WAIT seconds (RFC 5227 waits longer; a LAN host answers in microseconds).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from .verify import ETH_P_ARP

ETH_P_IPV6 = 0x86DD
PROBES = 3
PROBE_WAIT = 1.0  # seconds for an owner to answer (IPv6's RetransTimer)
_ICMPV6 = 58
_NS, _NA = 135, 136


def in_use(bridge: str, address: str) -> str | None:
    """The MAC that answered for `address` on `bridge`'s LAN; None if nobody did."""
    ip = ipaddress.ip_address(address)
    kind = ETH_P_ARP if ip.version == 4 else ETH_P_IPV6
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(kind)) as sock:
        sock.bind((bridge, kind))
        mac = sock.getsockname()[4]
        frame = _arp_probe(mac, ip.packed) if ip.version == 4 else _dad_probe(mac, ip.packed)
        end = time.monotonic() + PROBE_WAIT
        for n in range(PROBES):
            sock.send(frame)
            until = min(end, time.monotonic() + PROBE_WAIT / PROBES) if n < PROBES - 1 else end
            owner = _answer(sock, until, mac, ip.packed)
            if owner is not None:
                return owner
    return None


def _answer(sock: socket.socket, until: float, own: bytes, target: bytes) -> str | None:
    while (left := until - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return None
        frame = sock.recv(65535)
        sender = frame[6:12]
        if sender != own and _claims(frame, target):
            return ":".join(f"{b:02x}" for b in sender)
    return None


def _claims(frame: bytes, target: bytes) -> bool:
    """An ARP packet from `target` (a reply, or its owner's own use), or a neighbour
    advertisement for it."""
    kind = struct.unpack_from("!H", frame, 12)[0]
    if kind == ETH_P_ARP:
        return len(frame) >= 42 and frame[28:32] == target
    ip6 = frame[14:]
    if len(ip6) < 64 or ip6[6] != _ICMPV6:
        return False
    icmp = ip6[40:]
    return icmp[0] == _NA and icmp[8:24] == target


def _arp_probe(mac: bytes, target: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, b"\0" * 4, b"\0" * 6, target)
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def _dad_probe(mac: bytes, target: bytes) -> bytes:
    group = b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + target[13:]
    source = b"\0" * 16
    body = struct.pack("!BBHI", _NS, 0, 0, 0) + target
    pseudo = source + group + struct.pack("!I3xB", len(body), _ICMPV6)
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB", 6 << 28, len(body), _ICMPV6, 255) + source + group
    return b"\x33\x33" + group[12:] + mac + struct.pack("!H", ETH_P_IPV6) + header + body


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF
