"""ifupdown hosts handed over, what tests/test_handover.py does not look at: ifupdown's own view
(ifquery, its state files), the bridge as bridge-utils would make it, the DHCP client on br0 with
the NIC's identity and lease (never released, the address's lifetime the lease's), `ifdown br0;
ifup br0` on the rewritten files, and the way back: ifupdown's files and state, the client on the
NIC as it ran, the NIC's settings. Then the disruption of the hand-over beside a plain takeover,
with the bench's meter (run `pytest -s` to see the figures).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge_migrate.contract import ExitCode
from bridge_migrate.handover.clients import dhclient_duid, dhclient_latest
from bridge_migrate_testlab.lab import DHCP_LEASE_SECONDS
from bridge_migrate_testlab.managed import (
    ManagedLab,
    ManagedRow,
    booted_lab,
    configured,
    global_addresses,
    row,
)
from bridge_migrate_testlab.results import MeterResult
from hostview import read_view

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
ROWS = [row("ifupdown-static"), row("ifupdown-dhcp")]
IFUP_ARGV = (
    *("dhclient", "-4", "-v", "-i", "-pf", "/run/dhclient.{}.pid"),
    *("-lf", "/var/lib/dhcp/dhclient.{}.leases", "-I"),
    *("-df", "/var/lib/dhcp/dhclient6.{}.leases", "{}"),
)
_SETTLE = 30.0


def _agent(booted: ManagedLab, *args: str) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = booted.host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=90
    )
    return done


def _sh(booted: ManagedLab, script: str) -> str:
    done = booted.host.run(["sh", "-ec", script], timeout=60)
    assert done.returncode == 0, f"{script}: {done.stdout}{done.stderr}"
    return done.stdout


def _text(booted: ManagedLab, path: str) -> str | None:
    p = booted.host.path(path)
    return p.read_text() if p.exists() else None


def _network_files(booted: ManagedLab) -> dict[str, bytes]:
    root = booted.host.path("/etc/network")
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _clients(booted: ManagedLab) -> list[tuple[str, ...]]:
    """dhclient command lines running in the host."""
    out = booted.host.run(["pgrep", "-a", "-x", "dhclient"]).stdout
    return [tuple(line.split()[1:]) for line in out.splitlines()]


def _ifup_argv(iface: str) -> tuple[str, ...]:
    return tuple(w.format(iface) for w in IFUP_ARGV)


def _link(booted: ManagedLab, dev: str) -> dict[str, object]:
    done = booted.lab.run(booted.lab.host_ns, ["ip", "-d", "-j", "link", "show", "dev", dev])
    link: dict[str, object] = json.loads(done.stdout)[0]
    return link


def _v4_lifetime(booted: ManagedLab, dev: str) -> int:
    done = booted.lab.run(booted.lab.host_ns, ["ip", "-4", "-j", "addr", "show", "dev", dev])
    (info,) = [i for i in json.loads(done.stdout)[0]["addr_info"] if i["scope"] == "global"]
    return int(info["valid_life_time"])


def _lease_of(booted: ManagedLab, mac: str) -> tuple[str, str, int]:
    """dnsmasq's lease for the MAC: address, client id, expiry."""
    (lease,) = [x for x in booted.lab.dhcp_leases() if x.mac == mac]
    return lease.address, lease.client_id, lease.expiry


def _past_the_grant(expiry: int) -> None:
    """Wait into the second after the lease was granted: dnsmasq counts whole seconds, so a
    renewal within the grant's second would leave the expiry as it was."""
    granted = expiry - DHCP_LEASE_SECONDS
    time.sleep(min(1.1, max(0.0, granted + 1 - time.time())))


def _reload(booted: ManagedLab, n: int) -> None:
    """`ifdown br0; ifup br0` as a unit of the host (the client ifup starts stays in it)."""
    booted.host.run(
        [
            *("systemd-run", f"--unit=test-ifdown-ifup-{n}", "--property=Type=oneshot"),
            *("--property=RemainAfterExit=yes", "--", "sh", "-ec", "ifdown br0; ifup br0"),
        ],
        check=True,
        timeout=60,
    )


