"""Read the host into a HostState: one dump each of links, addresses, routes, rules, neighbours
(and proxy entries) and nexthop objects, the per-device settings, kept for the NIC and the
bridge; and every object bound to the NIC that a move could not carry exactly, named. The dumps
(dump.py) read the network namespace this process is in."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import dump, netfilter, sysctl
from .dump import Fast
from .model import (
    AF_INET,
    AF_INET6,
    FOREVER,
    NTF_PROXY,
    NUD_VALID,
    RT_TABLE_MAIN,
    RTNH_F_ONLINK,
    Address,
    BridgeSide,
    HostState,
    Link,
    Neighbour,
    Route,
    Rule,
    RuleValue,
)

if TYPE_CHECKING:  # `plan` reads the host by dumps and loads no netlink socket layer
    from pyroute2.iproute.linux import IPRoute

Msg = Any  # a pyroute2 netlink message: untyped by the library


class DeviceNotFound(LookupError):
    pass


def read_links(ipr: IPRoute) -> dict[str, Link]:
    return _links(list(ipr.get_links()))


def _links(msgs: list[Msg]) -> dict[str, Link]:
    names = {m["index"]: m.get("IFLA_IFNAME") for m in msgs}
    links = (_link(m, names) for m in msgs)
    return {link.name: link for link in links}


@dataclass(frozen=True)
class Dumps:
    """The links and the routes, dumped once: the NIC is chosen from them, then the host is read
    from them (a thousand routes take tens of milliseconds to decode)."""

    links: tuple[Msg, ...]
    routes: tuple[Fast, ...]


def dump_links_and_routes() -> Dumps:
    return Dumps(tuple(dump.links()), dump.routes())


def links_of(dumps: Dumps) -> dict[str, Link]:
    return _links(list(dumps.links))


def default_route_device(dumps: Dumps) -> str | None:
    """The device of the best default route in the main table: IPv4 first, else IPv6."""
    names = {m["index"]: m.get("IFLA_IFNAME") for m in dumps.links}
    for family in (AF_INET, AF_INET6):
        defaults = [
            m
            for m in dumps.routes
            if m["family"] == family
            and (m.get("RTA_TABLE") or m["table"]) == RT_TABLE_MAIN
            and m["dst_len"] == 0
            and m.get("RTA_OIF") is not None
        ]
        if defaults:
            best = min(defaults, key=lambda m: m.get("RTA_PRIORITY") or 0)
            name: str = names[best.get("RTA_OIF")]
            return name
    return None


RTA_NH_ID = 30  # pyroute2 0.9.7 decodes it as an unknown attribute: read it by number
# Devices stacked on a NIC that cannot follow it into a bridge: enslaving fails (EBUSY) for the
# ones with an rx handler (macvlan, macvtap, ipvlan), and a VLAN stops receiving.
_ON_BRIDGE = (
    "recreate it with the bridge as its parent (Docker: `docker network create -d macvlan -o "
    "parent=BRIDGE ...`), or give the guest a port on the bridge (`bridge-migrate attach`)"
)
_UPPER_FIX = {
    "macvlan": _ON_BRIDGE,
    "macvtap": _ON_BRIDGE,
    "ipvlan": _ON_BRIDGE,
    "ipvtap": _ON_BRIDGE,
    "vlan": "move it onto the bridge (`ip link add link BRIDGE name NAME type vlan id ID`) or "
    "enable vlan_filtering on the bridge, by hand",
}


def read_host(nic: str, bridge: str, dumps: Dumps | None = None) -> HostState:
    """One dump of each kind (links and routes: `dumps`, if given); the per-device settings
    from /proc/sys."""
    dumps = dumps or dump_links_and_routes()
    link_msgs = list(dumps.links)
    links = _links(link_msgs)
    if nic not in links:
        raise DeviceNotFound(nic)
    wanted = {links[nic].index: nic}
    if bridge in links:
        wanted[links[bridge].index] = bridge
    routes = list(dumps.routes)
    proxies = dump.proxy_neighbours()
    rule_msgs = dump.rules()
    rules = [_rule(m) for m in rule_msgs]
    firewall = netfilter.read_rules(nic, bridge)
    return HostState(
        nic=links[nic],
        bridge=links.get(bridge),
        addresses=tuple(
            (wanted[m["index"]], _address(m)) for m in dump.addresses() if m["index"] in wanted
        ),
        routes=tuple(
            _route(m, wanted)
            for m in routes
            if m.get("RTA_OIF") in wanted
            and m.get("RTA_MULTIPATH") is None
            and not _uses_nexthop(m)
        ),
        neighbours=tuple(
            _neighbour(m, wanted[m["ifindex"]])
            for m in map(Fast.of, [*dump.neighbours(), *proxies])
            if m["ifindex"] in wanted and _is_carried(m)
        ),
        unsupported=(
            *_unsupported_routes(routes, links[nic], "the bridge"),
            *_uppers(link_msgs, links[nic]),
            *_unsupported_rules(rule_msgs, nic, "the bridge"),
            *firewall.blockers,
        ),
        firewall=firewall.rules,
        rules=tuple(r for r in rules if r.names(nic) or r.names(bridge)),
        sysctls=sysctl.read(tuple(dict.fromkeys((nic, bridge, "default")))),
    )


def read_bridge_side(bridge: str, detach: tuple[str, ...]) -> BridgeSide:
    """The bridge `undo` would delete, its ports, and what names it that cannot move back onto
    the NIC (the port not in `detach`): the takeover's blockers, with the roles swapped."""
    link_msgs = dump.links()
    links = _links(link_msgs)
    device = links.get(bridge)
    ports = tuple(link for link in links.values() if link.master == bridge)
    side = BridgeSide(bridge, device, ports)
    nic = side.kept_port(detach)
    if device is None or nic is None:
        return side  # refused for that alone
    routes = list(dump.routes())
    return replace(
        side,
        blockers=(
            *_stacked_on_bridge(link_msgs, device, nic.name),
            *_unsupported_routes(routes, device, nic.name),
            *_unsupported_rules(dump.rules(), bridge, nic.name),
            *netfilter.read_nic_rules(bridge, nic.name).blockers,
        ),
    )


