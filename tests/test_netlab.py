"""Tests for netlab: the namespace lab and the ICMP outage meter. Root only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from bridge_migrate_testlab import Lab, MeterResult

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as built:
        yield built


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def ip_json(lab: Lab, ns: str, *args: str) -> list[dict[str, Any]]:
    done = lab.run(ns, ["ip", "-j", *args], check=True, timeout=10)
    result: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return result


def measure(lab: Lab, ns: str, targets: Sequence[str], seconds: float) -> MeterResult:
    handle = lab.start_meter(ns, targets)
    time.sleep(seconds)
    return handle.stop()


def flap_host_nic(lab: Lab, seconds: float) -> float:
    """Set the host's eth0 down for `seconds`; returns how long it really was down."""
    lab.run(lab.host_ns, ["ip", "link", "set", lab.nic, "down"], check=True)
    down = time.monotonic()
    time.sleep(seconds)
    up = time.monotonic()
    lab.run(lab.host_ns, ["ip", "link", "set", lab.nic, "up"], check=True)
    return up - down


def assert_consistent(result: MeterResult) -> None:
    for s in result.streams:
        assert s.sent == s.received + s.late + s.lost, s
        assert len(s.lost_probes) == min(s.lost, 2000)


# -- life cycle ---------------------------------------------------------------------------


def test_builds_the_topology_and_removes_it() -> None:
    with Lab() as lab:
        assert set(lab.namespaces) <= netns_names()
        a = lab.addrs
        assert {link["ifname"] for link in ip_json(lab, lab.host_ns, "link")} == {"lo", "eth0"}
        infos = ip_json(lab, lab.host_ns, "addr", "show", "dev", "eth0")[0]["addr_info"]
        v4 = {
            (i["local"], i["prefixlen"], bool(i.get("secondary")))
            for i in infos
            if i["family"] == "inet"
        }
        assert v4 == {(a.host_v4, 24, False), (a.host_v4_secondary, 24, True)}
        assert any(i["local"] == a.host_v6 and i["prefixlen"] == 64 for i in infos)
        routes = {(r["dst"], r.get("gateway")) for r in ip_json(lab, lab.host_ns, "route")}
        assert {("default", a.gw_v4), (a.static_net, a.router2_v4)} <= routes
        routes6 = {(r["dst"], r.get("gateway")) for r in ip_json(lab, lab.host_ns, "-6", "route")}
        assert ("default", a.gw_v6) in routes6
    assert not set(lab.namespaces) & netns_names()


@pytest.mark.parametrize("promote", [None, 1])
def test_host_sysctls_are_pinned_and_can_be_overridden(promote: int | None) -> None:
    # The host's IPv4 settings must not depend on the machine's: deleting the primary address
    # takes the secondary along unless promote_secondaries is set for the lab.
    key = "net.ipv4.conf.eth0.promote_secondaries"
    with Lab(host_sysctls={key: promote} if promote else None) as lab:
        a = lab.addrs
        lab.run(lab.host_ns, ["ip", "addr", "del", f"{a.host_v4}/24", "dev", "eth0"], check=True)
        left = ip_json(lab, lab.host_ns, "-4", "addr", "show", "dev", "eth0")  # [] if none
        assert [i["local"] for d in left for i in d["addr_info"]] == (
            [a.host_v4_secondary] if promote else []
        )


def test_cleans_up_and_kills_processes_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        sleeper = lab.popen(lab.peer_ns, ["sleep", "30"])
        lab.start_meter(lab.far_ns, [lab.addrs.gw_v4])  # never stopped by the test
        raise RuntimeError("boom")
    assert sleeper.returncode is not None
    assert not set(lab.namespaces) & netns_names()


def test_a_taken_prefix_fails_without_touching_the_owner() -> None:
    with Lab() as first:
        with pytest.raises(RuntimeError, match="netns add"), Lab(prefix=first.prefix):
            pass
        assert set(first.namespaces) <= netns_names()
        first.wait_reachable(first.host_ns, [first.addrs.gw_v4], timeout=2)


def test_guards_need_no_namespaces() -> None:
    lab = Lab(prefix="bmguard")
    with pytest.raises(ValueError):
        lab.run("scratch", ["true"])  # only the lab's own namespaces
    with pytest.raises(ValueError):
        lab.kill_gateway("unplug")
    with pytest.raises(ValueError):
        Lab(prefix="../etc")


# -- reachability and the meter -----------------------------------------------------------


def test_healthy_lab_loses_nothing_on_either_family(lab: Lab) -> None:
    a = lab.addrs
    handles = [
        lab.start_meter(lab.host_ns, [a.gw_v4, a.gw_v6, a.peer_v4, a.peer_v6, a.far_v4, a.far_v6]),
        lab.start_meter(lab.peer_ns, [a.host_v4, a.host_v4_secondary, a.host_v6]),
        lab.start_meter(lab.far_ns, [a.host_v4, a.host_v6]),  # replies need the host's defaults
    ]
    time.sleep(0.5)
    for result in [h.stop() for h in handles]:
        assert_consistent(result)
        for s in result.streams:
            assert s.lost == s.late == s.max_missed_run == 0 and s.sent >= 300, s
            # A gap without loss is the meter itself stalling (CPU-starved parallel runs).
            assert s.longest_gap_ms < 50 + result.max_send_lag_ms, (s, result.max_send_lag_ms)


