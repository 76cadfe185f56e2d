"""attach and detach against the real kernel: a lab host taken over onto br0, guests in namespaces
of the lab (netns:NAME) and processes with a network namespace of their own (pid:PID)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge_migrate_testlab import Lab
from conftest import Agent, Run
from hostview import HostView, read_view

pytestmark = pytest.mark.root

V4 = "198.18.0.50/24@198.18.0.1"
V6 = "2001:db8:0:1::50/64@2001:db8:0:1::1"


@pytest.fixture
def taken(lab: Lab, agent: Agent) -> Lab:
    """The lab host, on br0."""
    assert agent("apply").code == 0
    return lab


@pytest.fixture
def guest(taken: Lab) -> str:
    return taken.add_namespace("guest")


def links(lab: Lab, ns: str) -> list[str]:
    done = lab.run(ns, ["ip", "-j", "link"], check=True)
    return [link["ifname"] for link in json.loads(done.stdout)]


def addresses(lab: Lab, ns: str) -> list[str]:
    done = lab.run(ns, ["ip", "-j", "addr"], check=True)
    return [a["local"] for link in json.loads(done.stdout) for a in link["addr_info"]]


def assert_refused(run: Run, *words: str) -> None:
    assert run.code == 3, run
    for word in words:
        assert word in run.stderr, run.stderr
    assert "Nothing was changed" in run.stderr


def test_netns_guest_reaches_host_lan_and_far_and_back(taken: Lab, agent: Agent, guest: str):
    a = taken.addrs
    run = agent("attach", f"netns:{guest}", V4, V6)
    assert run.code == 0, run
    assert "198.18.0.50" in addresses(taken, guest)
    taken.wait_reachable(guest, [a.host_v4, a.peer_v4, a.far_v4, a.host_v6, a.peer_v6, a.far_v6])
    taken.wait_reachable(taken.peer_ns, ["198.18.0.50", "2001:db8:0:1::50"])
    taken.wait_reachable(taken.host_ns, ["198.18.0.50"])
    status = agent("status", "--json").json()
    (entry,) = status["guests"]
    assert entry["guest"] == f"netns:{guest}" and entry["spec"]["ifname"] == "eth1"
    assert entry["host_end"] in links(taken, taken.host_ns)


def test_same_attach_again_changes_nothing(taken: Lab, agent: Agent, guest: str):
    assert agent("attach", f"netns:{guest}", V4).code == 0
    host, inside = read_view(taken.host_ns), read_view(guest)
    run = agent("attach", f"netns:{guest}", V4)
    assert run.code == 0 and "already attached" in run.stdout, run
    assert read_view(taken.host_ns).links == host.links
    assert read_view(guest).addresses == inside.addresses
    assert _routes(read_view(guest)) == _routes(inside)


def _routes(view: HostView) -> frozenset[tuple[object, ...]]:
    """Without the kernel's local route of eth1's link-local address, which comes whenever its
    DAD ends, attach or not."""
    return frozenset(r for r in view.routes if not str(r[2]).startswith("fe80:"))


def test_other_spec_refused_unless_replace(taken: Lab, agent: Agent, guest: str):
    assert agent("attach", f"netns:{guest}", V4).code == 0
    assert_refused(agent("attach", f"netns:{guest}", "198.18.0.51/24@198.18.0.1"), "--replace")
    assert "198.18.0.50" in addresses(taken, guest)
    run = agent("attach", "--replace", f"netns:{guest}", "198.18.0.51/24@198.18.0.1")
    assert run.code == 0, run
    assert "198.18.0.51" in addresses(taken, guest)
    assert "198.18.0.50" not in addresses(taken, guest)
    assert len(agent("status", "--json").json()["guests"]) == 1


def test_detach_removes_exactly_what_attach_added(taken: Lab, agent: Agent, guest: str):
    host, inside = read_view(taken.host_ns), read_view(guest)
    assert agent("attach", f"netns:{guest}", V4, V6).code == 0
    run = agent("detach", f"netns:{guest}")
    assert run.code == 0 and "detached" in run.stdout, run
    after_host, after_guest = read_view(taken.host_ns), read_view(guest)
    assert after_host.links == host.links
    assert after_host.addresses == host.addresses
    assert after_guest.links == inside.links
    assert after_guest.addresses == inside.addresses
    assert after_guest.routes == inside.routes
    assert agent("status", "--json").json()["guests"] == []
    again = agent("detach", f"netns:{guest}")
    assert again.code == 0 and "nothing to do" in again.stdout, again


@pytest.fixture
def process_guest(taken: Lab) -> Iterator[int]:
    """A process in a network namespace of its own (not one of the lab's: killed here)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        # unshare execs sleep once the namespace is made: wait until it has.
        for _ in range(200):
            if os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.01"], check=True)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.parametrize("form", ["pid:{}", "{}"])
def test_pid_guest_without_gateway(taken: Lab, agent: Agent, process_guest: int, form: str):
    guest = form.format(process_guest)
    run = agent("attach", guest, "198.18.0.60/24", "--ifname", "lan0")
    assert run.code == 0, run
    # No gateway: verified against the host's own address on that prefix.
    assert "arp:198.18.0.10 ok" in run.stdout
    inside = subprocess.run(
        ["nsenter", "-t", str(process_guest), "-n", "ip", "-j", "addr", "show", "lan0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "198.18.0.60" in inside.stdout
    taken.wait_reachable(taken.peer_ns, ["198.18.0.60"])
    assert agent("detach", guest, "--ifname", "lan0").code == 0
    assert "bmg" not in " ".join(links(taken, taken.host_ns))


def test_dead_gateway_rolls_back(taken: Lab, agent: Agent, guest: str):
    host, inside = read_view(taken.host_ns), read_view(guest)
    taken.kill_gateway("addr", rotate_mac=False)
    run = agent("attach", "--timeout", "1.5", f"netns:{guest}", V4)
    assert run.code == 4, run
    assert "198.18.0.1 did not answer" in run.stdout
    assert read_view(taken.host_ns).links == host.links
    assert read_view(guest).links == inside.links
    assert agent("status", "--json").json()["guests"] == []


def test_sigterm_while_verifying_removes_what_was_added(taken: Lab, agent: Agent, guest: str):
    host, inside = read_view(taken.host_ns), read_view(guest)
    taken.kill_gateway("addr", rotate_mac=False)
    proc = agent.popen("attach", "--timeout", "30", f"netns:{guest}", V4)
    deadline = time.monotonic() + 20
    while not any(n.startswith("bmg") for n in links(taken, taken.host_ns)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # the guest is configured in milliseconds: now the probes run
    proc.terminate()
    stopped = time.monotonic()
    out, _ = proc.communicate(timeout=25)
    assert time.monotonic() - stopped < 10, "the probes did not stop at the signal"
    assert proc.returncode == 4, out
    assert "interrupted by SIGTERM" in out
    assert read_view(taken.host_ns).links == host.links
    assert read_view(guest).links == inside.links


def test_undo_refuses_while_guests_are_attached(taken: Lab, agent: Agent, guest: str):
    assert agent("attach", f"netns:{guest}", V4).code == 0
    assert_refused(agent("undo"), f"netns:{guest} eth1", "bridge-migrate detach")
    assert agent("detach", f"netns:{guest}").code == 0
    assert agent("undo").code == 0


# -- refusals: exit 3, nothing changed ---------------------------------------------------------


def test_refused_without_bridge(lab: Lab, agent: Agent):
    guest = lab.add_namespace("guest")
    assert_refused(agent("attach", f"netns:{guest}", V4), "br0: no such device", "apply")


def test_refused_bridge_without_uplink(lab: Lab, agent: Agent):
    guest = lab.add_namespace("guest")
    lab.ip_batch(lab.host_ns, ["link add lonely type bridge"])
    run = agent("attach", "--bridge", "lonely", f"netns:{guest}", V4)
    assert_refused(run, "lonely has no uplink port")


def test_refusals_leave_everything_as_it_was(taken: Lab, agent: Agent, guest: str):
    taken.ip_batch(guest, ["link add eth1 type veth peer name other"])
    host, inside = read_view(taken.host_ns), read_view(guest)
    g = f"netns:{guest}"
    a = taken.addrs
    cases = [
        ((g, V4), ["eth1 exists in", "--ifname"]),
        ((g, "--ifname", "eth2", "198.19.7.5/24@198.19.7.1"), ["not in a prefix that br0 is on"]),
        ((g, "--ifname", "eth2", f"{a.peer_v4}/24"), ["in use on the LAN", "ARP probe"]),
        ((g, "--ifname", "eth2", f"{a.peer_v6}/64"), ["in use on the LAN", "duplicate address"]),
        ((g, "--ifname", "eth2", f"{a.host_v4_secondary}/24"), ["the host's own address"]),
        (("netns:nosuchguest", V4), ["guest netns:nosuchguest not found"]),
        (("no-such-container", V4), ["Docker"]),
    ]
    for argv, words in cases:
        assert_refused(agent("attach", *argv), *words)
    assert read_view(taken.host_ns).links == host.links
    assert read_view(guest) == inside


def test_refused_when_bridge_netfilter_would_drop(taken: Lab, agent: Agent, guest: str):
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not bridge_nf.exists():
        pytest.skip("br_netfilter is not loaded on this machine")
    taken.sysctl(taken.host_ns, {"net.bridge.bridge-nf-call-iptables": 1})
    assert taken.run(taken.host_ns, ["iptables", "-P", "FORWARD", "DROP"]).returncode == 0
    run = agent("attach", f"netns:{guest}", V4)
    assert_refused(run, "net.bridge.bridge-nf-call-iptables=1", "FORWARD", "policy drop")
    assert "DOCKER-USER -i br0 -o br0 -j ACCEPT" in run.stderr
    # The fix the message gives lets it through.
    fix = ["iptables", "-I", "FORWARD", "-i", "br0", "-o", "br0", "-j", "ACCEPT"]
    assert taken.run(taken.host_ns, fix).returncode == 0
    assert agent("attach", f"netns:{guest}", V4).code == 0
    taken.wait_reachable(guest, [taken.addrs.far_v4])


# -- bad input: exit 2 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["netns:g", "198.18.0.50"], "ADDRESS/PREFIX"),
        (["netns:g", "198.18.0.50/33"], "prefix is 0 to 32"),
        (["netns:g", "198.18.0.50/24@198.19.0.1"], "gateway must be another address"),
        (["netns:g", "198.18.0.0/24"], "network or broadcast"),
        (["netns:g", "2001:db8::5/129"], "prefix is 0 to 128"),
        (["vm:g", "198.18.0.50/24"], "unknown form"),
        (["pid:abc", "198.18.0.50/24"], "PID"),
        (["netns:g", "198.18.0.50/24", "--mac", "01:00:00:00:00:01"], "unicast MAC"),
        (["netns:g", "198.18.0.50/24@198.18.0.1", "198.18.0.51/24@198.18.0.2"], "gateway"),
    ],
)
def test_bad_input_is_usage(tmp_path: Path, argv: list[str], words: str):
    cmd = [sys.executable, "-m", "bridge_migrate", "--state-dir", str(tmp_path), "attach", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done
    assert words in done.stderr
