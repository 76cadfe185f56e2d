"""Each planned operation as the rtnetlink message that performs it (pyroute2's encoders)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .model import AF_INET, FOREVER, IFA_F_SETTABLE, IFF_UP, Address, Route
from .plan import (
    AddAddress,
    AddNeighbour,
    CreateBridge,
    DelAddress,
    DeleteBridge,
    DelNeighbour,
    Op,
    ReplaceRoute,
    SetMaster,
)

RTNH_F_ONLINK = 0x4
RT_TABLE_COMPAT = 252

Resolve = Callable[[str], int]  # device name -> ifindex


def encode(op: Op, seq: int, resolve: Resolve, age: float) -> bytes:
    """The message for `op` with sequence number `seq`, asking for an ACK.

    `age` is how many seconds have passed since the snapshot: finite address lifetimes are
    shortened by it, so a restored address expires when it would have anyway.
    """
    msg, flags = _message(op, resolve, age)
    msg["header"]["type"] = _TYPES[type(op)]
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


_TYPES: dict[type, int] = {
    CreateBridge: RTM_NEWLINK,
    DeleteBridge: RTM_DELLINK,
    SetMaster: RTM_NEWLINK,
    AddAddress: RTM_NEWADDR,
    DelAddress: RTM_DELADDR,
    AddNeighbour: RTM_NEWNEIGH,
    DelNeighbour: RTM_DELNEIGH,
    ReplaceRoute: RTM_NEWROUTE,
}


def _message(op: Op, resolve: Resolve, age: float) -> tuple[Any, int]:
    match op:
        case CreateBridge():
            return _create_bridge(op), NLM_F_CREATE | NLM_F_EXCL
        case DeleteBridge():
            msg = ifinfmsg()
            msg["index"] = resolve(op.name)
            return msg, 0
        case SetMaster():
            msg = ifinfmsg()
            msg["index"] = resolve(op.dev)
            msg["attrs"] = [("IFLA_MASTER", resolve(op.master) if op.master else 0)]
            return msg, 0
        case AddAddress():
            return _address(op.address, resolve(op.dev), age, full=True), NLM_F_CREATE | NLM_F_EXCL
        case DelAddress():
            return _address(op.address, resolve(op.dev), age, full=False), 0
        case AddNeighbour():
            return _neighbour(op, resolve), NLM_F_CREATE | NLM_F_REPLACE
        case DelNeighbour():
            return _neighbour(op, resolve), 0
        case ReplaceRoute():
            return _route(op.new, resolve), NLM_F_CREATE | NLM_F_REPLACE
    raise AssertionError(op)


def _create_bridge(op: CreateBridge) -> Any:
    msg = ifinfmsg()
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    info = {
        "attrs": [
            ("IFLA_INFO_KIND", "bridge"),
            (
                "IFLA_INFO_DATA",
                {"attrs": [("IFLA_BR_STP_STATE", 0), ("IFLA_BR_FORWARD_DELAY", 0)]},
            ),
        ]
    }
    msg["attrs"] = [
        ("IFLA_IFNAME", op.name),
        ("IFLA_ADDRESS", op.mac),
        ("IFLA_MTU", op.mtu),
        ("IFLA_LINKINFO", info),
    ]
    return msg


def _address(a: Address, index: int, age: float, *, full: bool) -> Any:
    msg = ifaddrmsg()
    msg["family"] = a.family
    msg["prefixlen"] = a.prefixlen
    msg["index"] = index
    attrs: list[tuple[str, Any]] = []
    if a.family == AF_INET:
        attrs += [("IFA_LOCAL", a.address), ("IFA_ADDRESS", a.peer or a.address)]
    else:
        attrs.append(("IFA_ADDRESS", a.address))
    if full:
        flags = a.flags & IFA_F_SETTABLE
        msg["flags"] = flags & 0xFF
        msg["scope"] = a.scope
        attrs.append(("IFA_FLAGS", flags))
        if a.label:
            attrs.append(("IFA_LABEL", a.label))
        if a.broadcast:
            attrs.append(("IFA_BROADCAST", a.broadcast))
        if (a.valid_lft, a.preferred_lft) != (FOREVER, FOREVER):
            attrs.append(("IFA_CACHEINFO", _lifetimes(a, age)))
    msg["attrs"] = attrs
    return msg


def _lifetimes(a: Address, age: float) -> dict[str, int]:
    def left(lft: int) -> int:
        return lft if lft == FOREVER else max(0, lft - int(age))

    # A valid lifetime of 0 would be refused; one second keeps the kernel's own expiry in charge.
    return {
        "ifa_preferred": left(a.preferred_lft),
        "ifa_valid": max(1, left(a.valid_lft)),
        "cstamp": 0,
        "tstamp": 0,
    }


def _neighbour(op: AddNeighbour | DelNeighbour, resolve: Resolve) -> Any:
    n = op.neighbour
    msg = ndmsg()
    msg["family"] = n.family
    msg["ifindex"] = resolve(n.dev)
    attrs: list[tuple[str, Any]] = [("NDA_DST", n.dst)]
    if isinstance(op, AddNeighbour):
        msg["state"] = n.state
        msg["flags"] = n.flags
        attrs.append(("NDA_LLADDR", n.lladdr))
    msg["attrs"] = attrs
    return msg


def _route(r: Route, resolve: Resolve) -> Any:
    msg = rtmsg()
    msg["family"] = r.family
    msg["dst_len"] = r.dst_len
    msg["tos"] = r.tos
    msg["table"] = r.table if r.table < 256 else RT_TABLE_COMPAT
    msg["proto"] = r.protocol
    msg["scope"] = r.scope
    msg["type"] = r.type
    msg["flags"] = r.flags & RTNH_F_ONLINK
    attrs: list[tuple[str, Any]] = [
        ("RTA_TABLE", r.table),
        ("RTA_OIF", resolve(r.dev)),
        ("RTA_PRIORITY", r.priority),
    ]
    if r.dst is not None:
        attrs.append(("RTA_DST", r.dst))
    if r.gateway:
        attrs.append(("RTA_GATEWAY", r.gateway))
    if r.prefsrc:
        attrs.append(("RTA_PREFSRC", r.prefsrc))
    if r.metrics:
        attrs.append(("RTA_METRICS", {"attrs": list(r.metrics)}))
    if r.pref is not None:
        attrs.append(("RTA_PREF", r.pref))
    msg["attrs"] = attrs
    return msg
