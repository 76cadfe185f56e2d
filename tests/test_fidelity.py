"""Everything bound to the NIC is carried to the bridge exactly, and put back exactly, or the
takeover is refused before anything changes: against the real kernel, read back by the tests'
own reader."""

from __future__ import annotations

import errno
import json
import sys

import pytest
from pyroute2 import IPRoute

from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import HostView, assert_unchanged, read_view

pytestmark = pytest.mark.root


def migrate_then_roll_back(lab: Lab, agent: Agent) -> tuple[HostView, HostView]:
    """apply (exit 0), then rollback (exit 0, host read back equal to before)."""
    before = read_view(lab.host_ns)
    run = agent("apply", "--timeout", "5")
    assert run.code == 0, run.stdout + run.stderr
    migrated = read_view(lab.host_ns)
    back = agent("rollback")
    assert back.code == 0, back.stdout + back.stderr
    assert "host equals snapshot" in back.stdout
    assert_unchanged(before, read_view(lab.host_ns))
    return before, migrated


def routes_on(view: HostView, dev: str) -> set[tuple[object, ...]]:
    return {r for r in view.routes if r[4] == dev}


def route_dev(lab: Lab, dst: str) -> str:
    """The device the host itself would send to `dst` through (RTM_GETROUTE)."""
    with IPRoute(netns=lab.host_ns, flags=0) as ipr:
        (answer,) = ipr.route("get", dst=dst)
        index = answer.get("RTA_OIF")
        return str(ipr.get_links(index)[0].get("IFLA_IFNAME"))


def test_expiring_ipv6_address_leaves_no_prefix_route_on_the_nic(lab: Lab, agent: Agent) -> None:
    # A SLAAC/DHCPv6 host: the only address of its prefix has finite lifetimes, so the kernel
    # keeps `PREFIX dev eth0 proto kernel expires` after the address leaves eth0.
    lab.ip_batch(
        lab.host_ns,
        ["addr add 2001:db8:0:5::10/64 dev eth0 valid_lft 900 preferred_lft 600"],
    )
    before, migrated = migrate_then_roll_back(lab, agent)
    prefix = [r for r in before.routes if r[2] == "2001:db8:0:5::"]
    assert prefix and prefix[0][4] == "eth0" and prefix[0][14] is True  # expiring, on eth0
    assert not [r for r in routes_on(migrated, "eth0") if r[2] == "2001:db8:0:5::"]
    assert [r for r in routes_on(migrated, "br0") if r[2] == "2001:db8:0:5::"]


def test_host_routes_through_the_bridge_after_the_takeover(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns, ["addr add 2001:db8:0:5::10/64 dev eth0 valid_lft 900 preferred_lft 600"]
    )
    assert agent("apply", "--timeout", "5").code == 0
    for dst in ("2001:db8:0:5::99", lab.addrs.gw_v4, lab.addrs.gw_v6, lab.addrs.far_v4):
        assert route_dev(lab, dst) == "br0", dst


def test_route_attributes_are_carried_and_restored(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        [
            # RA-learned shape: expires, preference.
            "route add 2001:db8:77::/48 via 2001:db8:0:1::1 dev eth0 proto ra expires 600 "
            "pref high",
            # An IPv4 route through an IPv6 next hop (RTA_VIA).
            "route add 198.19.9.0/24 via inet6 2001:db8:0:1::1 dev eth0",
            # Metrics, another table, a protocol of its own.
            "route add 198.19.8.0/24 via 198.18.0.1 dev eth0 table 100 proto static mtu 1400",
            # A source-specific IPv6 route.
            "route add 2001:db8:78::/48 from 2001:db8:0:1::/64 via 2001:db8:0:1::1 dev eth0",
        ],
    )
    before, migrated = migrate_then_roll_back(lab, agent)
    for dst in ("2001:db8:77::", "198.19.9.0", "198.19.8.0", "2001:db8:78::"):
        (was,) = [r for r in before.routes if r[2] == dst]
        (now,) = [r for r in migrated.routes if r[2] == dst]
        assert was[4] == "eth0" and now[4] == "br0"
        assert (*was[:4], *was[5:]) == (*now[:4], *now[5:]), dst  # all else equal
    ra = next(r for r in migrated.routes if r[2] == "2001:db8:77::")
    assert ra[14] is True and ra[7] == 9  # still expiring, still proto ra


