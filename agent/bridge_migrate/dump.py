"""Netlink dumps that pyroute2 0.9.7 cannot ask for: proxy neighbour entries (a dump request
with NTF_PROXY set) and nexthop objects (RTM_GETNEXTHOP, which it does not know)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

from pyroute2.netlink.rtnl.ndmsg import ndmsg

from .model import NTF_PROXY

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_GETNEIGH = 30
RTM_GETNEXTHOP = 106
NHA_ID = 1
NHA_OIF = 5
_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_TIMEOUT = 2.0


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
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
                if msg_type == NLMSG_DONE or length < _HEADER.size:
                    return
                if msg_type == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if error in (0, -95):  # EOPNOTSUPP: a kernel without nexthop objects
                        return
                    raise OSError(-error, f"netlink dump {kind} failed")
                yield data[offset : offset + length]
                offset += (length + 3) & ~3


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
