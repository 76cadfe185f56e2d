"""The model against the kernel: hypothesis draws host shapes from every kind the takeover carries
or refuses, builds each in a throwaway lab, runs apply and rollback, and checks, with the tests'
own reader (hostview, not the agent's snapshot code):

- after apply: the host's NIC and bridge hold exactly `simulate(snapshot, plan)`;
- after rollback: the host equals what it was before apply;
- a shape with something that cannot be carried: exit 3, host unchanged.

Each example builds a lab (~2 s): the default profile runs a few in CI;
`HYPOTHESIS_PROFILE=nightly scripts/test -k differential` runs many more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_migrate import serde
from bridge_migrate.model import AF_INET6, Address, HostState, Route, Rule
from bridge_migrate.plan import Plan
from bridge_migrate.simulate import simulate
from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import HostView, assert_unchanged, read_view

pytestmark = pytest.mark.root

settings.register_profile(
    "ci", max_examples=8, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "nightly", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
RT_TABLE_LOCAL = 255


@dataclass(frozen=True)
class Shape:
    """What is added to the lab host before the takeover: `ip -batch` lines, sysctls, an
    nftables ruleset, and whether something on it cannot be carried."""

    ip: tuple[str, ...]
    sysctls: tuple[tuple[str, int], ...]
    nft: str
    refused: bool


ADDRESSES = [
    "addr add 198.18.0.30/24 dev eth0 label eth0:7",
    "addr add 198.18.1.10/24 dev eth0 valid_lft 900 preferred_lft 600",
    "addr add 198.18.2.10/24 dev eth0 noprefixroute",
    "addr add 2001:db8:0:5::10/64 dev eth0 valid_lft 900 preferred_lft 600",
    "addr add 2001:db8:0:1::30/64 dev eth0 valid_lft 1200 preferred_lft 1200",
    "addr add 2001:db8:0:6::10/64 dev eth0",
]
ROUTES = [
    "route add 198.19.8.0/24 via 198.18.0.1 dev eth0 table 100 proto static mtu 1400",
    "route add 198.19.9.0/24 via inet6 2001:db8:0:1::1 dev eth0",
    "route add 198.19.10.0/24 dev eth0 scope link metric 7",
    "route add 198.19.11.0/24 via 198.18.0.2 dev eth0 table 1000 metric 5",
    "route add 2001:db8:77::/48 via 2001:db8:0:1::1 dev eth0 proto ra expires 600 pref high",
    "route add 2001:db8:78::/48 from 2001:db8:0:1::/64 via 2001:db8:0:1::1 dev eth0",
]
RULES = [
    "rule add iif eth0 table 100 pref 100",
    "rule add oif eth0 fwmark 7 table 101 pref 101",
    "rule add from ::/0 iif eth0 table 102 pref 102",
]
NEIGHBOURS = [
    "neigh add 198.18.0.5 lladdr 02:00:00:00:00:05 dev eth0 nud permanent",
    "neigh add 2001:db8:0:1::5 lladdr 02:00:00:00:00:05 dev eth0 nud permanent",
    "neigh add proxy 198.18.0.77 dev eth0",
    "neigh add proxy 2001:db8:0:1::77 dev eth0",
]
SYSCTLS = [
    ("net.ipv4.conf.eth0.rp_filter", 1),
    ("net.ipv4.conf.eth0.arp_ignore", 1),
    ("net.ipv4.conf.eth0.arp_announce", 2),
    ("net.ipv4.conf.eth0.proxy_arp", 1),
    ("net.ipv6.conf.eth0.accept_ra", 0),
    ("net.ipv6.conf.eth0.hop_limit", 33),
]
FIREWALLS = [
    "",
    "table inet host { chain input { type filter hook input priority 0; policy drop;\n"
    '  ct state established,related accept\n  iifname "lo" accept\n'
    '  iifname { "eth0", "lo" } accept\n }\n}\n',
]
UPPERS = ["link add up0 link eth0 type macvlan", "nexthop add id 9 via 198.18.0.1 dev eth0"]


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    def some(items: list[str]) -> list[str]:
        return draw(st.lists(st.sampled_from(items), unique=True, max_size=len(items)))

    uppers = some(UPPERS) if draw(st.integers(0, 5)) == 0 else []
    lines = [*some(ADDRESSES), *some(ROUTES), *some(RULES), *some(NEIGHBOURS), *uppers]
    sysctls = draw(st.lists(st.sampled_from(SYSCTLS), unique=True, max_size=len(SYSCTLS)))
    return Shape(tuple(lines), tuple(sysctls), draw(st.sampled_from(FIREWALLS)), bool(uppers))


@settings(settings.get_profile(PROFILE))
@given(shapes())
def test_kernel_holds_what_the_model_says(
    tmp_path_factory: pytest.TempPathFactory, shape: Shape
) -> None:
    with Lab() as lab:
        lab.ip_batch(lab.host_ns, list(shape.ip))
        if shape.sysctls:
            lab.sysctl(lab.host_ns, dict(shape.sysctls))
        if shape.nft:
            lab.run(lab.host_ns, ["nft", "-f", "-"], input=shape.nft).check_returncode()
        agent = Agent(lab, tmp_path_factory.mktemp("state"))
        before = read_view(lab.host_ns)
        run = agent("apply", "--timeout", "5", "--json")
        if shape.refused:
            assert run.code == 3, run.stdout + run.stderr
            assert_unchanged(before, read_view(lab.host_ns))
            return
        assert run.code == 0, run.stdout + run.stderr
        doc = run.json()
        snapshot = serde.load(HostState, doc["snapshot"])
        plan = serde.load(Plan, doc["plan"])
        desired = simulate(snapshot, [s.do for s in plan.steps])
        assert_holds(desired, read_view(lab.host_ns))
        back = agent("rollback")
        assert back.code == 0, back.stdout + back.stderr
        assert_unchanged(before, read_view(lab.host_ns))


def assert_holds(desired: HostState, actual: HostView) -> None:
    """The NIC and the bridge, as the kernel holds them, are the model's."""
    devices = {desired.nic.name, "br0"}
    assert actual.link("eth0") is not None and actual.link("eth0")[5] == "br0"  # type: ignore[index]
    have_addresses = [
        a for a in actual.addresses if a[0] in devices and not str(a[2]).startswith("fe80:")
    ]
    want_addresses = [
        _address(dev, a) for dev, a in desired.addresses if not a.address.startswith("fe80:")
    ]
    assert have_addresses == want_addresses  # order included
    have_routes = {r for r in actual.routes if r[4] in devices and _compared(r)}
    assert have_routes == {_route(r) for r in desired.routes if _compared(_route(r))}
    have_rules = {r for r in actual.rules if any(pair[1] in devices for pair in r[3:])}  # type: ignore[index]
    assert have_rules == {_rule(r) for r in desired.rules}
    want_proxies = {(n.dev, n.dst) for n in desired.neighbours if n.is_proxy}
    assert {p for p in actual.proxies if p[0] in devices} == want_proxies
    static = {(n.dev, n.dst, n.lladdr, n.state) for n in desired.neighbours if n.is_static}
    assert static == {n for n in actual.neighbours if n[3] and n[0] in devices}
    for s in desired.sysctls:
        if s.dev in devices:
            path = f"ipv{4 if s.family == 2 else 6}/conf/{s.dev}/{s.key}"
            assert actual.sysctl(path) == s.value, path


