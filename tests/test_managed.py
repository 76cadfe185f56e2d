"""Managed hosts: in lab hosts booted with a real network manager configuring eth0 (the lab's
managed.py), `plan` names the owner and the addressing, and `apply` refuses before any change
(exit 3), naming the manager and what to do by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge_migrate.contract import ExitCode
from bridge_migrate.owner import Addressing
from bridge_migrate_testlab import Lab
from bridge_migrate_testlab.managed import ROWS, ManagedRow, booted_lab, configured
from hostview import assert_unchanged, read_view

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
# What each manager's refusal must say to do by hand (beside its name and the file).
ALTERNATIVE = {
    "systemd-networkd": "networkctl reload",
    "NetworkManager": "nmcli con add type bridge",
    "ifupdown": "bridge_ports eth0",
    "dhcpcd": "run it on br0",
    "cloud-init": "network: {config: disabled}",
}
NETPLAN = "bridges: {br0: {interfaces: [eth0]"


def _agent(booted: object, *args: str) -> subprocess.CompletedProcess[str]:
    host = booted.host  # type: ignore[attr-defined]
    done: subprocess.CompletedProcess[str] = host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=60
    )
    return done


@pytest.mark.parametrize("r", ROWS, ids=[r.name for r in ROWS])
def test_managed_host_is_named_and_refused_unchanged(r: ManagedRow) -> None:
    started = time.monotonic()
    with booted_lab(r) as booted:
        boot = booted.host.boot_seconds
        waited = configured(booted, r)
        plan = _agent(booted, "plan", "--json")
        expected = ExitCode.OK if r.handed_over else ExitCode.REFUSED
        assert plan.returncode == expected, plan.stdout + plan.stderr
        owner = json.loads(plan.stdout)["owner"]
        owners = {o["manager"]: o for o in owner["owners"]}
        assert r.manager in owners, owner
        assert any(r.source in o["source"] + o["generator"] for o in owners.values()), owner
        addressing = {a for o in owners.values() for a in o["addressing"]}
        assert addressing == {a.value for a in r.addressing}, owner
        assert set(owner["addressing"]) == {a.value for a in r.addressing}, owner  # the kernel's

        if r.handed_over:
            return  # test_handover.py
        before = read_view(booted.lab.host_ns)
        apply = _agent(booted, "apply", "--timeout", "5")
        assert apply.returncode == ExitCode.REFUSED, apply.stdout + apply.stderr
        assert_unchanged(before, read_view(booted.lab.host_ns))
        assert f"eth0 is managed by {r.manager}" in apply.stderr
        assert ALTERNATIVE[r.manager] in apply.stderr, apply.stderr
        assert "Nothing was changed" in apply.stderr
        if r.name.startswith("netplan"):
            assert NETPLAN in apply.stderr and "networkd's files" in apply.stderr
    print(f"{r.name}: boot {boot:.1f} s, configured after {waited:.1f} s, ")
    print(f"plan asked the managers in {owner['ms']:.1f} ms, {time.monotonic() - started:.1f} s")


def test_finite_address_without_a_client_is_carried_and_said_so(tmp_path: Path) -> None:
    with Lab() as lab:
        lab.ip_batch(
            lab.host_ns, ["addr add 198.18.0.12/24 dev eth0 valid_lft 300 preferred_lft 300"]
        )
        argv = [sys.executable, "-m", "bridge_migrate", "--state-dir", str(tmp_path), "plan"]
        text = lab.run(lab.host_ns, argv, timeout=60)
        doc = json.loads(lab.run(lab.host_ns, [*argv, "--json"], timeout=60).stdout)
    assert text.returncode == 0, text.stderr
    assert "nobody manages eth0 (static, dhcpv4;" in text.stdout
    assert "198.18.0.12/24 has a finite lifetime and no client here renews it" in text.stdout
    assert doc["owner"]["owners"] == [] and doc["owner"]["unrenewed"] == ["198.18.0.12/24"]
    assert doc["owner"]["addressing"] == [Addressing.STATIC.value, Addressing.DHCPV4.value]