def test_manager_subnet_route_for_noprefixroute_address(lab: Lab, agent: Agent) -> None:
    # NetworkManager's shape: `noprefixroute` addresses, the subnet route its own (proto kernel,
    # metric 100), the default route through it.
    a = lab.addrs
    lab.ip_batch(
        lab.host_ns,
        [
            f"addr del {a.host_v4_secondary}/24 dev eth0",
            f"addr del {a.host_v4}/24 dev eth0",  # the last IPv4 address: its routes go too
            f"addr add {a.host_v4}/24 dev eth0 noprefixroute",
            f"route add 198.18.0.0/24 dev eth0 proto kernel scope link src {a.host_v4} metric 100",
            f"route add default via {a.gw_v4} dev eth0 proto static metric 100",
        ],
    )
    _, migrated = migrate_then_roll_back(lab, agent)
    assert any(r[2] == "198.18.0.0" and r[6] == 100 for r in routes_on(migrated, "br0"))
    assert {r[2] for r in routes_on(migrated, "eth0") if r[1] == 254} <= {"fe80::"}


def test_address_metric_gives_its_prefix_route_the_same_metric_on_the_bridge(
    lab: Lab, agent: Agent
) -> None:
    # systemd-networkd's DHCP shape: `metric 1024` on the address (IFA_RT_PRIORITY), so the
    # kernel's own prefix route has that metric; without it the bridge's would have metric 0.
    a = lab.addrs
    lab.ip_batch(
        lab.host_ns,
        [
            f"addr del {a.host_v4_secondary}/24 dev eth0",
            f"addr del {a.host_v4}/24 dev eth0",
            f"addr add {a.host_v4}/24 dev eth0 metric 1024 valid_lft 600 preferred_lft 600",
            f"route add default via {a.gw_v4} dev eth0 proto dhcp metric 1024",
        ],
    )
    _, migrated = migrate_then_roll_back(lab, agent)
    prefix = {r[6] for r in routes_on(migrated, "br0") if r[2] == "198.18.0.0" and r[1] == 254}
    assert prefix == {1024}


def test_per_device_settings_are_copied(lab: Lab, agent: Agent) -> None:
    tuned = {
        "net.ipv4.conf.eth0.rp_filter": 1,
        "net.ipv4.conf.eth0.arp_ignore": 1,
        "net.ipv4.conf.eth0.arp_announce": 2,
        "net.ipv4.conf.eth0.proxy_arp": 1,
        "net.ipv4.conf.eth0.forwarding": 1,
        "net.ipv6.conf.eth0.accept_ra": 0,
        "net.ipv6.conf.eth0.forwarding": 1,
        "net.ipv6.conf.eth0.hop_limit": 33,
    }
    lab.sysctl(lab.host_ns, tuned)
    _, migrated = migrate_then_roll_back(lab, agent)
    for key, value in tuned.items():
        path = key.removeprefix("net.").replace(".", "/").replace("/eth0/", "/br0/")
        assert migrated.sysctl(path) == str(value), path


def test_policy_rules_naming_the_nic_follow_it(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        [
            "rule add iif eth0 table 100 pref 100",
            "rule add oif eth0 fwmark 7 table 101 pref 101",
            "rule add from ::/0 iif eth0 table 102 pref 102",
        ],
    )
    before, migrated = migrate_then_roll_back(lab, agent)

    def naming(view: HostView, dev: str) -> int:
        return sum(1 for r in view.rules if ("FRA_IIFNAME", dev) in r or ("FRA_OIFNAME", dev) in r)

    assert naming(before, "eth0") == 3 and naming(migrated, "br0") == 3
    assert naming(migrated, "eth0") == 0


def test_proxy_entries_follow_the_nic(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        [
            "neigh add proxy 198.18.0.77 dev eth0",
            "neigh add proxy 2001:db8:0:1::77 dev eth0",
        ],
    )
    before, migrated = migrate_then_roll_back(lab, agent)
    assert before.proxies == {("eth0", "198.18.0.77"), ("eth0", "2001:db8:0:1::77")}
    assert migrated.proxies == {("br0", "198.18.0.77"), ("br0", "2001:db8:0:1::77")}