def _stacked_on_bridge(msgs: list[Msg], bridge: Link, nic: str) -> list[str]:
    return [
        f"{m.get(('IFLA_LINKINFO', 'IFLA_INFO_KIND')) or 'device'} {m.get('IFLA_IFNAME')} is "
        f"stacked on {bridge.name}, which undo deletes: move it onto {nic}, or remove it, by hand"
        for m in msgs
        if m.get("IFLA_LINK") == bridge.index
        and m["index"] != bridge.index
        and m.get("IFLA_LINK_NETNSID") is None
    ]


def _unsupported_routes(routes: list[Fast], nic: Link, onto: str) -> tuple[str, ...]:
    """What goes through `nic` that cannot be moved to `onto` (the other device)."""
    found = []
    on_nic = {nh for nh, oif in dump.nexthop_objects() if oif == nic.index}
    for nh in sorted(on_nic):
        found.append(
            f"nexthop object {nh} is on {nic.name}: routes through nexthop objects are not "
            f"moved; replace them with plain routes (`ip route replace ... via GW dev "
            f"{nic.name}`) or move the nexthop to {onto} by hand"
        )
    for m in routes:
        hops = m.get("RTA_MULTIPATH") or []
        extra = sorted(set(m.attrs) - _ROUTE_ATTRS)
        if extra and m.get("RTA_OIF") == nic.index:
            found.append(
                f"route {_dst(m)} dev {nic.name} has {', '.join(extra)}, which this tool does "
                f"not carry: move the route to {onto} by hand"
            )
        if _uses_nexthop(m) and m.get("RTA_OIF") == nic.index:
            found.append(f"route {_dst(m)} goes through a nexthop object on {nic.name} (see above)")
        elif any(h["oif"] == nic.index for h in hops):
            found.append(
                f"route {_dst(m)} is a multipath route through {nic.name}: make it a plain "
                f"route for the move, or move it to {onto} by hand"
            )
    return tuple(found)


def _uses_nexthop(m: Fast) -> bool:
    return "UNKNOWN" in m.attrs and any(
        name == "UNKNOWN" and value["header"]["type"] == RTA_NH_ID for name, value in m.msg["attrs"]
    )


def _unsupported_rules(msgs: list[Msg], nic: str, onto: str) -> list[str]:
    found = []
    for m in msgs:
        if nic not in (m.get("FRA_IIFNAME"), m.get("FRA_OIFNAME")):
            continue
        extra = [n for n, _ in m["attrs"] if n not in _RULE_SCALARS | _RULE_SKIPPED]
        if extra:
            found.append(
                f"{_rule(m)} has {', '.join(extra)}, which this tool does not carry: move "
                f"the rule to {onto} by hand (`ip rule`)"
            )
    return found


def _uppers(msgs: list[Msg], nic: Link) -> list[str]:
    found = []
    for m in msgs:
        if m.get("IFLA_LINK") != nic.index or m["index"] == nic.index:
            continue
        if m.get("IFLA_LINK_NETNSID") is not None:
            continue  # a peer in another namespace (veth): not stacked on the NIC
        kind = m.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or "device"
        fix = _UPPER_FIX.get(kind, "")
        found.append(
            f"{kind} {m.get('IFLA_IFNAME')} is stacked on {nic.name} and cannot follow it "
            f"into a bridge: {fix or 'remove it, or move it onto the bridge, by hand'}"
        )
    return found


def _link(m: Msg, names: dict[int, str]) -> Link:
    master = m.get("IFLA_MASTER")
    return Link(
        index=m["index"],
        name=m.get("IFLA_IFNAME"),
        kind=m.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or "",
        mac=m.get("IFLA_ADDRESS") or "",
        mtu=m.get("IFLA_MTU"),
        flags=m["flags"],
        operstate=m.get("IFLA_OPERSTATE") or "UNKNOWN",
        master=names.get(master) if master else None,
    )