@pytest.mark.parametrize("r", ROWS, ids=[r.name for r in ROWS])
def test_ifupdown_sees_br0_and_the_client_keeps_its_lease(r: ManagedRow) -> None:
    with booted_lab(r) as booted:
        configured(booted, r)
        mac = str(_link(booted, "eth0")["address"])
        before_files = _network_files(booted)
        ifstate = _text(booted, "/run/network/ifstate")
        owned = global_addresses(booted, "eth0")
        before = read_view(booted.lab.host_ns)
        leased = _lease_of(booted, mac) if r.dhcp else None
        eth0_duid = dhclient_duid(_text(booted, "/var/lib/dhcp/dhclient.eth0.leases") or "")
        if leased is not None:
            _past_the_grant(leased[2])

        apply = _agent(booted, "apply", "--timeout", "20")
        assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr

        # ifupdown's view: br0 up, eth0 not on its own; the stanza as ifquery reads it
        assert _sh(booted, "ifquery --state") == "br0=br0\nlo=lo\n"  # latest first
        stanza = _sh(booted, "ifquery br0")
        assert "bridge_ports: eth0\n" in stanza and f"bridge_hw: {mac}\n" in stanza
        assert "bridge_stp: off\n" in stanza and "bridge_fd: 0\n" in stanza
        # the bridge as bridge-utils makes it at boot: the NIC's MAC, STP off, no delay
        br0 = _link(booted, "br0")
        info = br0["linkinfo"]["info_data"]  # type: ignore[index]
        assert (br0["address"], info["stp_state"], info["forward_delay"]) == (mac, 0, 0)
        assert _link(booted, "eth0").get("master") == "br0"
        assert global_addresses(booted, "br0") >= owned

        if r.dhcp:
            assert leased is not None
            assert _clients(booted) == [_ifup_argv("br0")], "eth0's client stopped, br0's runs"
            lease_file = _text(booted, "/var/lib/dhcp/dhclient.br0.leases") or ""
            assert dhclient_duid(lease_file) == eth0_duid is not None, "the same DUID"
            bound = dhclient_latest(lease_file, "br0", 4)
            assert bound is not None and bound.address == leased[0]
            address, client_id, expiry = _lease_of(booted, mac)
            assert (address, client_id) == leased[:2], "the same lease, the same client id"
            assert expiry > leased[2], "renewed from br0"
            left = expiry - time.time()
            assert abs(_v4_lifetime(booted, "br0") - left) <= 3, "the lease's lifetime"

        _reload(booted, 1)
        assert _sh(booted, "ifquery --state") == "br0=br0\nlo=lo\n"  # latest first
        deadline = time.monotonic() + _SETTLE
        while global_addresses(booted, "br0") < owned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert global_addresses(booted, "br0") >= owned
        assert not global_addresses(booted, "eth0")
        assert _link(booted, "eth0").get("master") == "br0"
        lab = booted.lab
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=_SETTLE)

        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert _network_files(booted) == before_files
        assert _text(booted, "/run/network/ifstate") == ifstate
        assert _text(booted, "/run/network/ifstate.br0") is None
        assert _text(booted, "/run/network/ifstate.eth0") == "eth0\n"
        deadline = time.monotonic() + _SETTLE
        while global_addresses(booted, "eth0") < owned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert global_addresses(booted, "eth0") >= owned
        after = read_view(booted.lab.host_ns)
        assert after.sysctl("ipv6/conf/eth0/addr_gen_mode") == before.sysctl(
            "ipv6/conf/eth0/addr_gen_mode"
        )
        if r.dhcp:
            assert leased is not None
            assert _clients(booted) == [_ifup_argv("eth0")], "eth0's client again, as it ran"
            assert _lease_of(booted, mac)[:2] == leased[:2]
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=_SETTLE)


# -- disruption --------------------------------------------------------------------------------

RUNS = 3  # per way, alternating