@pytest.mark.parametrize("kind", ["macvlan", "macvtap"])
def test_upper_device_is_refused_by_name(lab: Lab, agent: Agent, kind: str) -> None:
    # (VLAN and ipvlan devices cannot be made here: this kernel has no 8021q, no ipvlan.)
    lab.ip_batch(lab.host_ns, [f"link add up0 link eth0 type {kind}"])
    before = read_view(lab.host_ns)
    run = agent("apply")
    assert run.code == 3, run.stdout + run.stderr
    assert f"{kind} up0 is stacked on eth0" in run.stderr
    assert "bridge-migrate attach" in run.stderr and "Nothing was changed" in run.stderr
    assert_unchanged(before, read_view(lab.host_ns))
    plan = agent("plan", "--json")
    assert plan.code == 3 and f"{kind} up0" in plan.json()["message"]
    assert any(f"{kind} up0 is stacked on eth0" in b for b in plan.json()["blockers"])


@pytest.mark.parametrize(
    ("setup", "named"),
    [
        (
            ["nexthop add id 7 via 198.18.0.1 dev eth0", "route add 198.19.10.0/24 nhid 7"],
            ["nexthop object 7 is on eth0", "198.19.10.0/24"],
        ),
        (
            ["route add 198.19.12.0/24 via 198.18.0.1 dev eth0 realm 5"],
            ["route 198.19.12.0/24 dev eth0 has RTA_FLOW"],
        ),
        (
            ["rule add iif eth0 uidrange 1000-2000 table 100 pref 100"],
            ["rule pref 100 iif eth0 table 100 has FRA_UID_RANGE"],
        ),
    ],
    ids=["nexthop-object", "route-realm", "rule-uid-range"],
)
def test_what_cannot_be_carried_is_refused_by_name(
    lab: Lab, agent: Agent, setup: list[str], named: list[str]
) -> None:
    lab.ip_batch(lab.host_ns, setup)
    before = read_view(lab.host_ns)
    run = agent("apply")
    assert run.code == 3, run.stdout + run.stderr
    assert all(text in run.stderr for text in named), run.stderr
    assert_unchanged(before, read_view(lab.host_ns))


def test_plan_lists_what_it_carries_per_kind(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        ["rule add iif eth0 table 100 pref 100", "neigh add proxy 198.18.0.77 dev eth0"],
    )
    lab.sysctl(lab.host_ns, {"net.ipv4.conf.eth0.rp_filter": 1})
    text = agent("plan")
    assert text.code == 0, text.stderr
    assert "1 policy rules" in text.stdout and "1 proxy entries" in text.stdout
    assert "set net.ipv4.conf.br0.rp_filter = 1" in text.stdout
    assert "add rule pref 100 iif br0 table 100" in text.stdout
    doc = agent("plan", "--json").json()
    assert doc["carried"]["policy rules"] == 1 and doc["carried"]["settings"] >= 1
    assert doc["carried"]["proxy entries"] == 1


FIREWALL = """
table inet host {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "eth0" ip6 nexthdr ipv6-icmp accept
    iifname { "eth0", "lo" } icmp type echo-request accept
    iifname "eth0" udp dport 7 accept
    meta iifname "eth0" counter drop comment "the NIC's drop rule"
  }
}
table bridge guard {
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "eth0" counter
  }
}
"""


def test_firewall_naming_the_nic_is_rewritten_in_one_transaction(lab: Lab, agent: Agent) -> None:
    # The most common host firewall: drop policy, accept what arrives on the NIC. Without the
    # rewrite, neighbour discovery on br0 is dropped (the IPv6 gateway probe fails) and the
    # LAN's new pings are too.
    lab.run(lab.host_ns, ["nft", "-f", "-"], input=FIREWALL, timeout=10).check_returncode()
    plan = agent("plan")
    assert plan.code == 0, plan.stderr
    assert "nftables inet host input handle" in plan.stdout and '-> iifname "br0"' in plan.stdout
    before, migrated = migrate_then_roll_back(lab, agent)
    assert migrated.ruleset.count('"br0"') == 4 and '"eth0"' in migrated.ruleset  # bridge family
    assert before.ruleset.count('"br0"') == 0
    # Migrated again, the LAN's new pings get through the rewritten rules.
    assert agent("apply", "--timeout", "5").code == 0
    a = lab.addrs
    lab.wait_reachable(lab.peer_ns, [a.host_v4, a.host_v6], timeout=3)


