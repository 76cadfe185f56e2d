"""Netlink dumps by hand: those pyroute2 0.9.7 cannot ask for (proxy neighbour entries, a dump
request with NTF_PROXY set; nexthop objects, RTM_GETNEXTHOP, which it does not know), and the
route dump, which a host with a thousand routes makes the largest part of reading it: a plain
route is decoded here with struct, in a few microseconds, into what pyroute2 would have made of
it; any other (multipath, nexthop objects, encapsulations, ...) by pyroute2 itself."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .model import NTF_PROXY

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_GETLINK = 18
RTM_GETADDR = 22
RTM_GETROUTE = 26
RTM_GETNEIGH = 30
RTM_GETRULE = 34
RTM_GETNEXTHOP = 106
NHA_ID = 1
NHA_OIF = 5
_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_TIMEOUT = 2.0


def links() -> list[Any]:
    """Every link, decoded by pyroute2 (IPRoute.get_links() less its event loop)."""
    return _decoded(RTM_GETLINK, ifinfmsg, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0))


def addresses() -> tuple[Fast, ...]:
    """Every address of both families, as pyroute2 decodes them: a plain one (what `ip addr add`
    makes, SLAAC's and DHCP's included) by struct, in a few microseconds; any other by pyroute2.
    A host with many addresses is read twice per takeover: before, and in the check."""
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return tuple(_fast(body, _plain_address, ifaddrmsg) for body in _dump(RTM_GETADDR, request))


_IFADDRMSG = struct.Struct("=BBBBI")
_IFADDRMSG_FIELDS = ("family", "prefixlen", "flags", "scope", "index")
# The attributes a plain address has, by number, as pyroute2 names them (ifaddrmsg.nla_map).
_PLAIN_ADDRESS = {1: "IFA_ADDRESS", 2: "IFA_LOCAL", 4: "IFA_BROADCAST"}  # addresses
_PLAIN_ADDRESS_U32 = {8: "IFA_FLAGS", 9: "IFA_RT_PRIORITY"}
IFA_LABEL, IFA_CACHEINFO, IFA_PROTO = 3, 6, 11
_IFA_CACHEINFO = struct.Struct("=" + "".join(kind for _, kind in ifaddrmsg.cacheinfo.fields))
_IFA_CACHEINFO_NAMES = tuple(name for name, _ in ifaddrmsg.cacheinfo.fields)


def _plain_address(message: bytes) -> Fast | None:
    """The address, if every attribute is one a plain address has; None for pyroute2."""
    body = message[_HEADER.size :]
    fields = dict(zip(_IFADDRMSG_FIELDS, _IFADDRMSG.unpack_from(body), strict=True))
    size = _ADDRESS.get(fields["family"])
    if size is None:
        return None
    attrs: dict[str, Any] = {}
    for kind, value in _attrs(body[_IFADDRMSG.size :]):
        decoded: Any
        if kind in _PLAIN_ADDRESS and len(value) == size:
            decoded, name = socket.inet_ntop(fields["family"], value), _PLAIN_ADDRESS[kind]
        elif kind in _PLAIN_ADDRESS_U32 and len(value) == 4:
            decoded, name = _u32(value), _PLAIN_ADDRESS_U32[kind]
        elif kind == IFA_CACHEINFO and len(value) == _IFA_CACHEINFO.size:
            decoded = dict(zip(_IFA_CACHEINFO_NAMES, _IFA_CACHEINFO.unpack(value), strict=True))
            name = "IFA_CACHEINFO"
        elif kind == IFA_LABEL and (label := _text(value)) is not None:
            decoded, name = label, "IFA_LABEL"
        elif kind == IFA_PROTO and len(value) == 1:
            decoded, name = value[0], "IFA_PROTO"
        else:
            return None
        attrs.setdefault(name, decoded)
    return Fast(attrs, fields)


def _text(value: bytes) -> str | None:
    """A NUL-terminated string as pyroute2's asciiz has it; None if not UTF-8."""
    try:
        return value.strip(b"\0").decode()
    except UnicodeDecodeError:
        return None