def _compared(r: tuple[object, ...]) -> bool:
    """As the agent's compare: not the local table, not the IPv6 link-local prefix."""
    kernel = r[7] == 2
    return not (kernel and (r[1] == RT_TABLE_LOCAL or (r[2], r[3]) == ("fe80::", 64)))


def _address(dev: str, a: Address) -> tuple[object, ...]:
    return (
        dev,
        a.family,
        a.address,
        a.prefixlen,
        a.scope,
        a.flags & ~(0x40 | 0x04),
        a.label,
        a.broadcast,
        a.valid_lft == 0xFFFFFFFF,
        a.preferred_lft == 0xFFFFFFFF,
    )


def _route(r: Route) -> tuple[object, ...]:
    return (
        r.family,
        r.table,
        r.dst,
        r.dst_len,
        r.dev,
        r.gateway,
        r.priority if r.priority or r.family == AF_INET6 else None,
        r.protocol,
        r.scope,
        r.type,
        r.prefsrc,
        r.metrics,
        r.via,
        (r.src, r.src_len),
        r.expires is not None,
        r.pref,
        False,
    )


def _rule(r: Rule) -> tuple[object, ...]:
    attrs = [*r.attrs, ("FRA_TABLE", r.table), ("FRA_PRIORITY", r.priority)]
    attrs += [(k, v) for k, v in (("FRA_IIFNAME", r.iifname), ("FRA_OIFNAME", r.oifname)) if v]
    return (r.family, r.action, r.flags, *sorted((str(k), str(v)) for k, v in attrs))