def test_firewall_rule_that_cannot_be_rewritten_is_refused(lab: Lab, agent: Agent) -> None:
    rules = 'table inet t {\n set ifs { type ifname; elements = { "eth0" }; }\n'
    rules += " chain c { type filter hook input priority 0; iifname @ifs accept; }\n}\n"
    lab.run(lab.host_ns, ["nft", "-f", "-"], input=rules, timeout=10).check_returncode()
    before = read_view(lab.host_ns)
    run = agent("apply")
    assert run.code == 3, run.stdout + run.stderr
    assert "ifs" in run.stderr and "Nothing was changed" in run.stderr
    assert_unchanged(before, read_view(lab.host_ns))


def test_the_check_names_the_device_the_host_would_send_through(lab: Lab) -> None:
    """wrong_way, asked before any takeover: every next hop and moved prefix is still reached
    through eth0, and each is named, with eth0."""
    code = (
        "import json\n"
        "from bridge_migrate.snapshot import read_host\n"
        "from bridge_migrate.verify import wrong_way\n"
        "state = read_host('eth0', 'br0')\n"
        "print(json.dumps([wrong_way(state, state, 'eth0', n) for n in ('br0', 'eth0')]))\n"
    )
    done = lab.run(lab.host_ns, [sys.executable, "-c", code], timeout=30)
    assert done.returncode == 0, done.stderr
    found, through_eth0 = json.loads(done.stdout)
    assert through_eth0 == []
    assert found and all(line.endswith("via eth0, not br0") for line in found)
    assert any(lab.addrs.gw_v4 in line for line in found), found


def test_routes_to_answers_as_ip_route_get_does(lab: Lab) -> None:
    """dump.routes_to (the check's RTM_GETROUTE, every request in one send): for each address
    the device `ip route get` names, or the kernel's error, each in its place."""
    lab.ip_batch(
        lab.host_ns, ["route add unreachable 203.0.113.0/24", "route add prohibit 2001:db8:77::/64"]
    )
    asked = [lab.addrs.gw_v4, "203.0.113.5", lab.addrs.gw_v6, "127.0.0.1", "2001:db8:77::1"]
    code = (
        "import json, sys\n"
        "from bridge_migrate import dump\n"
        "answers = dump.routes_to(sys.argv[1:])\n"
        "print(json.dumps([['errno', a.errno] if isinstance(a, OSError) else ['oif', a]"
        " for a in answers]))\n"
    )
    done = lab.run(lab.host_ns, [sys.executable, "-c", code, *asked], timeout=30)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    links = json.loads(lab.run(lab.host_ns, ["ip", "-j", "link", "show"], check=True).stdout)
    index = {link["ifname"]: link["ifindex"] for link in links}
    for dst, answer in zip(asked, answers, strict=True):
        got = lab.run(lab.host_ns, ["ip", "-j", "route", "get", dst])
        if got.returncode == 0:
            assert answer == ["oif", index[json.loads(got.stdout)[0]["dev"]]], (dst, answer)
        else:
            assert answer[0] == "errno", (dst, answer)
    assert answers[1] == ["errno", errno.EHOSTUNREACH], answers
    assert answers[4] == ["errno", errno.EACCES], answers