def neighbours() -> list[Any]:
    """Every neighbour entry of both families (not the proxy ones), decoded by pyroute2."""
    request = struct.pack("=BxxxiHBB", socket.AF_UNSPEC, 0, 0, 0, 0)
    return _decoded(RTM_GETNEIGH, ndmsg, request)


def rules() -> list[Any]:
    """Every policy rule of both families, decoded by pyroute2."""
    return _decoded(RTM_GETRULE, fibmsg, struct.pack("=BBBBBBBBI", socket.AF_UNSPEC, *[0] * 8))


def _decoded(kind: int, cls: Any, request: bytes) -> list[Any]:
    found = []
    for body in _dump(kind, request):
        msg = cls(body)
        msg.decode()
        found.append(msg)
    return found


def proxy_neighbours() -> list[Any]:
    """Every proxy entry (both families), decoded as pyroute2 ndmsg."""
    request = struct.pack("=BxxxiHBB", socket.AF_UNSPEC, 0, 0, NTF_PROXY, 0)
    found = []
    for body in _dump(RTM_GETNEIGH, request):
        msg = ndmsg(body)
        msg.decode()
        if msg["flags"] & NTF_PROXY:
            found.append(msg)
    return found


class Fast:
    """A netlink message with its attributes decoded once, by name (pyroute2's `get` scans
    every attribute at each call): `get` as pyroute2's, the fields by `[]`."""

    __slots__ = ("attrs", "fields", "msg")

    def __init__(self, attrs: dict[str, Any], fields: Any, msg: Any = None) -> None:
        self.attrs, self.fields, self.msg = attrs, fields, msg

    @classmethod
    def of(cls, msg: Any) -> Fast:
        """A pyroute2 message (kept, as `msg`)."""
        attrs: dict[str, Any] = {}
        for slot in msg["attrs"]:
            attrs.setdefault(slot[0], slot[1])
        return cls(attrs, msg, msg)

    def get(self, key: str, default: Any = None) -> Any:
        """As pyroute2's: the first attribute of that name, else the field, else `default`."""
        value = self.attrs.get(key)
        if value is None and key in self.fields:
            value = self.fields[key]
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def routes() -> tuple[Fast, ...]:
    """Every route of every table and family, as pyroute2's IPRoute.get_routes() gives them
    (family 255: the kernel answers AF_UNSPEC with IPv4 alone)."""
    request = _RTMSG.pack(255, 0, 0, 0, 0, 0, 0, 0, 0)
    return tuple(_fast(body, _plain_route, rtmsg) for body in _dump(RTM_GETROUTE, request))


_RTMSG = struct.Struct("=BBBBBBBBI")
_RTMSG_FIELDS = ("family", "dst_len", "src_len", "tos", "table", "proto", "scope", "type", "flags")
_ADDRESS = {socket.AF_INET: 4, socket.AF_INET6: 16}
_U32 = struct.Struct("=I")
# The attributes a plain route has, by number, as pyroute2 names them (rtmsg.nla_map).
_PLAIN_ROUTE = {1: "RTA_DST", 2: "RTA_SRC", 5: "RTA_GATEWAY", 7: "RTA_PREFSRC"}  # addresses
_PLAIN_U32 = {4: "RTA_OIF", 6: "RTA_PRIORITY", 15: "RTA_TABLE"}
RTA_METRICS, RTA_CACHEINFO, RTA_PREF = 8, 12, 20
_METRICS = {n: name for n, (name, kind) in enumerate(rtmsg.metrics.nla_map) if kind == "uint32"}
_CACHEINFO = struct.Struct("=" + "".join(kind for _, kind in rtmsg.cacheinfo.fields))
_CACHEINFO_NAMES = tuple(name for name, _ in rtmsg.cacheinfo.fields)


def _fast(message: bytes, plain: Callable[[bytes], Fast | None], full: Any) -> Fast:
    """Decoded by struct if `plain` knows every attribute, else by pyroute2's class `full`."""
    found = plain(message)
    if found is not None:
        return found
    msg = full(message)
    msg.decode()
    return Fast.of(msg)


