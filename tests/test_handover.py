"""Managed hosts handed over: in lab hosts booted with a real network manager configuring eth0,
`apply` rewrites the manager's own configuration inside the transaction and the manager adopts
br0. The host stays on the same addresses through lease renewals, manager restarts and reloads,
boots onto br0 with no unit of ours (or, for a manager that does not come back at boot, as the
host would have booted without the migration, as `plan` said), and `rollback` gives everything
back, files byte for byte.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge_migrate import handover
from bridge_migrate.contract import GRACE, ExitCode, Phase
from bridge_migrate.failpoints import KILL_AT_ENV
from bridge_migrate.record import Store
from bridge_migrate_testlab.lab import LabAddresses
from bridge_migrate_testlab.managed import (
    ROWS,
    ManagedRow,
    booted_lab,
    configured,
    global_addresses,
    row,
    soak,
)
from bridge_migrate_testlab.systemd import BootedLab
from hostview import assert_unchanged, read_view
from installed import installed_units

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
LEASE = 120.0  # the LAN's dnsmasq leases (managed.py): two of them are watched
HANDED = [r for r in ROWS if r.handed_over]
_A = LabAddresses()
_SETTLE = 30.0  # seconds for a manager to configure again after a restart, a reload or a boot


def _agent(booted: BootedLab, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = booted.host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=timeout
    )
    return done


def _files(booted: BootedLab, r: ManagedRow, extra: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The row's configuration directories, every file's bytes (what rollback must give back)."""
    found: dict[str, bytes] = {}
    for inside in {str(Path(p).parent) for p in r.files} | set(extra):
        root = booted.host.path(inside)
        for p in sorted(root.rglob("*")) if root.is_dir() else ():
            if p.is_file():
                found[f"{inside}/{p.relative_to(root)}"] = p.read_bytes()
    return found


def _until_addresses(booted: BootedLab, dev: str, want: set[str], timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while (have := global_addresses(booted, dev)) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return have


def _reachable(booted: BootedLab) -> None:
    lab = booted.lab
    lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=_SETTLE)


def _enabled_units(booted: BootedLab) -> list[str]:
    done = booted.host.run(
        ["systemctl", "list-unit-files", "--state=enabled", "--no-legend", "bridge-migrate*"]
    )
    return done.stdout.split()


def _owners(plan_json: str) -> list[dict[str, object]]:
    """The owners `plan` names; a client restarted is the same owner with another pid (and
    one process per family may come back in another order)."""
    owners: list[dict[str, object]] = json.loads(plan_json)["owner"]["owners"]
    return [{**o, "source": _processes(str(o["source"]))} for o in owners]


def _processes(source: str) -> str:
    return "; ".join(sorted(re.sub(r"^pid \d+: ", "pid: ", p) for p in source.split("; ")))


@pytest.mark.soak
@pytest.mark.parametrize("r", HANDED, ids=[r.name for r in HANDED])
def test_handed_over_host_survives_leases_restarts_and_reboots(r: ManagedRow) -> None:
    figures: list[str] = []
    with booted_lab(r) as booted:
        configured(booted, r)
        before_files = _files(booted, r)
        before = read_view(booted.lab.host_ns)
        owned = global_addresses(booted, "eth0")
        mac = json.loads(
            booted.lab.run(booted.lab.host_ns, ["ip", "-j", "link", "show", "eth0"]).stdout
        )[0]["address"]
        plan = _agent(booted, "plan", "--json")
        assert plan.returncode == ExitCode.OK, plan.stdout + plan.stderr

        started = time.monotonic()
        apply = _agent(booted, "apply", "--timeout", "20")
        assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr
        figures.append(f"apply {time.monotonic() - started:.1f} s")
        assert global_addresses(booted, "br0") >= owned, "br0 holds eth0's addresses"
        assert not global_addresses(booted, "eth0")
        if r.files:
            assert _files(booted, r) != before_files, "the manager's files name br0"

        if r.dhcp:
            watched = soak(booted, 2 * LEASE + 15, mac, dhcp=True)
            figures.append(
                f"soak {watched.seconds:.0f} s: {watched.probes} probes, {watched.lost} lost, "
                f"longest gap {watched.longest_gap_ms:.0f} ms, {len(watched.expiries)} lease "
                f"expiries seen, {watched.gone} samples without"
            )
            assert watched.lost == 0, watched
            assert watched.gone == 0, "the lease was released or expired"
            assert len(watched.expiries) >= 3, "the lease was renewed at least twice"
            assert global_addresses(booted, "br0") >= owned, "the same addresses, renewed"
            assert not global_addresses(booted, "eth0")

        for how in (r.restart, r.reload):
            if not how:
                continue  # a client run by hand: no manager to restart
            booted.host.run(how, check=True, timeout=60)
            _reachable(booted)
            assert _until_addresses(booted, "br0", owned, _SETTLE) >= owned, how
            assert not global_addresses(booted, "eth0"), how

        booted.poweroff()
        booted.boot(plug_first=True)  # as a real machine boots: its NIC is there
        if r.boots_onto_bridge:
            configured_at = time.monotonic()
            assert _until_addresses(booted, "br0", owned, _SETTLE) >= owned, "booted onto br0"
            _reachable(booted)
            figures.append(f"after reboot on br0 in {time.monotonic() - configured_at:.1f} s")
            assert not global_addresses(booted, "eth0")
        else:
            _booted_as_without_migration(booted, json.loads(plan.stdout))
            # The way back from there is the one `plan` named: start the client by hand (a
            # rollback straight from the bare NIC is a gap of the core's, in its report).
            configured(booted, r)
        assert _enabled_units(booted) == [], "no unit of ours brought it up"

        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert _files(booted, r) == before_files, "the manager's files, byte for byte"
        assert _until_addresses(booted, "eth0", owned, _SETTLE) >= owned
        _reachable(booted)
        after = read_view(booted.lab.host_ns)
        assert after.links == before.links
        assert not global_addresses(booted, "br0")
        replan = _agent(booted, "plan", "--json")
        assert _owners(replan.stdout) == _owners(plan.stdout)
    print(f"{r.name}: " + "; ".join(figures))


