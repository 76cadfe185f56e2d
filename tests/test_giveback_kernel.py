"""The giveback against the real kernel, without the command line: a migrated host (by the agent,
or by hand with the classic recipe) read, planned and sent inside the lab's host namespace in the
takeover's order, then read back by the tests' own reader."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

import pytest

from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import HostView, assert_unchanged, read_view
from test_fidelity import FIREWALL

pytestmark = pytest.mark.root

# Run inside the host namespace: read, refuse or plan, then send as transaction.take_over does
# (prepare alone, tune, make, wait until the NIC is ready, batch). With "undo", then send every
# inverse, newest first, as rollback.restore orders them; the bridge they start by re-creating
# alone, since the rest name it.
GIVEBACK = """
import json, sys
from pyroute2 import IPRoute
from bridge_migrate.batch import send_batch
from bridge_migrate.giveback import giveback_refusals, plan_giveback, port_refusals
from bridge_migrate.model import AF_INET6
from bridge_migrate.plan import AddAddress
from bridge_migrate.ready import Readiness
from bridge_migrate.rollback import already_so, on_link_first
from bridge_migrate.snapshot import read_bridge_side, read_host, read_links

mode, bridge, detach = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
with IPRoute() as ipr:
    side = read_bridge_side(bridge, detach)
    nic = side.kept_port(detach)
    refused = port_refusals(side, detach)
    if not refused:
        state = read_host(nic.name, bridge)
        refused = giveback_refusals(state, side, detach)
    if refused:
        print(json.dumps({"refused": refused}))
        sys.exit(3)
    plan = plan_giveback(state, bridge, detach)
    resolve = {name: link.index for name, link in read_links(ipr).items()}.__getitem__
    failed = []
    def send(ops):
        result = send_batch(ops, resolve)
        bad = [o for o in result.outcomes if not (o.ok or already_so(o.op, o.error))]
        failed.extend(o.describe() for o in bad)
    ipv6 = tuple(
        s.do.address.address
        for s in plan.steps
        if isinstance(s.do, AddAddress) and s.do.address.family == AF_INET6
    )
    with Readiness(ipr, plan.nic, ipv6) as readiness:
        for steps in ((plan.prepare,), plan.tune, plan.make):
            send([s.do for s in steps])
        waited = readiness.wait()
    send([s.do for s in plan.batch])
    if mode == "undo":
        created, *rest = on_link_first([s.undo for s in reversed(plan.steps)])
        send([created])
        resolve = {name: link.index for name, link in read_links(ipr).items()}.__getitem__
        send(rest)
    print(json.dumps({"failed": failed, "waited": waited}))