def _plain_route(message: bytes) -> Fast | None:
    """The route, if every attribute is one a plain route has; None for pyroute2 to decode."""
    body = message[_HEADER.size :]
    fields = dict(zip(_RTMSG_FIELDS, _RTMSG.unpack_from(body), strict=True))
    size = _ADDRESS.get(fields["family"])
    if size is None:
        return None
    attrs: dict[str, Any] = {}
    for kind, value in _attrs(body[_RTMSG.size :]):
        if kind in _PLAIN_ROUTE and len(value) == size:
            decoded: Any = socket.inet_ntop(fields["family"], value)
            name = _PLAIN_ROUTE[kind]
        elif kind in _PLAIN_U32 and len(value) == 4:
            decoded, name = _u32(value), _PLAIN_U32[kind]
        elif kind == RTA_PREF and len(value) == 1:
            decoded, name = value[0], "RTA_PREF"
        elif kind == RTA_CACHEINFO and len(value) == _CACHEINFO.size:
            decoded = dict(zip(_CACHEINFO_NAMES, _CACHEINFO.unpack(value), strict=True))
            name = "RTA_CACHEINFO"
        elif kind == RTA_METRICS and (metrics := _metrics(value)) is not None:
            decoded, name = {"attrs": metrics}, "RTA_METRICS"
        else:
            return None
        attrs.setdefault(name, decoded)
    return Fast(attrs, fields)


def _metrics(data: bytes) -> list[tuple[str, int]] | None:
    found = []
    for kind, value in _attrs(data):
        if kind not in _METRICS or len(value) != 4:
            return None
        found.append((_METRICS[kind], _u32(value)))
    return found


RTA_DST, RTA_OIF = 1, 4


def routes_to(destinations: Sequence[str]) -> list[int | OSError]:
    """How the host routes to each address now, as `ip route get` asks (RTM_GETROUTE): the
    outgoing device's index, or the error the kernel answered. Every request in one send."""
    requests = []
    for seq, dst in enumerate(destinations, start=1):
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        address = socket.inet_pton(family, dst)
        attr = _ATTR.pack(_ATTR.size + len(address), RTA_DST) + address
        body = _RTMSG.pack(family, len(address) * 8, 0, 0, 0, 0, 0, 0, 0) + attr
        requests.append(_HEADER.pack(_HEADER.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0))
        requests.append(body)
    answers: dict[int, int | OSError] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))
        sock.send(b"".join(requests))
        while len(answers) < len(destinations):
            for msg_type, seq, message in _messages(sock.recv(1 << 16)):
                answers[seq] = _oif_or_error(msg_type, message[_HEADER.size :])
    return [answers[seq] for seq in range(1, len(destinations) + 1)]


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, the message with its header) of each message in a datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            raise OSError(errno.EBADMSG, f"a netlink message of {length} bytes")
        yield msg_type, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def _oif_or_error(msg_type: int, body: bytes) -> int | OSError:
    if msg_type == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", body)
        return OSError(-error, os.strerror(-error))
    oif = dict(_attrs(body[_RTMSG.size :])).get(RTA_OIF)
    return _u32(oif) if oif is not None else OSError(errno.ENODEV, "the route names no device")


def nexthop_objects() -> list[tuple[int, int]]:
    """(id, oif) of every nexthop object with a device (groups have none)."""
    found = []
    for body in _dump(RTM_GETNEXTHOP, struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)):
        attrs = dict(_attrs(body[_HEADER.size + 8 :]))
        if NHA_ID in attrs and NHA_OIF in attrs:
            found.append((_u32(attrs[NHA_ID]), _u32(attrs[NHA_OIF])))
    return found


def _dump(kind: int, payload: bytes) -> Iterator[bytes]:
    """Each message of a dump, header included (pyroute2's decoders want it)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))
        header = _HEADER.pack(_HEADER.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.send(header + payload)
        while True:
            for msg_type, _seq, message in _messages(sock.recv(1 << 20)):
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", message, _HEADER.size)
                    if error in (0, -95):  # EOPNOTSUPP: a kernel without nexthop objects
                        return
                    raise OSError(-error, f"netlink dump {kind} failed")
                yield message


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def _u32(value: bytes) -> int:
    (number,) = struct.unpack_from("=I", value)
    return int(number)