def test_meter_measures_a_nic_outage(lab: Lab) -> None:
    a = lab.addrs
    handle = lab.start_meter(lab.peer_ns, [a.host_v4, a.host_v6])
    time.sleep(0.2)
    down_for = flap_host_nic(lab, 0.2)
    time.sleep(0.3)
    result = handle.stop()
    assert_consistent(result)
    v4 = result.stream(a.host_v4)
    assert v4.lost >= 100 and v4.received >= 300
    down_ms = down_for * 1000
    assert down_ms - 20 <= v4.longest_loss_ms <= down_ms + 100, (down_for, v4)
    assert down_ms - 20 <= v4.longest_gap_ms <= down_ms + 100 + result.max_send_lag_ms
    assert 100 <= v4.longest_gap_at_ms <= 400
    assert v4.lost_probes[0].sent_ms == v4.longest_loss_at_ms >= v4.longest_gap_at_ms
    # Kernel behaviour worth knowing: link down drops the NIC's IPv6 addresses
    # (keep_addr_on_down=0), so the v6 stream never recovers.
    v6 = result.stream(a.host_v6)
    assert v6.longest_gap_at_ms + v6.longest_gap_ms == pytest.approx(result.duration_ms, abs=1)


def test_meter_reports_late_replies_apart(lab: Lab) -> None:
    handle = lab.start_meter(lab.host_ns, [lab.addrs.gw_v4], late_ms=0.001)
    time.sleep(0.1)
    s = handle.stop().stream(lab.addrs.gw_v4)
    assert s.received == 0 and s.late >= 50 and s.late_probes[0].rtt_ms > 0.001


def test_meter_cli_prints_one_json_document(lab: Lab) -> None:
    argv = [
        sys.executable,
        "-m",
        "bridge_migrate_testlab.meter",
        "--duration",
        "0.2",
        "--interval-ms",
        "5",
    ]
    done = lab.run(lab.host_ns, [*argv, lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=10)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "ready\n"  # no runpy warning, nothing else
    result = MeterResult.from_json(done.stdout)
    assert_consistent(result)
    assert 190 <= result.duration_ms <= 260
    assert all(35 <= s.sent <= 42 and s.lost == 0 for s in result.streams)


# -- disturbances -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["addr", "silent"])
def test_kill_gateway_stops_arp_and_nd_answers(lab: Lab, how: str) -> None:
    a = lab.addrs
    lab.kill_gateway(how)
    # The host still holds the gateway's neighbour entries: the rotated MAC voids them.
    cached = measure(lab, lab.host_ns, [a.gw_v4, a.gw_v6, a.peer_v4, a.peer_v6], 0.2)
    assert [s.received for s in cached.streams[:2]] == [0, 0]
    assert all(s.lost == 0 for s in cached.streams[2:])
    # Resolving afresh: the gateway stays unresolved, router2 on the same bridge answers.
    lab.run(lab.host_ns, ["ip", "neigh", "flush", "dev", lab.nic], check=True)
    fresh = measure(lab, lab.host_ns, [a.gw_v4, a.gw_v6, a.router2_v4, a.static_v4], 0.2)
    assert [s.received > 0 for s in fresh.streams] == [False, False, True, True]
    states = {
        n["dst"]: n["state"] for n in ip_json(lab, lab.host_ns, "neigh", "show", "dev", "eth0")
    }
    assert states[a.gw_v4] == states[a.gw_v6] == ["INCOMPLETE"]
    assert states[a.router2_v4] == ["REACHABLE"]
    lan = {i["local"] for link in ip_json(lab, lab.lan_ns, "addr") for i in link["addr_info"]}
    assert ({a.gw_v4, a.gw_v6} <= lan) == (how == "silent")


def test_two_labs_do_not_interfere() -> None:
    with Lab() as one, Lab() as two:
        assert not set(one.namespaces) & set(two.namespaces)
        a = one.addrs  # both labs use the same addresses
        watch_one = one.start_meter(one.peer_ns, [a.host_v4, a.host_v6])
        watch_two = two.start_meter(two.peer_ns, [a.host_v4])
        time.sleep(0.1)
        flap_host_nic(two, 0.2)
        two.kill_gateway("addr")
        time.sleep(0.1)
        assert all(s.lost == 0 for s in watch_one.stop().streams)
        assert watch_two.stop().stream(a.host_v4).lost >= 100


def test_scale_helpers_use_one_batch(lab: Lab) -> None:
    start = time.monotonic()
    routes = lab.add_host_routes(1000)
    assert time.monotonic() - start < 1.0
    addrs = lab.add_host_addresses(200)
    more = lab.add_host_routes(5)
    assert len(set(routes + more)) == 1005 and routes[0] == "198.19.128.1/32"
    via_router2 = [
        r for r in ip_json(lab, lab.host_ns, "route") if r.get("gateway") == "198.18.0.2"
    ]
    assert len(via_router2) == 1005 + 1  # plus the lab's static route
    infos = ip_json(lab, lab.host_ns, "-4", "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert {i["local"] for i in infos} >= set(addrs) and len(infos) == 202
