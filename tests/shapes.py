"""Host shapes for the pure property tests (tests/test_plan.py, tests/test_giveback_plan.py):
a NIC with addresses, routes, neighbour and proxy entries, rules and settings, as the kernel would
list them, and how a restored host compares."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import strategies as st

from bridge_migrate.model import (
    AF_INET,
    AF_INET6,
    FOREVER,
    IFA_F_PERMANENT,
    NTF_PROXY,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    Address,
    HostState,
    Link,
    Neighbour,
    Route,
    Rule,
    Sysctl,
)
from bridge_migrate.plan import AddAddress
from bridge_migrate.simulate import simulate

NIC = Link(1, "eth0", "", "02:00:00:00:00:01", 1500, 0x1043, "UP", None)


def addr(text: str, *, label: str | None = None, lft: int = FOREVER, flags: int = 0) -> Address:
    iface = ipaddress.ip_interface(text)
    v4 = iface.version == 4
    scope = RT_SCOPE_LINK if iface.ip.is_link_local else RT_SCOPE_UNIVERSE
    return Address(
        family=AF_INET if v4 else AF_INET6,
        address=str(iface.ip),
        prefixlen=iface.network.prefixlen,
        scope=scope,
        flags=flags | (IFA_F_PERMANENT if lft == FOREVER else 0),
        label=(label or "eth0") if v4 else None,
        broadcast=None,
        peer=None,
        valid_lft=lft,
        preferred_lft=lft,
    )


def route(dst: str | None, gw: str | None, *, family: int = AF_INET, **kw: object) -> Route:
    net = ipaddress.ip_network(dst) if dst else None
    fields: dict[str, object] = dict(
        family=family,
        table=RT_TABLE_MAIN,
        dst=str(net.network_address) if net else None,
        dst_len=net.prefixlen if net else 0,
        dev="eth0",
        gateway=gw,
        priority=0 if family == AF_INET else 1024,
        protocol=3,
        scope=0,
        type=1,
        tos=0,
        prefsrc=None,
        flags=0,
        metrics=(),
        pref=None,
    )
    fields.update(kw)
    return Route(**fields)  # type: ignore[arg-type]


def host_with(
    addresses: list[Address], routes: list[Route], neighbours: list[Neighbour]
) -> HostState:
    """A host whose NIC got `addresses` in this order, as the kernel would list them."""
    empty = HostState(NIC, None, (), tuple(routes), tuple(neighbours))
    return simulate(empty, [AddAddress("eth0", a) for a in addresses])


@st.composite
def hosts(draw: st.DrawFn) -> HostState:
    v4_nets = draw(st.lists(st.integers(0, 3), min_size=0, max_size=6))
    v4 = [
        addr(
            f"198.18.{net}.{10 + i}/24",
            label=draw(st.sampled_from(["eth0", "eth0:1", None])),
            lft=draw(st.sampled_from([FOREVER, 3600])),
        )
        for i, net in enumerate(v4_nets)
    ]
    v6_count = draw(st.integers(0, 4))
    v6 = [
        addr(f"2001:db8:0:{i}::10/64", lft=draw(st.sampled_from([FOREVER, 600])))
        for i in range(v6_count)
    ]
    if not v4 and not v6:
        v4 = [addr("198.18.0.10/24")]
    link_local = [addr("fe80::1/64")] if draw(st.booleans()) else []
    order = draw(st.permutations([*v4, *v6, *link_local]))
    routes = [route(None, "198.18.0.1")] if draw(st.booleans()) else []
    routes += [
        route(
            f"198.19.{i}.0/24",
            "198.18.0.2",
            table=draw(st.sampled_from([254, 100, 1000])),
            priority=draw(st.integers(0, 5)),
            metrics=(("RTAX_MTU", 1400),) if i % 2 else (),
        )
        for i in range(draw(st.integers(0, 4)))
    ]
    if v6 and draw(st.booleans()):
        routes.append(route(None, "2001:db8:0:0::1", family=AF_INET6))
    if v6 and draw(st.booleans()):  # RA-learned: expiring, a preference, a protocol of its own
        routes.append(
            route(
                "2001:db8:77::/48",
                "2001:db8:0:0::1",
                family=AF_INET6,
                protocol=9,
                pref=1,
                expires=draw(st.integers(1, 1800)),
            )
        )
    if v6 and draw(st.booleans()):  # an IPv4 route through an IPv6 next hop
        routes.append(route("198.19.9.0/24", None, via="2001:db8:0:0::1"))
    if v6 and draw(st.booleans()):  # source-specific
        routes.append(
            route(
                "2001:db8:78::/48",
                "2001:db8:0:0::1",
                family=AF_INET6,
                src="2001:db8:0:0::",
                src_len=64,
            )
        )
    neighbours = [
        Neighbour(
            AF_INET,
            f"198.18.0.{i}",
            f"02:00:00:00:00:{i:02x}",
            draw(st.sampled_from([NUD_REACHABLE, NUD_STALE, NUD_PERMANENT])),
            0,
            "eth0",
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    neighbours += [
        Neighbour(family, dst, "", 0, NTF_PROXY, "eth0")
        for family, dst in draw(
            st.lists(
                st.sampled_from([(AF_INET, "198.18.0.77"), (AF_INET6, "2001:db8::77")]), unique=True
            )
        )
    ]
    state = host_with(list(order), routes, neighbours)
    rules = [
        Rule(AF_INET, 100 + i, 1, 100 + i, 0, 0, 0, 0, *names, (("FRA_FWMARK", i),))
        for i, names in enumerate(
            draw(
                st.lists(
                    st.sampled_from([("eth0", None), (None, "eth0"), ("eth0", "lo")]), max_size=3
                )
            )
        )
    ]
    sysctls = [
        Sysctl(family, dev, key, value)
        for family, key, default in ((AF_INET, "rp_filter", "0"), (AF_INET6, "accept_ra", "1"))
        for dev, value in (("default", default), ("eth0", draw(st.sampled_from(["0", "1", "2"]))))
    ]
    return replace(state, rules=tuple(rules), sysctls=tuple(sysctls))


def as_restored(state: HostState) -> HostState:
    """Order counts per device and family only; neighbour entries are a set, and dynamic ones
    come back STALE (the kernel re-confirms them)."""
    entries = (n if n.is_static else replace(n, state=NUD_STALE) for n in state.neighbours)
    return replace(
        state,
        addresses=tuple(sorted(state.addresses, key=lambda e: (e[0], e[1].family))),
        neighbours=tuple(sorted(entries, key=lambda n: (n.dev, n.dst))),
        routes=tuple(sorted(state.routes, key=str)),
    )
