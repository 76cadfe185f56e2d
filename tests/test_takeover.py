"""The takeover against the real kernel, in a throwaway lab: success, rollback, refusals."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from bridge_migrate.contract import Stage, StageName
from bridge_migrate.record import RECORD, Store
from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import assert_unchanged, read_view

pytestmark = pytest.mark.root

TIMEOUT = 2.0  # the dead-man deadline for tests that expect a rollback


def test_takeover_moves_everything_onto_the_bridge(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    run = agent("apply", "--timeout", "5")
    assert run.code == 0, run.stderr + run.stdout
    after = read_view(lab.host_ns)

    nic, br = after.link("eth0"), after.link("br0")
    assert br is not None and nic is not None
    assert br[1] == "bridge" and br[2] == nic[2] == before.link("eth0")[2]  # type: ignore[index]
    assert br[3] == nic[3] and br[4] is True  # MTU, up
    assert nic[5] == "br0"  # enslaved
    assert _stp_and_delay(lab) == (0, 0)
    moved = [a for a in before.addresses_on("eth0") if not a.startswith("fe80")]
    assert [a for a in after.addresses_on("br0") if not a.startswith("fe80")] == moved
    assert [a for a in after.addresses_on("eth0") if not a.startswith("fe80")] == []
    for r in before.routes:
        if r[4] == "eth0" and r[7] not in (2,) and r[1] != 255:  # configured routes
            assert (*r[:4], "br0", *r[5:]) in after.routes
    a = lab.addrs
    lab.wait_reachable(
        lab.peer_ns, [a.host_v4, a.host_v4_secondary, a.host_v6], timeout=3
    )  # on-link, both families, every address
    lab.wait_reachable(lab.far_ns, [a.host_v4, a.host_v6], timeout=3)  # via the default routes
    lab.wait_reachable(lab.host_ns, [a.peer_v4, a.peer_v6, a.far_v4, a.static_v4], timeout=3)


def test_human_output_has_a_line_per_phase_and_json_has_the_record(lab: Lab, agent: Agent) -> None:
    run = agent("apply", "--json")
    assert run.code == 0, run.stderr
    doc = run.json()
    assert doc["result"] == "migrated" and doc["exit_code"] == 0
    stages = [Stage.from_data(p) for p in doc["phases"]]
    assert [s.name for s in stages] == [
        StageName.SNAPSHOT,
        StageName.PLAN,
        StageName.RECORD,
        StageName.PREPARE,
        StageName.BATCH,
        StageName.CHECK,
        StageName.VERIFY,
    ]
    assert all(s.ms >= 0 for s in stages)
    prepare, batch, verify = stages[3], stages[4], stages[6]
    assert prepare.ready_ms is not None and prepare.acked == prepare.total
    assert batch.total == len(doc["plan"]["batch"]) == batch.acked
    assert verify.total == verify.acked == 2 and not verify.problems
    assert doc["snapshot"]["nic"]["name"] == "eth0"
    assert len(doc["plan"]["make"]) >= 5 and len(doc["plan"]["batch"]) >= 5
    status = agent("status")
    assert status.code == 0 and "committed" in status.stdout


@pytest.mark.parametrize("how", ["addr", "silent"])
def test_dead_gateway_rolls_back_to_the_exact_snapshot(lab: Lab, agent: Agent, how: str) -> None:
    before = read_view(lab.host_ns)
    lab.kill_gateway(how)
    run = agent("apply", "--timeout", str(TIMEOUT))
    assert run.code == 4, run.stderr + run.stdout
    assert TIMEOUT <= run.seconds < TIMEOUT + 2.5
    assert "rolled back" in run.stdout
    after = read_view(lab.host_ns)
    assert after.link("br0") is None
    assert_unchanged(before, after)
    assert "rolled-back" in agent("status").stdout


def test_unanswered_extra_probe_rolls_back(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    run = agent("apply", "--timeout", "1", "--probe", f"tcp:{lab.addrs.peer_v4}:9")
    assert run.code == 4, run.stderr + run.stdout
    assert "tcp:198.18.0.20:9" in run.stdout
    assert_unchanged(before, read_view(lab.host_ns))


def test_failure_while_making_the_additions_is_undone(lab: Lab, agent: Agent) -> None:
    # Docker's macvlan network: a macvlan on eth0, moved into a container's namespace, where
    # pre-flight cannot see it. Enslaving eth0 fails (EBUSY) after the policy rule for br0 was
    # added in the same send.
    lab.ip_batch(
        lab.host_ns,
        ["rule add iif eth0 table 100 pref 100", "link add mv0 link eth0 type macvlan"],
    )
    lab.ip_batch(lab.host_ns, [f"link set mv0 netns {lab.peer_ns}"])
    before = read_view(lab.host_ns)
    run = agent("apply", "--json")
    assert run.code == 4, run.stderr + run.stdout
    doc = run.json()
    assert doc["result"] == "rolled back"
    assert "failed: set eth0 master br0: Device or resource busy" in doc["message"]
    assert "macvlan" in doc["message"] and "attach" in doc["message"]
    prepare = _stage(doc, StageName.PREPARE)
    assert prepare.acked is not None and prepare.total is not None
    assert 0 < prepare.acked < prepare.total
    assert_unchanged(before, read_view(lab.host_ns))


def test_failure_in_the_middle_of_the_batch_is_undone(lab: Lab, agent: Agent) -> None:
    # br0 will have no IPv6, and eth0 keeps an IPv6 default route but no IPv6 address: moving
    # that route fails in the middle of the batch, after the IPv4 routes moved.
    lab.sysctl(lab.host_ns, {"net.ipv6.conf.default.disable_ipv6": 1})
    lab.ip_batch(
        lab.host_ns,
        [f"addr del {lab.addrs.host_v6}/64 dev eth0", "neigh flush dev eth0 nud all"],
    )
    before = read_view(lab.host_ns)
    run = agent("apply", "--json")
    assert run.code == 4, run.stderr + run.stdout
    doc = run.json()
    assert "failed: replace route default via 2001:db8:0:1::1 dev br0" in doc["message"]
    batch = _stage(doc, StageName.BATCH)
    assert batch.acked is not None and batch.total is not None
    assert 0 < batch.acked < batch.total
    assert_unchanged(before, read_view(lab.host_ns))


def test_apply_twice_is_a_no_op(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0
    migrated = read_view(lab.host_ns)
    again = agent("apply")
    assert again.code == 0 and "already migrated" in again.stdout
    assert agent("apply", "--nic", "eth0").code == 0
    after = read_view(lab.host_ns)
    assert after.links == migrated.links
    # br0's link-local address may finish DAD in between: compare the configured parts only.
    assert _global(after.addresses) == _global(migrated.addresses)
    assert _configured(after.routes) == _configured(migrated.routes)


def test_rollback_command_restores_a_committed_migration(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    assert agent("apply").code == 0
    run = agent("rollback")
    assert run.code == 0, run.stderr + run.stdout
    assert_unchanged(before, read_view(lab.host_ns))
    assert agent("rollback").code == 0  # nothing left to do
    assert agent("apply").code == 0  # and it can migrate again


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_verification_rolls_back_at_once(
    lab: Lab, agent: Agent, signum: signal.Signals
) -> None:
    before = read_view(lab.host_ns)
    lab.kill_gateway("addr")
    proc = agent.popen("apply", "--timeout", "30")
    _wait_for_phase(agent.state_dir, "verifying", proc)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 4, out + err
    assert f"interrupted by {signum.name}" in out
    assert took < 1.0, f"rolled back {took:.2f} s after the signal, not at once"
    assert_unchanged(before, read_view(lab.host_ns))


def test_second_concurrent_apply_is_refused(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    lab.kill_gateway("addr")
    first = agent.popen("apply", "--timeout", "3")
    _wait_for_phase(agent.state_dir, "verifying", first)
    second = agent("apply")
    out, err = first.communicate(timeout=30)
    assert (first.returncode, second.code) == (4, 3), (out, err, second.stderr)
    assert "another bridge-migrate" in second.stderr and "Nothing was changed" in second.stderr
    assert_unchanged(before, read_view(lab.host_ns))


def test_one_transaction_per_network_namespace_whatever_the_state_dir(
    lab: Lab, agent: Agent, tmp_path: Path
) -> None:
    before = read_view(lab.host_ns)
    lab.kill_gateway("addr")
    first = agent.popen("apply", "--timeout", "60")
    _wait_for_phase(agent.state_dir, "verifying", first)
    other = Agent(lab, tmp_path / "other-state")
    for command in (("apply",), ("undo",), ("rollback",)):
        second = other(*command)
        assert second.code == 3, second.stdout + second.stderr
        assert "is changing this network namespace: transaction" in second.stderr
        assert str(agent.state_dir) in second.stderr
    first.send_signal(signal.SIGTERM)  # it rolls back at once
    out, err = first.communicate(timeout=30)
    assert first.returncode == 4, out + err
    assert_unchanged(before, read_view(lab.host_ns))


def test_a_dead_man_that_fires_before_the_deadline_does_nothing(lab: Lab, agent: Agent) -> None:
    # The verification's timer, still firing after a confirmation window moved the deadline.
    waiting = agent.popen("apply", "--confirm-within", "30")
    try:
        _wait_for_phase(agent.state_dir, "confirming", waiting)
        tx_id = json.loads(agent("status", "--json").stdout)["transaction"]["id"]
        early = agent("expire", tx_id)
        assert early.code == 0 and "within its time" in early.stdout, early.stdout + early.stderr
        assert recorded_phase(agent.state_dir) == "confirming"
    finally:
        waiting.send_signal(signal.SIGTERM)  # it is the dead man here: it rolls back
        waiting.communicate(timeout=30)


def test_held_lock_refuses(lab: Lab, agent: Agent) -> None:
    agent.state_dir.mkdir(mode=0o700)
    fd = os.open(agent.state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = agent("apply")
    finally:
        os.close(fd)
    assert run.code == 3 and f"another bridge-migrate (pid {os.getpid()})" in run.stderr


def test_record_is_root_only_and_written_atomically(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0
    assert (agent.state_dir.stat().st_mode & 0o777) == 0o700
    record = agent.state_dir / RECORD
    assert (record.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in agent.state_dir.iterdir() if p.name.startswith(".")] == []


def _global(addresses: tuple[tuple[object, ...], ...]) -> list[tuple[object, ...]]:
    return [a for a in addresses if not str(a[2]).startswith("fe80")]


def _configured(routes: frozenset[tuple[object, ...]]) -> set[tuple[object, ...]]:
    return {r for r in routes if r[7] != 2}  # proto kernel: made by the kernel from addresses


def recorded_phase(state_dir: Path) -> str | None:
    tx = Store(state_dir).load()
    return tx.phase if tx else None


def _wait_for_phase(state_dir: Path, phase: str, proc: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if recorded_phase(state_dir) == phase:
            return
        time.sleep(0.02)
    raise TimeoutError(f"phase {phase} not reached in {limit} s")


def _stp_and_delay(lab: Lab) -> tuple[int, int]:
    with IPRoute(netns=lab.host_ns, flags=0) as ipr:
        (link,) = ipr.get_links(ifname="br0")
        data = link.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
        return data.get("IFLA_BR_STP_STATE"), data.get("IFLA_BR_FORWARD_DELAY")


# Refusals and input errors: exit code, and the host read back unchanged ------------------------


def _prepare(lab: Lab, case: str) -> list[str]:
    """Set up the host for a refusal case; return the agent's arguments."""
    extra = {
        "no-such-nic": [],
        "loopback": [],
        "nic-is-bridge": [
            "link add brx type bridge",
            "link set brx addrgenmode none",
            "link set brx up",
        ],
        "nic-is-port": [
            "link add brp type bridge",
            "link add vp type veth peer name vp2",
            "link set vp master brp",
        ],
        "nic-down": ["link add vd type veth peer name vd2", "addr add 198.18.9.1/24 dev vd"],
        "no-global-address": [  # no link-local either: it would appear mid-test, after DAD
            "link add vn type veth peer name vn2",
            "link set vn addrgenmode none",
            "link set vn2 addrgenmode none",
            "link set vn up",
            "link set vn2 up",
        ],
        "bridge-exists": ["link add br0 type bridge"],
        "multipath-route": [
            "route add 198.19.9.0/24"
            " nexthop via 198.18.0.1 dev eth0 nexthop via 198.18.0.2 dev eth0"
        ],
    }[case]
    if extra:
        lab.ip_batch(lab.host_ns, extra)
    return {
        "no-such-nic": ["--nic", "eth9"],
        "loopback": ["--nic", "lo"],
        "nic-is-bridge": ["--nic", "brx"],
        "nic-is-port": ["--nic", "vp"],
        "nic-down": ["--nic", "vd"],
        "no-global-address": ["--nic", "vn"],
        "bridge-exists": [],
        "multipath-route": [],
    }[case]


