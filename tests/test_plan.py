"""The pure planner, on its own state model: no root, no kernel."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_migrate.model import (
    AF_INET,
    AF_INET6,
    FOREVER,
    IFA_F_NODAD,
    IFA_F_PERMANENT,
    NTF_PROXY,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTPROT_KERNEL,
    Address,
    HostState,
    Link,
    Neighbour,
    Route,
    Rule,
    Sysctl,
)
from bridge_migrate.plan import (
    AddAddress,
    DelAddress,
    ReplaceRoute,
    SetMaster,
    is_migrated,
    plan_takeover,
)
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


LAB = host_with(
    [
        addr("198.18.0.10/24"),
        addr("198.18.0.11/24", label="eth0:1"),
        addr("2001:db8:0:1::10/64"),
        addr("fe80::1/64"),
    ],
    [
        route(None, "198.18.0.1"),
        route("198.19.5.0/24", "198.18.0.2"),
        route(None, "2001:db8:0:1::1", family=AF_INET6),
        route("198.18.0.10/32", None, table=RT_TABLE_LOCAL, protocol=RTPROT_KERNEL, type=2),
    ],
    [Neighbour(AF_INET, "198.18.0.1", "02:00:00:00:00:fe", NUD_REACHABLE, 0, "eth0")],
)


def forward(state: HostState, bridge: str = "br0") -> HostState:
    return simulate(state, [s.do for s in plan_takeover(state, bridge).steps])


def test_make_before_break() -> None:
    plan = plan_takeover(LAB, "br0")
    make = [type(s.do).__name__ for s in plan.make]
    assert plan.make[0].do == SetMaster("eth0", "br0")
    assert make[1:] == sorted(make[1:])  # AddAddress before AddNeighbour
    assert set(make) == {"SetMaster", "AddAddress", "AddNeighbour"}
    batch = [type(s.do).__name__ for s in plan.batch]
    # Routes first; then the NIC's addresses, then its neighbour entries.
    assert batch == sorted(batch, key=["ReplaceRoute", "DelAddress", "DelNeighbour"].index)


def test_secondary_deleted_before_primary_and_link_local_stays() -> None:
    deleted = [
        op.address.address
        for s in plan_takeover(LAB, "br0").batch
        if isinstance(op := s.do, DelAddress)
    ]
    assert deleted == ["2001:db8:0:1::10", "198.18.0.11", "198.18.0.10"]


def test_kernel_routes_are_not_moved() -> None:
    moved = [
        op.old for s in plan_takeover(LAB, "br0").batch if isinstance(op := s.do, ReplaceRoute)
    ]
    assert {r.protocol for r in moved} == {3}
    assert len(moved) == 3


def test_bridge_gets_addresses_labels_and_nodad() -> None:
    after = forward(LAB)
    on_bridge = after.addresses_on("br0")
    assert [a.address for a in on_bridge] == ["198.18.0.10", "198.18.0.11", "2001:db8:0:1::10"]
    assert [a.label for a in on_bridge if a.family == AF_INET] == ["br0", "br0:1"]
    assert on_bridge[2].flags & IFA_F_NODAD
    assert [a.address for a in after.addresses_on("eth0")] == ["fe80::1"]
    assert is_migrated(after, "br0") and not is_migrated(LAB, "br0")


def test_neighbours_are_carried_as_stale_and_static_ones_kept() -> None:
    static = Neighbour(AF_INET, "198.18.0.5", "02:00:00:00:00:05", NUD_PERMANENT, 0, "eth0")
    after = forward(replace(LAB, neighbours=(*LAB.neighbours, static)))
    states = {n.dst: n.state for n in after.neighbours_on("br0")}
    assert states == {"198.18.0.1": NUD_STALE, "198.18.0.5": NUD_PERMANENT}
    assert after.neighbours_on("eth0") == ()


def test_every_step_has_its_inverse_beside_it() -> None:
    plan = plan_takeover(LAB, "br0")
    for i, step in enumerate(plan.steps):
        before = simulate(LAB, [s.do for s in plan.steps[:i]])
        after = _as_restored(simulate(before, [step.do, step.undo]))
        # One step alone may reorder addresses; the whole reversed sequence must not (below).
        assert replace(after, addresses=()) == replace(_as_restored(before), addresses=())
        assert set(after.addresses) == set(before.addresses)


# Property tests on random hosts -----------------------------------------------------------


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


@given(hosts())
@settings(max_examples=300, deadline=None)
def test_plan_then_inverse_gives_back_the_snapshot(state: HostState) -> None:
    plan = plan_takeover(state, "br0")
    after = simulate(state, [s.do for s in plan.steps])
    assert _as_restored(simulate(after, [s.undo for s in reversed(plan.steps)])) == _as_restored(
        state
    )


@given(hosts(), st.data())
@settings(max_examples=300, deadline=None)
def test_any_prefix_of_the_batch_rolls_back_to_the_snapshot(
    state: HostState, data: st.DataObject
) -> None:
    plan = plan_takeover(state, "br0")
    k = data.draw(st.integers(1, len(plan.steps)))
    done = plan.steps[:k]
    partial = simulate(state, [s.do for s in done])
    assert _as_restored(simulate(partial, [s.undo for s in reversed(done)])) == _as_restored(state)


@given(hosts())
@settings(max_examples=200, deadline=None)
def test_takeover_moves_everything_configured(state: HostState) -> None:
    after = forward(state)
    assert after.nic.master == "br0"
    assert not any(a.is_global for a in after.addresses_on("eth0"))
    for family in (AF_INET, AF_INET6):
        moved = [
            a.address
            for a in state.addresses_on("eth0")
            if a.family == family and (family == AF_INET or a.is_global)
        ]
        assert [a.address for a in after.addresses_on("br0") if a.family == family] == moved
    configured = [r for r in state.routes if r.protocol != RTPROT_KERNEL and r.table != 255]
    assert {r.on("br0") for r in configured} <= set(after.routes_on("br0"))
    assert not any(r in after.routes for r in configured)


def _as_restored(state: HostState) -> HostState:
    """Order counts per device and family only; neighbour entries are a set, and dynamic ones
    come back STALE (the kernel re-confirms them)."""
    entries = (n if n.is_static else replace(n, state=NUD_STALE) for n in state.neighbours)
    return replace(
        state,
        addresses=tuple(sorted(state.addresses, key=lambda e: (e[0], e[1].family))),
        neighbours=tuple(sorted(entries, key=lambda n: (n.dev, n.dst))),
        routes=tuple(sorted(state.routes, key=str)),
    )


@pytest.mark.parametrize("bridge", ["br0", "vmbr0"])
def test_bridge_name_shapes_labels(bridge: str) -> None:
    labels = [a.label for a in forward(LAB, bridge).addresses_on(bridge) if a.label]
    assert labels == [bridge, f"{bridge}:1"]