def _booted_as_without_migration(booted: BootedLab, plan: dict[str, object]) -> None:
    """Nothing configures eth0 at boot, before the migration or after: no br0, eth0 bare, as
    `plan` said beforehand."""
    notes = " ".join(str(n) for n in plan.get("handover_notes", []))  # type: ignore[attr-defined]
    assert "at reboot" in notes and "bare eth0" in notes, notes
    time.sleep(_QUIET)  # what a boot would configure has had time to come
    lab = booted.lab
    assert lab.run(lab.host_ns, ["ip", "link", "show", "br0"]).returncode != 0, "br0 at boot"
    assert not global_addresses(booted, "eth0"), "eth0 configured at boot"


_QUIET = 5.0


@pytest.mark.parametrize("r", HANDED, ids=[r.name for r in HANDED])
def test_failed_verification_gives_the_manager_its_files_back(r: ManagedRow) -> None:
    with booted_lab(r) as booted:
        configured(booted, r)
        before_files = _files(booted, r)
        before = read_view(booted.lab.host_ns)
        owned = global_addresses(booted, "eth0")
        nobody = "198.18.0.222"  # on the LAN's prefix, answered by no one
        apply = _agent(booted, "apply", "--timeout", "3", "--probe", f"icmp:{nobody}")
        assert apply.returncode == ExitCode.ROLLED_BACK, apply.stdout + apply.stderr
        assert _files(booted, r) == before_files
        assert _until_addresses(booted, "eth0", owned, _SETTLE) >= owned
        if not r.dhcp:
            assert_unchanged(before, read_view(booted.lab.host_ns), learned_may_go=True)
        assert global_addresses(booted, "eth0") >= {a for a in global_addresses(booted, "eth0")}
        _reachable(booted)


NETWORKD = row("networkd-static")


def _networkd_states(booted: BootedLab) -> dict[str, str]:
    done = booted.host.run(["networkctl", "list", "--json=short", "--no-pager"], check=True)
    return {i["Name"]: i["AdministrativeState"] for i in json.loads(done.stdout)["Interfaces"]}


def test_systemctl_start_hands_over_from_inside_the_sandbox() -> None:
    with booted_lab(NETWORKD, units=installed_units()) as booted:
        configured(booted, NETWORKD)
        before_files = _files(booted, NETWORKD)
        started = booted.host.systemctl("start", "bridge-migrate", timeout=90)
        assert started.returncode == 0, started.stderr + str(booted.host.journal())
        assert global_addresses(booted, "br0") >= {f"{_A.host_v4}/24"}
        assert _networkd_states(booted) == {
            "lo": "unmanaged",
            "eth0": "configured",
            "br0": "configured",
        }
        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert _files(booted, NETWORKD) == before_files


def test_dead_man_restores_the_manager_when_the_agent_dies_after_the_handover() -> None:
    timeout = 3.0
    with booted_lab(NETWORKD, units=installed_units()) as booted:
        configured(booted, NETWORKD)
        before_files = _files(booted, NETWORKD)
        owned = global_addresses(booted, "eth0")
        killed = booted.host.run(
            [AGENT, "--state-dir", STATE, "apply", "--timeout", str(timeout)],
            env={KILL_AT_ENV: "handover"},
            timeout=60,
        )
        assert killed.returncode in (137, -9), killed.stdout + killed.stderr
        assert _files(booted, NETWORKD) != before_files  # the hand-over was made
        store = Store(booted.outside(STATE))
        deadline = time.monotonic() + timeout + GRACE + handover.WAIT + 10
        while (tx := store.load()) is not None and tx.phase.pending:
            assert time.monotonic() < deadline, f"still {tx.phase}: {booted.host.journal()}"
            time.sleep(0.2)
        assert tx is not None and tx.phase == Phase.ROLLED_BACK, tx
        assert _files(booted, NETWORKD) == before_files
        assert global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")
        assert _networkd_states(booted)["eth0"] == "configured"
        _reachable(booted)


def test_a_restart_mid_transaction_boots_on_the_nic_with_the_files_back() -> None:
    # The unit's drop-in calls `bridge-migrate` by name, as installed in /usr/local/bin.
    wrapper = {"/usr/local/bin/bridge-migrate": (f'#!/bin/sh\nexec {AGENT} "$@"\n', 0o755)}
    recover = "/etc/systemd/system/systemd-networkd.service.d/bridge-migrate-recover.conf"
    with booted_lab(NETWORKD, files=wrapper) as booted:
        configured(booted, NETWORKD)
        before_files = _files(booted, NETWORKD)
        owned = global_addresses(booted, "eth0")
        pending = _agent(booted, "apply", "--timeout", "20", "--confirm-within", "300")
        assert pending.returncode == ExitCode.OK, pending.stdout + pending.stderr
        assert booted.host.path(recover).exists()
        booted.crash()  # a power cut inside the confirmation window
        booted.boot(plug_first=True)
        assert _until_addresses(booted, "eth0", owned, _SETTLE) >= owned, "booted on the NIC"
        _reachable(booted)
        assert not global_addresses(booted, "br0")
        assert _files(booted, NETWORKD) == before_files
        assert not booted.host.path(recover).exists()
        tx = Store(booted.outside(STATE)).load()
        assert tx is not None and tx.phase == Phase.INTERRUPTED, tx