REFUSALS = {
    "no-such-nic": "no such NIC 'eth9'",
    "loopback": "lo is a loopback device",
    "nic-is-bridge": "brx is a bridge",
    "nic-is-port": "vp is already a port of brp",
    "nic-down": "vd is down",
    "no-global-address": "vn has no global address",
    "bridge-exists": "br0 exists and is not a completed migration of eth0",
    "multipath-route": "198.19.9.0/24 is a multipath route through eth0",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_preflight_refusals_change_nothing(lab: Lab, agent: Agent, case: str) -> None:
    args = _prepare(lab, case)
    before = read_view(lab.host_ns)
    for command in ("plan", "apply"):
        run = agent(command, *args)
        assert run.code == 3, (command, run.stdout, run.stderr)
        assert REFUSALS[case] in run.stderr and "Nothing was changed" in run.stderr
    assert_unchanged(before, read_view(lab.host_ns))
    assert not (agent.state_dir / RECORD).exists()


def test_pending_transaction_refuses(lab: Lab, agent: Agent) -> None:
    lab.kill_gateway("addr")
    proc = agent.popen("apply", "--timeout", "20")
    _wait_for_phase(agent.state_dir, "verifying", proc)
    proc.kill()  # the agent dies with the host migrated and unverified
    proc.wait(timeout=10)
    run = agent("apply")
    assert run.code == 3 and "is verifying" in run.stderr
    assert "bridge-migrate rollback" in run.stderr
    status = agent("status")
    assert "verifying" in status.stdout and "left" in status.stdout
    before = read_view(lab.host_ns)
    assert before.link("br0") is not None
    run = agent("rollback")
    assert run.code == 0, run.stdout + run.stderr
    after = read_view(lab.host_ns)
    assert after.link("br0") is None
    assert "198.18.0.10" in after.addresses_on("eth0")


def test_not_root_is_refused(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    run = lab.run(
        lab.host_ns,
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *agent.argv("apply")],
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert run.returncode == 3, run.stderr
    assert "not running as root" in run.stderr
    assert_unchanged(before, read_view(lab.host_ns))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nic", "eth/0"], "no '/', ':' or white space"),
        (["--nic", "a" * 16], "1 to 15 characters"),
        (["--bridge", "br 0"], "no '/', ':' or white space"),
        (["--bridge", ""], "1 to 15 characters"),
        (["--timeout", "0"], "more than 0"),
        (["--timeout", "-3"], "more than 0"),
        (["--timeout", "nan"], "more than 0"),
        (["--timeout", "soon"], "invalid float value"),
        (["--probe", "icmp:gateway"], "is not an IP address"),
        (["--probe", "tcp:198.18.0.1"], "expected tcp:ADDR:PORT"),
        (["--probe", "tcp:198.18.0.1:70000"], "port must be 1-65535"),
        (["--probe", "tcp:2001:db8::1:22"], "brackets"),
        (["--probe", "udp:198.18.0.1:53"], "expected icmp:ADDR or tcp:ADDR:PORT"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_input_errors_exit_2_and_change_nothing(
    lab: Lab, agent: Agent, args: list[str], message: str
) -> None:
    before = read_view(lab.host_ns)
    run = agent("apply", *args)
    assert run.code == 2, (run.stdout, run.stderr)
    assert message in run.stderr
    assert_unchanged(before, read_view(lab.host_ns))
    assert not agent.state_dir.exists()


def test_plan_needs_no_root_and_changes_nothing(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    run = lab.run(
        lab.host_ns,
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *agent.argv("plan")],
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "set eth0 master br0" in run.stdout and "undo: set eth0 nomaster" in run.stdout
    assert_unchanged(before, read_view(lab.host_ns))
    assert os.path.exists(agent.state_dir) is False


def test_rollback_keeps_remaining_lifetimes(lab: Lab, agent: Agent) -> None:
    lab.ip_batch(
        lab.host_ns,
        ["addr add 198.18.0.12/24 dev eth0 valid_lft 600 preferred_lft 300"],
    )
    before = read_view(lab.host_ns)
    lab.kill_gateway("addr")
    started = time.monotonic()
    assert agent("apply", "--timeout", "2").code == 4
    elapsed = time.monotonic() - started
    assert_unchanged(before, read_view(lab.host_ns))
    valid, preferred = _lifetimes(lab, "198.18.0.12")
    assert 600 - elapsed - 2 <= valid <= 600
    assert 300 - elapsed - 2 <= preferred <= 300


def test_link_local_ipv6_gateway(lab: Lab, agent: Agent) -> None:
    gateway = _link_local(lab, lab.lan_ns, lab.lan_bridge)
    lab.ip_batch(lab.host_ns, [f"route replace default via {gateway} dev eth0"])
    run = agent("apply", "--timeout", "5")
    assert run.code == 0, run.stdout + run.stderr
    assert f"icmp:{gateway} from {lab.addrs.host_v6} on br0: answered" in run.stdout
    lab.wait_reachable(lab.far_ns, [lab.addrs.host_v6], timeout=3)


def _lifetimes(lab: Lab, address: str) -> tuple[int, int]:
    with IPRoute(netns=lab.host_ns, flags=0) as ipr:
        (msg,) = [m for m in ipr.get_addr() if m.get("IFA_LOCAL") == address]
        cache = msg.get("IFA_CACHEINFO")
        return cache["ifa_valid"], cache["ifa_preferred"]


def _link_local(lab: Lab, ns: str, dev: str) -> str:
    with IPRoute(netns=ns, flags=0) as ipr:
        (index,) = ipr.link_lookup(ifname=dev)
        return next(
            m.get("IFA_ADDRESS")
            for m in ipr.get_addr(family=10, index=index)
            if m.get("IFA_ADDRESS").startswith("fe80")
        )


def test_change_during_the_trial_that_rollback_cannot_undo_exits_5(lab: Lab, agent: Agent) -> None:
    lab.kill_gateway("addr")
    proc = agent.popen("apply", "--timeout", "3", "--json")
    _wait_for_phase(agent.state_dir, "verifying", proc)
    # Someone else configures eth0 while the agent waits for the gateway.
    lab.ip_batch(lab.host_ns, ["addr add 198.18.0.99/24 dev eth0"])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, out + err
    doc = json.loads(out)
    assert doc["result"] == "rollback incomplete"
    assert any("198.18.0.99/24 should not be there" in d for d in doc["differences"])
    status = agent("status")
    assert "rollback-incomplete" in status.stdout and "198.18.0.99" in status.stdout
    refused = agent("apply")
    assert refused.code == 3 and "rollback-incomplete" in refused.stderr
    after = read_view(lab.host_ns)
    assert after.link("br0") is None and "198.18.0.10" in after.addresses_on("eth0")


def test_without_systemd_the_agent_says_it_keeps_the_deadline(lab: Lab, agent: Agent) -> None:
    run = agent("apply")
    assert run.code == 0
    assert "no independent dead man (systemd is not PID 1 here)" in run.stdout


def test_without_systemd_commit_confirmed_waits_in_the_agent(lab: Lab, agent: Agent) -> None:
    waiting = agent.popen("apply", "--confirm-within", "20")
    _wait_for_phase(agent.state_dir, "confirming", waiting)
    status = agent("status")
    assert "confirming" in status.stdout and " s left)" in status.stdout
    confirmed = agent("confirm")
    assert confirmed.code == 0, confirmed.stderr
    out, err = waiting.communicate(timeout=10)
    assert waiting.returncode == 0, out + err
    assert "committed" in agent("status").stdout
    assert read_view(lab.host_ns).link("br0") is not None


def test_without_systemd_unconfirmed_change_is_rolled_back(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    started = time.monotonic()
    waiting = agent.popen("apply", "--confirm-within", "1.5")
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 4, out + err
    assert time.monotonic() - started >= 1.5
    assert "not confirmed in time" in out
    assert_unchanged(before, read_view(lab.host_ns))
    late = agent("confirm")
    assert late.code == 3 and "nothing to confirm" in late.stderr


def _stage(doc: dict[str, Any], name: StageName) -> Stage:
    return next(s for s in map(Stage.from_data, doc["phases"]) if s.name is name)
