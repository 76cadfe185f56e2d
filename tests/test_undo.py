"""`bridge-migrate undo`: back from the bridge onto the bare NIC, planned from the live host
(no record), verified, with the takeover's rollback, dead man and exit codes."""

from __future__ import annotations

import pytest

from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import HostView, assert_unchanged, read_view

pytestmark = pytest.mark.root

NODAD = 0x02


def without_nodad(view: HostView) -> HostView:
    """IPv6 addresses come back NODAD, as the takeover put them on the bridge."""
    addresses = tuple((*a[:5], a[5] & ~NODAD, *a[6:]) for a in view.addresses)  # type: ignore[operator]
    return HostView(**{**view.__dict__, "addresses": addresses})


def test_undo_after_apply_gives_the_host_back_to_the_nic(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(lab.host_ns, ["rule add iif eth0 table 100 pref 100"])
    lab.sysctl(lab.host_ns, {"net.ipv4.conf.eth0.rp_filter": 1})
    before = read_view(lab.host_ns)
    assert agent("apply").code == 0
    run = agent("undo", "--json")
    assert run.code == 0, run.stdout + run.stderr
    assert run.json()["result"] == "migrated back"
    after = read_view(lab.host_ns)
    assert after.link("br0") is None
    assert_unchanged(without_nodad(before), without_nodad(after))
    a = lab.addrs
    lab.wait_reachable(lab.host_ns, [a.gw_v4, a.gw_v6, a.far_v4], timeout=3)
    lab.wait_reachable(lab.far_ns, [a.host_v4, a.host_v6], timeout=3)
    again = agent("undo")
    assert again.code == 0 and "nothing to do" in again.stdout


def test_rollback_of_an_undo_puts_the_host_back_on_the_bridge(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0
    migrated = read_view(lab.host_ns)
    assert agent("undo").code == 0
    back = agent("rollback")
    assert back.code == 0, back.stdout + back.stderr
    assert "host equals snapshot" in back.stdout
    now = read_view(lab.host_ns)
    assert now.link("br0") is not None and now.link("eth0")[5] == "br0"  # type: ignore[index]
    assert now.addresses_on("br0") == migrated.addresses_on("br0")


def test_a_dead_gateway_keeps_the_host_on_the_bridge(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0
    migrated = read_view(lab.host_ns)
    lab.kill_gateway("addr")
    run = agent("undo", "--timeout", "2")
    assert run.code == 4, run.stdout + run.stderr
    assert "rolled back" in run.stdout
    assert_unchanged(migrated, read_view(lab.host_ns), learned_may_go=True)


def test_a_bridge_made_by_hand_with_a_guest(lab: Lab, agent: Agent) -> None:
    a = lab.addrs
    lab.ip_batch(
        lab.host_ns,
        [
            "link add br0 type bridge",
            "link set br0 up",
            "link set eth0 master br0",
            f"addr del {a.host_v4_secondary}/24 dev eth0",
            f"addr del {a.host_v4}/24 dev eth0",
            f"addr del {a.host_v6}/64 dev eth0",
            f"addr add {a.host_v4}/24 dev br0",
            f"addr add {a.host_v6}/64 dev br0",
            f"route replace default via {a.gw_v4} dev br0",
            f"route replace default via {a.gw_v6} dev br0",
            "link add guest0 type veth peer name guest1",
            "link set guest0 master br0",
        ],
    )
    before = read_view(lab.host_ns)
    refused = agent("undo")
    assert refused.code == 3, refused.stdout + refused.stderr
    assert "guest0" in refused.stderr and "--detach" in refused.stderr
    # The kernel is still settling the change made by hand (its learned entries).
    assert_unchanged(before, read_view(lab.host_ns), learned_may_go=True)
    run = agent("undo", "--detach", "guest0")
    assert run.code == 0, run.stdout + run.stderr
    after = read_view(lab.host_ns)
    assert after.link("br0") is None and after.link("guest0")[5] is None  # type: ignore[index]
    assert a.host_v4 in after.addresses_on("eth0")
    lab.wait_reachable(lab.host_ns, [a.gw_v4, a.gw_v6, a.far_v4], timeout=3)
