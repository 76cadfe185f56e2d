"""dhcpcd's hand-over, what is its own (the generic lifecycle is tests/test_handover.py's):
refused before any change where dhcpcd cannot be handed over (it serves every interface, a unit
file starts it at boot, dhcpcd.conf has options for eth0 alone), and an agent killed before or
after dhcpcd moved: the dead man's rollback from the record, in the installed units' sandbox,
gives eth0 its dhcpcd back, with the lease."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bridge_migrate import handover
from bridge_migrate.contract import GRACE, ExitCode, Phase
from bridge_migrate.failpoints import KILL_AT_ENV
from bridge_migrate.record import Store
from bridge_migrate_testlab.managed import ManagedRow, booted_lab, configured, global_addresses, row
from bridge_migrate_testlab.systemd import BootedLab
from hostview import assert_unchanged, read_view
from installed import installed_units

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
DHCPCD = row("dhcpcd")
_UNIT = "/etc/systemd/system/lab-dhcpcd.service"
_BOOT_UNIT = """[Unit]
Description=dhcpcd on eth0, started at boot
[Service]
ExecStart=/usr/sbin/dhcpcd -B eth0
[Install]
WantedBy=multi-user.target
"""
_CONF = "/etc/dhcpcd.conf"
_SETTLE = 30.0


def _refused_row(name: str, **changes: object) -> ManagedRow:
    return replace(DHCPCD, name=name, handed_over=False, **changes)  # type: ignore[arg-type]


def _conf_with_block() -> str:
    """The machine's dhcpcd.conf (the lab's root is an overlay of it) with options for eth0."""
    return Path(_CONF).read_text() + "\ninterface eth0\n    noipv4ll\n"


REFUSED = [
    pytest.param(
        _refused_row(
            "dhcpcd-master",
            # --nodev: no udev runs in the lab, and dhcpcd serving every interface waits for
            # udev to announce them.
            after_boot=("systemd-run", "--unit=lab-dhcpcd", "--", "dhcpcd", "-B", "--nodev"),
            source="dhcpcd: [manager]",
        ),
        "dhcpcd serves every interface",
        "denyinterfaces eth0",
        id="all-interfaces",
    ),
    pytest.param(
        # lab.target requires it: started at boot, and enabled, as a distribution's would be.
        _refused_row(
            "dhcpcd-boot",
            after_boot=("systemctl", "enable", "lab-dhcpcd.service"),
            files={_UNIT: (_BOOT_UNIT, 0o644)},
            requires=("lab-dhcpcd.service",),
        ),
        "lab-dhcpcd.service (enabled) is a unit file's: it starts dhcpcd on eth0 again",
        "point lab-dhcpcd.service at br0",
        id="boot-unit",
    ),
    pytest.param(
        _refused_row("dhcpcd-block", files={_CONF: (_conf_with_block(), 0o644)}),
        "`interface eth0` options would not follow dhcpcd onto br0",
        "copy that block as `interface br0`",
        id="interface-block",
    ),
]


def _agent(
    booted: BootedLab, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = booted.host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=90, env=env
    )
    return done


@pytest.mark.parametrize(("r", "reason", "first"), REFUSED)
def test_refused_before_any_change(r: ManagedRow, reason: str, first: str) -> None:
    with booted_lab(r) as booted:
        configured(booted, r)
        before = read_view(booted.lab.host_ns)
        plan = _agent(booted, "plan")
        assert plan.returncode == ExitCode.REFUSED, plan.stdout + plan.stderr
        apply = _agent(booted, "apply", "--timeout", "5")
        assert apply.returncode == ExitCode.REFUSED, apply.stdout + apply.stderr
        assert_unchanged(before, read_view(booted.lab.host_ns))
        message = " ".join(apply.stderr.split())  # unwrapped
        assert "eth0 is managed by dhcpcd" in message, message
        assert reason in message and first in message, message
        assert "Nothing was changed" in message, message
        assert booted.host.run(["systemctl", "is-active", "lab-dhcpcd.service"]).stdout.strip() == (
            "active"
        ), "dhcpcd left running"


# Killed after the netlink batch and the check, before dhcpcd is told anything; and after it
# moved to br0, before the gateway answered. The dead man rolls back from the record alone, in
# the installed units' sandbox: dhcpcd is started on eth0 again (or left there), with the lease.
@pytest.mark.parametrize("boundary", ["verifying", "handover"])
def test_dead_man_gives_dhcpcd_back_when_the_agent_dies(boundary: str) -> None:
    timeout = 3.0
    with booted_lab(DHCPCD, units=installed_units()) as booted:
        configured(booted, DHCPCD)
        owned = global_addresses(booted, "eth0")
        killed = _agent(booted, "apply", "--timeout", str(timeout), env={KILL_AT_ENV: boundary})
        assert killed.returncode in (137, -9), killed.stdout + killed.stderr
        moved = _exec_start(booted)
        assert ("br0" in moved) == (boundary == "handover"), moved
        store = Store(booted.outside(STATE))
        deadline = time.monotonic() + timeout + GRACE + handover.WAIT + 10
        while (tx := store.load()) is not None and tx.phase.pending:
            assert time.monotonic() < deadline, f"still {tx.phase}: {_ours(booted)}"
            time.sleep(0.2)
        assert tx is not None and tx.phase == Phase.ROLLED_BACK, f"{tx}: {_ours(booted)}"
        lab = booted.lab
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=_SETTLE)
        assert global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")
        assert _exec_start(booted).endswith("-B eth0"), "dhcpcd on eth0 in its unit again"
        assert not list(booted.outside("/var/lib/dhcpcd").glob("br0.*")), "br0's leases"
        time.sleep(5)  # a client that would take eth0's addresses after the rollback has done so
        assert global_addresses(booted, "eth0") >= owned
        assert booted.host.run(["systemctl", "is-active", "lab-dhcpcd.service"]).stdout.strip() == (
            "active"
        )


def _exec_start(booted: BootedLab) -> str:
    """lab-dhcpcd.service's command line ("" if it is not loaded)."""
    shown = booted.host.run(["systemctl", "show", "-P", "ExecStart", "lab-dhcpcd.service"])
    found = [w for w in shown.stdout.split(";") if w.strip().startswith("argv[]=")]
    return found[0].strip().removeprefix("argv[]=").strip() if found else ""


def _ours(booted: BootedLab) -> list[str]:
    """What the agent's units and dhcpcd's logged."""
    return [
        f"{e.get('_SYSTEMD_UNIT', '')}: {e.get('MESSAGE', '')}"
        for e in booted.host.journal()
        if e.get("_SYSTEMD_UNIT", "").startswith(("bridge-migrate", "lab-dhcpcd"))
        and e.get("_TRANSPORT") != "syslog"
    ]