"""


IFA_F_NODAD = 0x02


def without_nodad(view: HostView) -> HostView:
    addresses = tuple((*a[:5], a[5] & ~IFA_F_NODAD, *a[6:]) for a in view.addresses)  # type: ignore[operator]
    return replace(view, addresses=addresses)


def nodad(view: HostView) -> set[str]:
    return {str(a[2]) for a in view.addresses if a[1] == 10 and a[5] & IFA_F_NODAD}  # type: ignore[operator]


def give_back(lab: Lab, *detach: str, mode: str = "give") -> dict[str, Any]:
    argv = [sys.executable, "-c", GIVEBACK, mode, "br0", *detach]
    done = lab.run(lab.host_ns, argv, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["failed"] == [], result
    assert result["waited"] is not None, result  # the NIC was ready before the batch
    return result


def assert_back_on_eth0(lab: Lab, view: HostView) -> None:
    a = lab.addrs
    assert view.link("br0") is None
    assert view.link("eth0")[5] is None  # type: ignore[index]  # no master
    assert {a.host_v4, a.host_v4_secondary, a.host_v6} <= set(view.addresses_on("eth0"))
    on_eth0 = {(r[2], r[5]) for r in view.routes if r[4] == "eth0"}
    assert {(None, a.gw_v4), (None, a.gw_v6), ("198.19.5.0", a.router2_v4)} <= on_eth0
    assert not any("br0" in str(r) for r in view.rules)
    lab.wait_reachable(lab.host_ns, [a.gw_v4, a.gw_v6, a.far_v4, a.far_v6], timeout=5)
    lab.wait_reachable(lab.peer_ns, [a.host_v4, a.host_v6], timeout=5)


def test_giveback_after_the_agents_takeover(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        [
            "addr add 2001:db8:0:5::10/64 dev eth0 valid_lft 900 preferred_lft 600",
            "rule add iif eth0 table 100 pref 100",
            "neigh add proxy 198.18.0.77 dev eth0",
        ],
    )
    lab.sysctl(lab.host_ns, {"net.ipv4.conf.eth0.rp_filter": 1})
    lab.run(lab.host_ns, ["nft", "-f", "-"], input=FIREWALL, timeout=10).check_returncode()
    before = read_view(lab.host_ns)
    run = agent("apply", "--timeout", "5")
    assert run.code == 0, run.stdout + run.stderr
    assert '"br0"' in read_view(lab.host_ns).ruleset
    give_back(lab)
    after = read_view(lab.host_ns)
    assert_back_on_eth0(lab, after)
    # The bridge had the NIC's MAC and settings: everything comes back as it was ...
    assert_unchanged(without_nodad(before), without_nodad(after))
    # ... but IPv6 addresses come back without DAD, as the takeover put them on the bridge: the
    # bridge cannot tell which of them had nodad on the NIC before.
    assert nodad(before) == {"2001:db8:0:1::10"} and nodad(after) == {
        "2001:db8:0:1::10",
        "2001:db8:0:5::10",
    }


def test_giveback_of_a_bridge_made_by_hand(lab: Lab) -> None:
    a = lab.addrs
    lab.ip_batch(lab.host_ns, ["link add vguest type veth peer name vguest-p"])
    before = read_view(lab.host_ns)
    mac = before.link("eth0")[2]  # type: ignore[index]
    lab.ip_batch(
        lab.host_ns,
        [
            "link add br0 type bridge",
            f"link set br0 address {mac}",
            "link set br0 up",
            "link set eth0 master br0",
            "link set vguest master br0",  # a guest, named to be detached
            f"addr add {a.host_v4}/24 dev br0",
            f"addr add {a.host_v4_secondary}/24 dev br0",
            f"addr add {a.host_v6}/64 dev br0 nodad",
            f"route replace default via {a.gw_v4} dev br0",
            f"route replace default via {a.gw_v6} dev br0",
            f"route replace {a.static_net} via {a.router2_v4} dev br0",
            f"addr del {a.host_v4_secondary}/24 dev eth0",
            f"addr del {a.host_v4}/24 dev eth0",
            f"addr del {a.host_v6}/64 dev eth0",
        ],
    )
    lab.wait_reachable(lab.host_ns, [a.gw_v4, a.gw_v6], timeout=5)
    bridged = read_view(lab.host_ns)
    refused = lab.run(lab.host_ns, [sys.executable, "-c", GIVEBACK, "give", "br0"], timeout=30)
    assert refused.returncode == 3 and "guests attached to br0: vguest" in refused.stdout
    give_back(lab, "vguest")
    after = read_view(lab.host_ns)
    assert_back_on_eth0(lab, after)
    assert after.link("vguest")[5] is None  # type: ignore[index]  # detached, left alone
    # The recipe's addresses are the lab's own again (same flags, labels made from the device's
    # name, routes `proto boot`). What differs: the NIC ran as a port with settings of its own,
    # the host with the bridge's (a new device's); the NIC now has the bridge's. The recipe
    # flushed the NIC's IPv4 neighbour entries: the NIC has those the bridge learned since.
    changed = after.sysctls - before.sysctls
    assert changed and all(path.split("/")[2] == "eth0" for path, _ in changed)
    for path, value in changed:
        assert before.sysctl(path.replace("/eth0/", "/default/")) == value, path
    learned = {("eth0", *n[1:]) for n in bridged.neighbours if n[0] == "br0"}
    assert learned and learned <= after.neighbours
    assert_unchanged(replace(before, sysctls=after.sysctls, neighbours=after.neighbours), after)


def test_what_names_the_bridge_and_cannot_move_back_is_refused(lab: Lab, agent: Agent) -> None:
    assert agent("apply", "--timeout", "5").code == 0
    lab.ip_batch(
        lab.host_ns,
        [
            "link add up0 link br0 type macvlan",
            "nexthop add id 7 via 198.18.0.1 dev br0",
            "route add 198.19.10.0/24 nhid 7",
        ],
    )
    before = read_view(lab.host_ns)
    done = lab.run(lab.host_ns, [sys.executable, "-c", GIVEBACK, "give", "br0"], timeout=30)
    assert done.returncode == 3, done.stdout + done.stderr
    refused = json.loads(done.stdout)["refused"]
    assert any(r.startswith("macvlan up0 is stacked on br0") for r in refused), refused
    assert any(r.startswith("nexthop object 7 is on br0") for r in refused), refused
    assert any("198.19.10.0/24" in r for r in refused), refused
    assert_unchanged(before, read_view(lab.host_ns))


def test_the_inverse_of_the_giveback_puts_the_host_back_on_the_bridge(
    lab: Lab, agent: Agent
) -> None:
    lab.ip_batch(
        lab.host_ns,
        [
            "addr add 2001:db8:0:5::10/64 dev eth0 valid_lft 900 preferred_lft 600",
            "rule add iif eth0 table 100 pref 100",
            "neigh add proxy 198.18.0.77 dev eth0",
        ],
    )
    lab.sysctl(lab.host_ns, {"net.ipv4.conf.eth0.rp_filter": 1, "net.ipv6.conf.eth0.hop_limit": 33})
    lab.run(lab.host_ns, ["nft", "-f", "-"], input=FIREWALL, timeout=10).check_returncode()
    assert agent("apply", "--timeout", "5").code == 0
    migrated = read_view(lab.host_ns)
    give_back(lab, mode="undo")
    a = lab.addrs
    lab.wait_reachable(lab.host_ns, [a.gw_v4, a.gw_v6], timeout=5)
    assert_unchanged(migrated, read_view(lab.host_ns))
