"""Each planned operation as the rtnetlink message that performs it (pyroute2's encoders)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, assert_never

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .model import (
    AF_INET,
    AF_INET6,
    FOREVER,
    IFA_F_SETTABLE,
    IFF_UP,
    NTF_PROXY,
    RTNH_F_ONLINK,
    Address,
    Route,
    Rule,
)
from .plan import (
    NOT_NETLINK,
    AddAddress,
    AddNeighbour,
    AddRoute,
    AddRule,
    Adopt,
    CreateBridge,
    DelAddress,
    DeleteBridge,
    DelNeighbour,
    DelRoute,
    DelRule,
    Op,
    Readopt,
    Release,
    ReplaceRoute,
    RestoreConfig,
    RestoreFirewall,
    RewriteFirewall,
    SetMaster,
    SetSysctl,
    WriteConfig,
)
from .sysctl import IPV4_DEVCONF, by_netlink

RT_TABLE_COMPAT = 252
RTA_EXPIRES = 23
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
NLA_F_NESTED = 0x8000

Resolve = Callable[[str], int]  # device name -> ifindex


def encode(op: Op, seq: int, resolve: Resolve, age: float) -> bytes:
    """The message for `op` with sequence number `seq`, asking for an ACK.

    `age` is how many seconds have passed since the snapshot: finite address lifetimes are
    shortened by it, so a restored address expires when it would have anyway.
    """
    msg, kind, flags, extra = _message(op, resolve, age)
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return _with_attrs(bytes(msg.data), extra)


Raw = list[tuple[int, bytes]]  # attributes pyroute2 cannot encode, appended as they are
_CREATE = NLM_F_CREATE | NLM_F_EXCL
_SET = NLM_F_CREATE | NLM_F_REPLACE


def _message(op: Op, resolve: Resolve, age: float) -> tuple[Any, int, int, Raw]:
    match op:
        case CreateBridge():
            return _create_bridge(op), RTM_NEWLINK, _CREATE, []
        case DeleteBridge():
            return _link(resolve(op.name)), RTM_DELLINK, 0, []
        case SetMaster():
            msg = _link(resolve(op.dev))
            msg["attrs"] = [("IFLA_MASTER", resolve(op.master) if op.master else 0)]
            return msg, RTM_NEWLINK, 0, []
        case AddAddress():
            return _address(op.address, resolve(op.dev), age, full=True), RTM_NEWADDR, _CREATE, []
        case DelAddress():
            return _address(op.address, resolve(op.dev), age, full=False), RTM_DELADDR, 0, []
        case AddNeighbour():
            return _neighbour(op, resolve), RTM_NEWNEIGH, _SET, []
        case DelNeighbour():
            return _neighbour(op, resolve), RTM_DELNEIGH, 0, []
        case ReplaceRoute():
            return _route(op.new, resolve), RTM_NEWROUTE, _SET, _expires(op.new, age)
        case AddRoute():
            return _route(op.route, resolve), RTM_NEWROUTE, _SET, _expires(op.route, age)
        case DelRoute():
            return _route(op.route, resolve), RTM_DELROUTE, 0, []
        case AddRule():
            return _rule(op.rule), RTM_NEWRULE, _CREATE, []
        case DelRule():
            return _rule(op.rule), RTM_DELRULE, 0, []
        case SetSysctl():
            return _link(resolve(op.sysctl.dev)), RTM_NEWLINK, 0, _inet_conf(op)
        case RewriteFirewall() | RestoreFirewall() | WriteConfig() | RestoreConfig():
            raise ValueError(f"not a netlink operation: {op}")
        case Adopt() | Readopt() | Release():
            raise ValueError(f"not a netlink operation: {op}")
        case _:
            assert_never(op)


def is_netlink(op: Op) -> bool:
    """Sent in a netlink batch; the rest go through /proc/sys (IPv6 settings) or nftables."""
    if isinstance(op, SetSysctl):
        return by_netlink(op.sysctl)
    return not isinstance(op, NOT_NETLINK)


def _link(index: int) -> Any:
    msg = ifinfmsg()
    msg["index"] = index
    return msg


def _with_attrs(data: bytes, extra: Raw) -> bytes:
    if not extra:
        return data
    tail = b"".join(_attr(kind, value) for kind, value in extra)
    length = len(data) + len(tail)
    return struct.pack("=I", length) + data[4:] + tail


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _inet_conf(op: SetSysctl) -> Raw:
    """IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_x: value } } }."""
    s = op.sysctl
    setting = _attr(IPV4_DEVCONF[s.key], struct.pack("=I", int(s.value)))
    conf = _attr(IFLA_INET_CONF | NLA_F_NESTED, setting)
    inet = _attr(AF_INET | NLA_F_NESTED, conf)
    return [(IFLA_AF_SPEC | NLA_F_NESTED, inet)]


def _expires(r: Route, age: float) -> Raw:
    if r.expires is None or r.family != AF_INET6:
        return []
    return [(RTA_EXPIRES, struct.pack("=I", max(1, r.expires - int(age))))]


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
        if a.rt_priority:  # networkd's DHCP addresses: the prefix route's metric
            attrs.append(("IFA_RT_PRIORITY", a.rt_priority))
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
    msg["flags"] = n.flags if isinstance(op, AddNeighbour) else n.flags & NTF_PROXY
    attrs: list[tuple[str, Any]] = [("NDA_DST", n.dst)]
    if isinstance(op, AddNeighbour):
        msg["state"] = n.state
        if n.lladdr:  # a proxy entry has none
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
    if r.src is not None:
        msg["src_len"] = r.src_len
        attrs.append(("RTA_SRC", r.src))
    if r.gateway:
        attrs.append(("RTA_GATEWAY", r.gateway))
    if r.via:
        family = AF_INET6 if ":" in r.via else AF_INET
        attrs.append(("RTA_VIA", {"family": family, "addr": r.via}))
    if r.prefsrc:
        attrs.append(("RTA_PREFSRC", r.prefsrc))
    if r.metrics:
        attrs.append(("RTA_METRICS", {"attrs": list(r.metrics)}))
    if r.pref is not None:
        attrs.append(("RTA_PREF", r.pref))
    msg["attrs"] = attrs
    return msg


def _rule(r: Rule) -> Any:
    msg = fibmsg()
    msg["family"] = r.family
    msg["action"] = r.action
    msg["table"] = r.table if r.table < 256 else RT_TABLE_COMPAT
    msg["src_len"] = r.src_len
    msg["dst_len"] = r.dst_len
    msg["tos"] = r.tos
    msg["flags"] = r.flags
    attrs: list[tuple[str, Any]] = [
        ("FRA_PRIORITY", r.priority),
        ("FRA_TABLE", r.table),
        *r.attrs,
    ]
    if r.iifname:
        attrs.append(("FRA_IIFNAME", r.iifname))
    if r.oifname:
        attrs.append(("FRA_OIFNAME", r.oifname))
    msg["attrs"] = attrs
    return msg