def _address(m: Msg) -> Address:
    family = m["family"]
    local = m.get("IFA_LOCAL") if family == AF_INET else None
    address = local or m.get("IFA_ADDRESS")
    peer = m.get("IFA_ADDRESS") if local and m.get("IFA_ADDRESS") != local else None
    cache = m.get("IFA_CACHEINFO") or {}
    return Address(
        family=family,
        address=address,
        prefixlen=m["prefixlen"],
        scope=m["scope"],
        flags=m.get("IFA_FLAGS") or m["flags"],
        label=m.get("IFA_LABEL") if family == AF_INET else None,
        broadcast=m.get("IFA_BROADCAST"),
        peer=peer,
        valid_lft=cache.get("ifa_valid", FOREVER),
        preferred_lft=cache.get("ifa_preferred", FOREVER),
        rt_priority=m.get("IFA_RT_PRIORITY") or 0,
    )


USER_HZ = 100  # RTA_CACHEINFO's rta_expires is in clock ticks


def _route(m: Msg, names: dict[int, str]) -> Route:
    metrics = m.get("RTA_METRICS")
    via = m.get("RTA_VIA")
    expires = (m.get("RTA_CACHEINFO") or {}).get("rta_expires") or 0
    return Route(
        family=m["family"],
        table=m.get("RTA_TABLE") or m["table"],
        dst=m.get("RTA_DST"),
        dst_len=m["dst_len"],
        dev=names[m.get("RTA_OIF")],
        gateway=m.get("RTA_GATEWAY"),
        priority=m.get("RTA_PRIORITY") or 0,
        protocol=m["proto"],
        scope=m["scope"],
        type=m["type"],
        tos=m["tos"],
        prefsrc=m.get("RTA_PREFSRC"),
        flags=m["flags"] & RTNH_F_ONLINK,
        metrics=tuple(sorted((k, v) for k, v in metrics["attrs"])) if metrics else (),
        pref=m.get("RTA_PREF"),
        via=via["addr"] if via else None,
        expires=-(-expires // USER_HZ) if expires > 0 else None,
        src=m.get("RTA_SRC"),
        src_len=m["src_len"],
    )


# Every route attribute the model carries; a route through the NIC with any other (an
# encapsulation, a realm, ...) is refused rather than rewritten without it.
_ROUTE_ATTRS = {
    "RTA_TABLE",
    "RTA_DST",
    "RTA_SRC",
    "RTA_OIF",
    "RTA_GATEWAY",
    "RTA_VIA",
    "RTA_PRIORITY",
    "RTA_PREFSRC",
    "RTA_METRICS",
    "RTA_PREF",
    "RTA_CACHEINFO",
    "RTA_MULTIPATH",  # refused on its own, with its own message
    "UNKNOWN",  # RTA_NH_ID, likewise
}


# Attributes kept as they are; the interface names are fields of their own. FRA_UID_RANGE and
# the port ranges are structures this model does not carry: such a rule is refused.
_RULE_SCALARS = {
    "FRA_DST",
    "FRA_SRC",
    "FRA_GOTO",
    "FRA_FWMARK",
    "FRA_FWMASK",
    "FRA_FLOW",
    "FRA_TUN_ID",
    "FRA_SUPPRESS_IFGROUP",
    "FRA_SUPPRESS_PREFIXLEN",
    "FRA_L3MDEV",
    "FRA_PROTOCOL",
    "FRA_IP_PROTO",
}
_RULE_SKIPPED = {"FRA_IIFNAME", "FRA_OIFNAME", "FRA_PRIORITY", "FRA_TABLE", "FRA_PAD"}


def _rule(m: Msg) -> Rule:
    attrs: list[tuple[str, RuleValue]] = [
        (name, value) for name, value in m["attrs"] if name in _RULE_SCALARS
    ]
    return Rule(
        family=m["family"],
        priority=m.get("FRA_PRIORITY") or 0,
        action=m["action"],
        table=m.get("FRA_TABLE") or m["table"],
        src_len=m["src_len"],
        dst_len=m["dst_len"],
        tos=m["tos"],
        flags=m["flags"],
        iifname=m.get("FRA_IIFNAME"),
        oifname=m.get("FRA_OIFNAME"),
        attrs=tuple(sorted(attrs)),
    )


def _is_carried(m: Msg) -> bool:
    # Multicast entries are made by the kernel on every device; skip them and unresolved ones.
    dst = m.get("NDA_DST")
    if m["flags"] & NTF_PROXY:
        return bool(dst)
    lladdr = m.get("NDA_LLADDR")
    return bool(
        dst and lladdr and m["state"] & NUD_VALID and not ipaddress.ip_address(dst).is_multicast
    )


def _neighbour(m: Msg, dev: str) -> Neighbour:
    return Neighbour(
        family=m["family"],
        dst=m.get("NDA_DST"),
        lladdr=m.get("NDA_LLADDR") or "",
        state=m["state"],
        flags=m["flags"],
        dev=dev,
    )


def _dst(m: Msg) -> str:
    return f"{m.get('RTA_DST')}/{m['dst_len']}" if m["dst_len"] else "default"