@dataclass(frozen=True)
class Outage:
    way: str
    lost: int  # probes unanswered, every stream
    longest_gap_ms: float  # the longest time without an answer, any stream


@contextmanager
def _probed(booted: ManagedLab, addresses: list[str]) -> Iterator[list[MeterResult]]:
    """1 ms probes from the LAN peer to the host's addresses while the block runs."""
    lab = booted.lab
    meter = lab.start_meter(lab.peer_ns, addresses, 1.0)
    out: list[MeterResult] = []
    try:
        time.sleep(0.2)
        yield out
        time.sleep(1.2)  # long enough to see a ~1 s hole whole
    finally:
        out.append(meter.stop())


def _outage(way: str, result: MeterResult) -> Outage:
    return Outage(
        way,
        sum(s.lost + s.late for s in result.streams),
        max(s.longest_gap_ms for s in result.streams),
    )


def _hide_manager(booted: ManagedLab, r: ManagedRow) -> None:
    """Nothing manages eth0 any more, its addresses as they are: ifupdown's stanzas gone, the
    client stopped without a release (a plain takeover's host)."""
    _sh(booted, "cp -p /etc/network/interfaces /etc/network/.test-interfaces")
    _sh(booted, "printf 'auto lo\\niface lo inet loopback\\n' > /etc/network/interfaces")
    if r.dhcp:
        _sh(booted, "pkill -TERM -x dhclient; while pgrep -x dhclient; do sleep 0.05; done")


def _unhide_manager(booted: ManagedLab, r: ManagedRow) -> None:
    _sh(booted, "mv /etc/network/.test-interfaces /etc/network/interfaces")
    if r.dhcp:
        argv = " ".join(_ifup_argv("eth0"))
        unit = f"--unit=test-dhclient-eth0-{time.monotonic_ns()}"
        _sh(booted, f"systemd-run {unit} --property=Type=forking {argv}")  # forks once bound


@pytest.mark.parametrize("r", ROWS, ids=[r.name for r in ROWS])
def test_the_handover_disrupts_no_more_than_a_plain_takeover(r: ManagedRow) -> None:
    outages: list[Outage] = []
    with booted_lab(r) as booted:
        configured(booted, r)
        time.sleep(2.5)  # a fresh lab's IPv6 settles
        targets = sorted(a.split("/")[0] for a in global_addresses(booted, "eth0"))
        for n in range(2 * RUNS):
            plain = n % 2 == 1
            if plain:
                _hide_manager(booted, r)
            with _probed(booted, targets) as result:
                apply = _agent(booted, "apply", "--timeout", "20")
            assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr
            assert bool(re.search(r"^handover ", apply.stdout, re.MULTILINE)) != plain, apply.stdout
            outages.append(_outage("plain" if plain else "hand-over", result[0]))
            back = _agent(booted, "rollback")
            assert back.returncode == ExitCode.OK, back.stdout + back.stderr
            if plain:
                _unhide_manager(booted, r)
            configured(booted, r)
            time.sleep(1.0)
    figures = {}
    for way in ("hand-over", "plain"):
        mine = [o for o in outages if o.way == way]
        gap = statistics.median(o.longest_gap_ms for o in mine)
        lost = statistics.median(o.lost for o in mine)
        figures[way] = gap
        print(f"{r.name} {way}: median longest gap {gap:.1f} ms, median lost {lost} ({mine})")
    assert figures["hand-over"] <= figures["plain"] + 20.0, figures


