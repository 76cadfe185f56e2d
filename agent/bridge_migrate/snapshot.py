"""Read the host over netlink into a HostState: one dump each of links, addresses, routes and
neighbours, kept for the NIC and the bridge."""

from __future__ import annotations

import ipaddress
from typing import Any

from pyroute2 import IPRoute

from .model import (
    AF_INET,
    AF_INET6,
    FOREVER,
    NUD_VALID,
    RT_TABLE_MAIN,
    Address,
    HostState,
    Link,
    Neighbour,
    Route,
)

Msg = Any  # a pyroute2 netlink message: untyped by the library


class DeviceNotFound(LookupError):
    pass


def read_links(ipr: IPRoute) -> dict[str, Link]:
    msgs = list(ipr.get_links())
    names = {m["index"]: m.get("IFLA_IFNAME") for m in msgs}
    links = (_link(m, names) for m in msgs)
    return {link.name: link for link in links}


def default_route_device(ipr: IPRoute, links: dict[str, Link]) -> str | None:
    """The device of the best default route in the main table: IPv4 first, else IPv6."""
    names = {link.index: name for name, link in links.items()}
    for family in (AF_INET, AF_INET6):
        defaults = [
            m
            for m in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
            if m["dst_len"] == 0 and m.get("RTA_OIF") is not None
        ]
        if defaults:
            best = min(defaults, key=lambda m: m.get("RTA_PRIORITY") or 0)
            return names[best.get("RTA_OIF")]
    return None


def read_host(ipr: IPRoute, nic: str, bridge: str) -> HostState:
    """One dump each of links, addresses, routes and neighbours."""
    links = read_links(ipr)
    if nic not in links:
        raise DeviceNotFound(nic)
    wanted = {links[nic].index: nic}
    if bridge in links:
        wanted[links[bridge].index] = bridge
    routes = list(ipr.get_routes())
    return HostState(
        nic=links[nic],
        bridge=links.get(bridge),
        addresses=tuple(
            (wanted[m["index"]], _address(m)) for m in ipr.get_addr() if m["index"] in wanted
        ),
        routes=tuple(
            _route(m, wanted)
            for m in routes
            if m.get("RTA_OIF") in wanted and m.get("RTA_MULTIPATH") is None
        ),
        neighbours=tuple(
            _neighbour(m, wanted[m["ifindex"]])
            for m in ipr.get_neighbours()
            if m["ifindex"] in wanted and _is_carried(m)
        ),
        unsupported=_unsupported(routes, links[nic]),
    )


def _unsupported(routes: list[Msg], nic: Link) -> tuple[str, ...]:
    found = []
    for m in routes:
        hops = m.get("RTA_MULTIPATH") or []
        if m.get("RTA_NH_ID") is not None and m.get("RTA_OIF") in (None, nic.index):
            found.append(f"{_dst(m)} uses nexthop object {m.get('RTA_NH_ID')}")
        elif any(h["oif"] == nic.index for h in hops):
            found.append(f"{_dst(m)} is a multipath route through {nic.name}")
    return tuple(found)


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
    )


def _route(m: Msg, names: dict[int, str]) -> Route:
    metrics = m.get("RTA_METRICS")
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
        flags=m["flags"],
        metrics=tuple(sorted((k, v) for k, v in metrics["attrs"])) if metrics else (),
        pref=m.get("RTA_PREF"),
    )


def _is_carried(m: Msg) -> bool:
    # Multicast entries are made by the kernel on every device; skip them and unresolved ones.
    dst = m.get("NDA_DST")
    lladdr = m.get("NDA_LLADDR")
    return bool(
        dst and lladdr and m["state"] & NUD_VALID and not ipaddress.ip_address(dst).is_multicast
    )


def _neighbour(m: Msg, dev: str) -> Neighbour:
    return Neighbour(
        family=m["family"],
        dst=m.get("NDA_DST"),
        lladdr=m.get("NDA_LLADDR"),
        state=m["state"],
        flags=m["flags"],
        dev=dev,
    )


def _dst(m: Msg) -> str:
    return f"{m.get('RTA_DST')}/{m['dst_len']}" if m["dst_len"] else "default"