def test_route_dump_decodes_as_pyroute2_does(lab: Lab) -> None:
    """dump.routes() decodes plain routes with struct: the snapshot must be what pyroute2's
    decoding gives, route by route, for every kind the lab can make (tables, metrics, source
    routes, preferences, lifetimes, blackholes, multipath: the last by pyroute2 itself)."""
    lab.ip_batch(
        lab.host_ns,
        [
            "route add 203.0.113.0/24 via 198.18.0.1 dev eth0 mtu lock 1400 advmss 1300 table 100",
            "route add blackhole 203.0.114.0/24",
            "route add 2001:db8:9::/64 via 2001:db8:0:1::1 dev eth0 expires 300 pref high",
            "route add 2001:db8:a::/64 from 2001:db8:0:1::10 via 2001:db8:0:1::1 dev eth0",
            "route add 203.0.115.0/24 nexthop via 198.18.0.1 dev eth0"
            " nexthop via 198.18.0.2 dev eth0",
            "route add 203.0.116.0/24 via 198.18.0.99 dev eth0 src 198.18.0.10 onlink",
        ],
    )
    done = lab.run(lab.host_ns, [sys.executable, "-c", _COMPARE_DUMPS], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# Run inside the host's namespace: the raw dump reads the namespace it runs in.
_COMPARE_DUMPS = """
from dataclasses import replace
from pyroute2 import IPRoute
from bridge_migrate import dump
from bridge_migrate.snapshot import _route, _unsupported_routes, read_links
with IPRoute() as ipr:
    slow = [dump.Fast.of(m) for m in ipr.get_routes()]
    links = read_links(ipr)
fast = dump.routes()
names = {link.index: name for name, link in links.items()}
assert len(fast) == len(slow), (len(fast), len(slow))
assert sum(f.msg is None for f in fast) >= len(fast) - 1, "the plain routes went to pyroute2"
for a, b in zip(slow, fast, strict=True):
    assert a.fields["family"] == b["family"] and a.get("RTA_DST") == b.get("RTA_DST")
    if a.get("RTA_OIF") in names and a.get("RTA_MULTIPATH") is None:
        ra, rb = _route(a, names), _route(b, names)
        assert replace(ra, expires=None) == replace(rb, expires=None), (ra, rb)
        assert abs((ra.expires or 0) - (rb.expires or 0)) <= 1, (ra, rb)  # a moment apart
nic = links["eth0"]
assert _unsupported_routes(slow, nic, "br0") == _unsupported_routes(list(fast), nic, "br0")
"""


def test_address_dump_decodes_as_pyroute2_does(lab: Lab) -> None:
    """dump.addresses() decodes plain addresses with struct: each must be what pyroute2's
    decoding gives, field by field and attribute by attribute (labels, peers, broadcasts,
    secondaries, lifetimes, IPv6 flags, metrics), and the snapshot's Address the same."""
    lab.ip_batch(
        lab.host_ns,
        [
            "addr add 198.18.0.40/24 dev eth0 label eth0:lbl broadcast 198.18.0.255",
            "addr add 198.18.0.41/24 dev eth0 valid_lft 300 preferred_lft 200",
            "addr add 203.0.113.1 peer 203.0.113.2/32 dev eth0",
            "addr add 2001:db8:0:1::40/64 dev eth0 nodad noprefixroute",
            "addr add 2001:db8:0:1::41/64 dev eth0 nodad valid_lft 300 preferred_lft 0",
            "addr add 2001:db8:9::1/64 dev eth0 nodad metric 77",
        ],
    )
    done = lab.run(lab.host_ns, [sys.executable, "-c", _COMPARE_ADDRESSES], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout) >= 10, "addresses compared"


# Run inside the host's namespace, as _COMPARE_DUMPS.
_COMPARE_ADDRESSES = """
from dataclasses import replace
from pyroute2 import IPRoute
from bridge_migrate import dump
from bridge_migrate.snapshot import _address
with IPRoute() as ipr:
    slow = [dump.Fast.of(m) for m in ipr.get_addr()]
fast = dump.addresses()
assert len(fast) == len(slow), (len(fast), len(slow))
assert all(f.msg is None for f in fast), "a plain address went to pyroute2"
for a, b in zip(slow, fast, strict=True):
    assert {k: a[k] for k in b.fields} == b.fields, (a.fields, b.fields)
    ca, cb = a.attrs.get("IFA_CACHEINFO", {}), b.attrs.get("IFA_CACHEINFO", {})
    assert ca.keys() == cb.keys() and all(abs(ca[k] - cb[k]) <= 1 for k in ca), (ca, cb)  # ticks
    rest = {k: v for k, v in a.attrs.items() if k not in ("IFA_UNSPEC", "IFA_CACHEINFO")}
    assert rest == {k: v for k, v in b.attrs.items() if k != "IFA_CACHEINFO"}, (a.attrs, b.attrs)
    sa, sb = _address(a), _address(b)
    assert abs(sa.valid_lft - sb.valid_lft) <= 1 and abs(sa.preferred_lft - sb.preferred_lft) <= 1
    untimed = {"valid_lft": 0, "preferred_lft": 0}
    assert replace(sa, **untimed) == replace(sb, **untimed), (sa, sb)
print(len(fast))
"""