def test_a_restart_mid_transaction_boots_on_eth0_by_ifupdown() -> None:
    r = row("ifupdown-dhcp")
    # The unit's drop-in calls `bridge-migrate` by name, as installed in /usr/local/bin.
    wrapper = {"/usr/local/bin/bridge-migrate": (f'#!/bin/sh\nexec {AGENT} "$@"\n', 0o755)}
    recover = "/etc/systemd/system/networking.service.d/bridge-migrate-recover.conf"
    with booted_lab(r, files=wrapper) as booted:
        configured(booted, r)
        before_files = _network_files(booted)
        owned = global_addresses(booted, "eth0")
        pending = _agent(booted, "apply", "--timeout", "20", "--confirm-within", "300")
        assert pending.returncode == ExitCode.OK, pending.stdout + pending.stderr
        assert booted.host.path(recover).exists()
        booted.crash()  # a power cut inside the confirmation window
        booted.boot(plug_first=True)
        configured(booted, r)  # ifup configured eth0 from the files put back
        assert global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")
        assert _network_files(booted) == before_files
        assert not booted.host.path(recover).exists()
        assert _sh(booted, "ifquery --state") == "eth0=eth0\nlo=lo\n"
        assert _clients(booted) == [_ifup_argv("eth0")]


def test_clients_run_by_hand_move_to_br0_and_back_with_their_leases() -> None:
    r = row("dhclient")
    with booted_lab(r) as booted:
        configured(booted, r)
        mac = str(_link(booted, "eth0")["address"])
        clients = sorted(_clients(booted))
        assert clients == [
            ("/usr/sbin/dhclient", "-6", "-v", "eth0"),
            ("/usr/sbin/dhclient", "-v", "eth0"),
        ]
        owned = global_addresses(booted, "eth0")
        assert any(a.endswith("/128") for a in owned), owned  # a DHCPv6 lease
        leased = _lease_of(booted, mac)
        _past_the_grant(leased[2])

        apply = _agent(booted, "apply", "--timeout", "20")
        assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr
        assert sorted(_clients(booted)) == [(*c[:-1], "br0") for c in clients]
        assert global_addresses(booted, "br0") >= owned
        shared = _text(booted, "/var/lib/dhcp/dhclient.leases") or ""  # both clients' file
        bound = dhclient_latest(shared, "br0", 4)
        assert bound is not None and bound.address == leased[0]
        address, client_id, expiry = _lease_of(booted, mac)
        assert (address, client_id) == leased[:2] and expiry > leased[2]
        assert abs(_v4_lifetime(booted, "br0") - (expiry - time.time())) <= 3
        six = dhclient_latest(_text(booted, "/var/lib/dhcp/dhclient6.leases") or "", "br0", 6)
        assert six is not None, "br0's DHCPv6 lease, carried"
        routes = booted.lab.run(booted.lab.host_ns, ["ip", "-6", "route"]).stdout
        (lease128,) = [a.split("/")[0] for a in owned if a.endswith("/128")]
        assert len([x for x in routes.splitlines() if x.startswith(f"{lease128} ")]) == 1, routes

        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert sorted(_clients(booted)) == clients
        deadline = time.monotonic() + _SETTLE
        while global_addresses(booted, "eth0") < owned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")
        assert _lease_of(booted, mac)[:2] == leased[:2]
        lab = booted.lab
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=_SETTLE)
        again = _agent(booted, "apply", "--timeout", "20")  # nothing left behind in the way
        assert again.returncode == ExitCode.OK, again.stdout + again.stderr


def test_a_stanza_that_runs_commands_is_refused_with_nothing_changed() -> None:
    r = row("ifupdown-static")
    text, mode = r.files["/etc/network/interfaces"]
    route = "    post-up ip route add 198.19.7.0/24 via 198.18.0.2\n"
    files = {
        "/etc/network/interfaces": (
            text.replace("gateway 198.18.0.1\n", f"gateway 198.18.0.1\n{route}"),
            mode,
        )
    }
    with booted_lab(r, files=files) as booted:
        configured(booted, r)
        before_files = _network_files(booted)
        before = read_view(booted.lab.host_ns)
        apply = _agent(booted, "apply", "--timeout", "5")
        assert apply.returncode == ExitCode.REFUSED, apply.stdout + apply.stderr
        assert "runs commands (post-up) that may name the NIC" in apply.stderr, apply.stderr
        assert "bridge_ports eth0" in apply.stderr and "Nothing was changed" in apply.stderr
        assert _network_files(booted) == before_files
        assert read_view(booted.lab.host_ns).links == before.links
