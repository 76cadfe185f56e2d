"""NetworkManager handed the bridge, in lab hosts it runs (managed.py's nm rows), beyond what
tests/test_handover.py checks for every manager: it *assumes* br0 and eth0 with the new profiles
(no address flushed: a peer probing every millisecond sees no gap), the bridge's DHCP clients
present the NIC's identity (same client id, DUID and IAID, the same leases), a restart is as
quiet, the rollback gives it the NIC's profile back the same way, from inside the installed
unit's sandbox too, and the dead man does it when the agent dies after the hand-over. What it
cannot carry (a VLAN on the NIC) is refused with nothing changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bridge_migrate import handover
from bridge_migrate.contract import GRACE, ExitCode, Phase
from bridge_migrate.failpoints import KILL_AT_ENV
from bridge_migrate.record import Store
from bridge_migrate_testlab.managed import (
    ManagedLab,
    ManagedRow,
    booted_lab,
    configured,
    global_addresses,
    row,
)
from bridge_migrate_testlab.results import MeterResult
from hostview import assert_unchanged, read_view
from installed import installed_units

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
NM_ROWS = [row("nm-static"), row("nm-dhcp")]
PROFILES = "/etc/NetworkManager/system-connections"
_AFTER = 1.5  # seconds probed after the command returns
_LONGEST_RUN = 30  # probes (ms) in a row: a flush of br0's addresses costs 90-300
_SETTLE = 30.0


def _agent(booted: ManagedLab, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = booted.host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=timeout
    )
    return done


def _devices(booted: ManagedLab) -> dict[str, tuple[str, str]]:
    """NetworkManager's view: device -> (state, profile)."""
    done = booted.host.run(["nmcli", "-t", "-f", "DEVICE,STATE,CONNECTION", "device"], check=True)
    rows = (line.split(":") for line in done.stdout.splitlines() if line)
    return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3}


def _option(booted: ManagedLab, dev: str, group: str, key: str) -> str:
    """One option of the device's DHCP lease as NetworkManager shows it ("" none)."""
    done = booted.host.run(["nmcli", "-f", group, "device", "show", dev], check=True)
    for line in done.stdout.splitlines():  # "DHCP4.OPTION[2]:  dhcp_client_identifier = 01:.."
        name, _, value = line.split(":", 1)[-1].strip().partition(" = ")
        if name == key:
            return value
    return ""


def _assumed(booted: ManagedLab, since: float) -> list[str]:
    """The profiles NetworkManager assumed, as its state files named them, since `since`."""
    found = []
    for entry in booted.host.journal("NetworkManager.service"):
        message = entry.get("MESSAGE", "")
        if int(entry["__REALTIME_TIMESTAMP"]) / 1e6 >= since and "(indicated)" in message:
            found.append(message.split("matching connection '")[1].split("'")[0])
    return [p for p in found if p != "lo"]


def _files(booted: ManagedLab) -> dict[str, bytes]:
    root = booted.host.path(PROFILES)
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@contextmanager
def _probed(booted: ManagedLab, targets: list[str]) -> Iterator[list[MeterResult]]:
    """The bench's meter from the LAN's peer, every millisecond, until _AFTER s after."""
    lab = booted.lab
    meter = lab.start_meter(lab.peer_ns, targets, 1.0, late_ms=100.0)
    out: list[MeterResult] = []
    try:
        yield out
        time.sleep(_AFTER)
    finally:
        out.append(meter.stop())


def _quiet(result: MeterResult, what: str) -> str:
    runs = {s.target: s.max_missed_run for s in result.streams}
    assert max(runs.values()) < _LONGEST_RUN, f"{what}: probes lost in a row {runs}"
    return f"{what}: longest loss {max(runs.values())} ms"


@pytest.mark.parametrize("r", NM_ROWS, ids=[r.name for r in NM_ROWS])
def test_networkmanager_assumes_the_bridge_and_gives_the_nic_back(r: ManagedRow) -> None:
    figures: list[str] = []
    with booted_lab(r) as booted:
        configured(booted, r)
        (lab_profile,) = [c for d, (_, c) in _devices(booted).items() if d == "eth0"]
        identity = [_option(booted, "eth0", g, k) for g, k in _IDENTITY] if r.dhcp else []
        owned = global_addresses(booted, "eth0")
        targets = sorted(a.split("/")[0] for a in owned)
        before_files = _files(booted)

        since = time.time()
        with _probed(booted, targets) as meter:
            apply = _agent(booted, "apply", "--timeout", "20")
        assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr
        figures.append(_quiet(meter[0], "apply"))
        devices = _devices(booted)
        assert devices["br0"] == ("connected", "br0"), devices
        assert devices["eth0"] == ("connected", "br0-port-eth0"), devices
        assert sorted(_assumed(booted, since)) == ["br0", "br0-port-eth0"]
        assert global_addresses(booted, "br0") >= owned
        if r.dhcp:
            # the bridge's clients present what the NIC's did, so the server renews its leases
            assert _until_identity(booted, identity) == identity
            leases = booted.lab.dhcp_leases()
            assert {x.client_id for x in leases} == {identity[0], identity[1]}, leases
            assert {x.address for x in leases} <= {a.split("/")[0] for a in owned}

        since = time.time()
        with _probed(booted, targets) as meter:
            booted.host.run(r.restart, check=True, timeout=60)
        figures.append(_quiet(meter[0], "restart"))
        assert sorted(_assumed(booted, since)) == ["br0", "br0-port-eth0"]

        since = time.time()
        with _probed(booted, targets) as meter:
            back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        figures.append(_quiet(meter[0], "rollback"))
        assert _assumed(booted, since) == [lab_profile]
        assert _devices(booted)["eth0"] == ("connected", lab_profile)
        assert "br0" not in _devices(booted)
        assert _files(booted) == before_files
        assert global_addresses(booted, "eth0") >= owned
    print(f"{r.name}: " + "; ".join(figures))


_IDENTITY = (("DHCP4", "dhcp_client_identifier"), ("DHCP6", "dhcp6_client_id"))


def _until_identity(booted: ManagedLab, want: list[str]) -> list[str]:
    deadline = time.monotonic() + _SETTLE
    while (have := [_option(booted, "br0", g, k) for g, k in _IDENTITY]) != want:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return have


STATIC = row("nm-static")


def test_systemctl_start_hands_over_from_inside_the_sandbox() -> None:
    """The installed unit's sandbox lets the agent stop and start NetworkManager and name the
    profiles in its state files."""
    with booted_lab(STATIC, units=installed_units()) as booted:
        configured(booted, STATIC)
        before_files = _files(booted)
        started = booted.host.systemctl("start", "bridge-migrate", timeout=90)
        assert started.returncode == 0, started.stderr + str(booted.host.journal())
        assert _devices(booted)["br0"] == ("connected", "br0")
        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert _files(booted) == before_files
        assert _devices(booted)["eth0"] == ("connected", "lab-static")


def test_dead_man_gives_networkmanager_the_nic_back_when_the_agent_dies() -> None:
    timeout = 3.0
    with booted_lab(STATIC, units=installed_units()) as booted:
        configured(booted, STATIC)
        before_files = _files(booted)
        before = read_view(booted.lab.host_ns)
        killed = booted.host.run(
            [AGENT, "--state-dir", STATE, "apply", "--timeout", str(timeout)],
            env={KILL_AT_ENV: "handover"},
            timeout=60,
        )
        assert killed.returncode in (137, -9), killed.stdout + killed.stderr
        assert _devices(booted)["br0"] == ("connected", "br0")  # the hand-over was made
        store = Store(booted.outside(STATE))
        deadline = time.monotonic() + timeout + GRACE + handover.WAIT + 10
        while (tx := store.load()) is not None and tx.phase.pending:
            assert time.monotonic() < deadline, f"still {tx.phase}: {booted.host.journal()}"
            time.sleep(0.2)
        assert tx is not None and tx.phase == Phase.ROLLED_BACK, tx
        assert _files(booted) == before_files
        assert _devices(booted)["eth0"] == ("connected", "lab-static")
        assert_unchanged(before, read_view(booted.lab.host_ns), learned_may_go=True)


VLAN = """[connection]
id=lab-vlan
type=vlan

[vlan]
id=5
parent=eth0

[ipv4]
method=disabled

[ipv6]
method=disabled
"""


def test_a_vlan_on_the_nic_is_refused_with_nothing_changed() -> None:
    files = {f"{PROFILES}/lab-vlan.nmconnection": (VLAN, 0o600)}
    with booted_lab(STATIC, files=files) as booted:
        configured(booted, STATIC)
        before_files = _files(booted)
        before = read_view(booted.lab.host_ns)
        plan = _agent(booted, "plan", "--json")
        assert plan.returncode == ExitCode.REFUSED, plan.stdout + plan.stderr
        blockers = json.loads(plan.stdout)["blockers"]
        assert any("'lab-vlan' (vlan) stands on eth0" in b for b in blockers), blockers
        apply = _agent(booted, "apply")
        assert apply.returncode == ExitCode.REFUSED, apply.stdout + apply.stderr
        assert "nmcli con add type bridge" in apply.stderr, "the manual way"
        assert "Nothing was changed" in apply.stderr
        assert _files(booted) == before_files
        assert_unchanged(before, read_view(booted.lab.host_ns))


def test_a_power_cut_mid_transaction_boots_networkmanager_on_the_nic() -> None:
    """The recover drop-in of NetworkManager.service puts its profiles back before it starts."""
    wrapper = {"/usr/local/bin/bridge-migrate": (f'#!/bin/sh\nexec {AGENT} "$@"\n', 0o755)}
    with booted_lab(STATIC, files=wrapper) as booted:
        configured(booted, STATIC)
        before_files = _files(booted)
        owned = global_addresses(booted, "eth0")
        pending = _agent(booted, "apply", "--timeout", "20", "--confirm-within", "300")
        assert pending.returncode == ExitCode.OK, pending.stdout + pending.stderr
        assert _devices(booted)["br0"] == ("connected", "br0")
        booted.crash()
        booted.boot(plug_first=True)
        deadline = time.monotonic() + _SETTLE
        while global_addresses(booted, "eth0") < owned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert global_addresses(booted, "eth0") >= owned, "booted on the NIC"
        assert _devices(booted)["eth0"] == ("connected", "lab-static")
        assert "br0" not in _devices(booted)
        assert _files(booted) == before_files
        tx = Store(booted.outside(STATE)).load()
        assert tx is not None and tx.phase == Phase.INTERRUPTED, tx
