"""netplan and cloud-init handed over, in lab hosts booted with netplan's networkd rendering
(managed.py): what test_handover.py checks for every row (leases, restarts, reloads, reboot,
rollback), plus what is netplan's own. Measured with the bench meter (1 ms probes from the host
to the gateway over both families) across `apply`: the DHCP lease keeps its identity and is
never released, networkd's view names the bridge, and the hand-over costs what a plain takeover
costs.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge_migrate import handover
from bridge_migrate.contract import GRACE, ExitCode, Phase
from bridge_migrate.failpoints import KILL_AT_ENV
from bridge_migrate.handover import cloudinit, netplan
from bridge_migrate.record import Store
from bridge_migrate_testlab import Lab
from bridge_migrate_testlab.managed import booted_lab, configured, global_addresses, row
from bridge_migrate_testlab.results import MeterResult
from bridge_migrate_testlab.systemd import BootedLab
from installed import installed_units

pytestmark = pytest.mark.root

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
YAML = "/etc/netplan/01-lab.yaml"
_SETTLE = 30.0
_RUNS = 3  # hand-overs (apply, then rollback) measured per lab, against as many plain takeovers


def _agent(booted: BootedLab, *args: str) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = booted.host.run(
        [AGENT, "--state-dir", STATE, *args], timeout=90
    )
    return done


class _Meter:
    """The bench meter in a namespace of the lab, from start to stop (SIGTERM)."""

    def __init__(self, lab: Lab, ns: str, targets: list[str]) -> None:
        argv = [sys.executable, "-m", "bridge_migrate_testlab.meter", "--interval-ms", "1"]
        argv += ["--duration", "60", "--", *targets]
        self.proc = lab.popen(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        assert self.proc.stderr.readline().strip() == "ready"
        time.sleep(0.2)  # probing before the change

    def stop(self) -> MeterResult:
        time.sleep(1.2)  # and after it: long enough to see a ~1 s hole whole
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=10)
        assert out.strip(), err
        return MeterResult.from_json(out)


def _gap(m: MeterResult) -> float:
    """The longest time between two answers, over the streams (ms), as handoverbench has it."""
    return max(s.longest_gap_ms for s in m.streams)


def _lost(m: MeterResult) -> int:
    return sum(s.lost for s in m.streams)


def _networkd(booted: BootedLab, link: str) -> dict[str, str]:
    done = booted.host.run(["networkctl", "status", "--no-pager", link], timeout=30)
    found = {}
    for line in done.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        if value:
            found[key] = value.strip()
    return found


def _read(booted: BootedLab, path: str) -> bytes | None:
    p = booted.host.path(path)
    return p.read_bytes() if p.exists() else None


def _lease(booted: BootedLab, mac: str) -> tuple[str, str]:
    """The host's DHCPv4 lease at the LAN's server: (address, client id)."""
    (held,) = [x for x in booted.lab.dhcp_leases() if x.mac == mac]
    return held.address, held.client_id


def _mac(booted: BootedLab) -> str:
    lab = booted.lab
    return str(
        json.loads(lab.run(lab.host_ns, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]
    )


def _until(check: object, timeout: float = _SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.2)


@pytest.mark.parametrize("name", ["netplan-dhcp", "netplan-static", "cloud-init-netplan"])
def test_networkd_adopts_the_bridge_netplan_renders_without_a_gap(name: str) -> None:
    r = row(name)
    yaml_path = next(p for p in r.files if p.startswith("/etc/netplan/"))
    figures: list[str] = []
    with booted_lab(r) as booted:
        configured(booted, r)
        lab = booted.lab
        original = _read(booted, yaml_path)
        owned = global_addresses(booted, "eth0")
        mac = _mac(booted)
        leased = _lease(booted, mac) if r.dhcp else None
        identity, adoption = netplan.dropins("br0")

        gaps, losses = [], []
        for _ in range(_RUNS):
            meter = _Meter(lab, lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6])
            apply = _agent(booted, "apply", "--timeout", "20")
            measured = meter.stop()
            assert apply.returncode == ExitCode.OK, apply.stdout + apply.stderr
            gaps.append(_gap(measured))
            losses.append(_lost(measured))

            assert global_addresses(booted, "br0") >= owned and not global_addresses(booted, "eth0")
            yaml_now = (_read(booted, yaml_path) or b"").decode()
            assert "bridges:" in yaml_now and f"macaddress: {mac}" in yaml_now
            br0, eth0 = _networkd(booted, "br0"), _networkd(booted, "eth0")
            assert br0["Network File"] == "/run/systemd/network/10-netplan-br0.network", br0
            assert br0["State"].startswith("routable (configured)"), br0
            assert eth0["Network File"] == "/run/systemd/network/10-netplan-eth0.network", eth0
            assert eth0["State"] == "enslaved (configured)", eth0
            assert eth0.get("Master") == "br0", eth0
            assert _read(booted, adoption) is not None
            assert (_read(booted, identity) is not None) == r.dhcp
            if leased:
                assert _lease(booted, mac) == leased, "the same address, the same client id"
            if name == "cloud-init-netplan":
                assert b"network: {config: disabled}" in (_read(booted, cloudinit.DISABLE) or b"")

            back = _agent(booted, "rollback")
            assert back.returncode == ExitCode.OK, back.stdout + back.stderr
            assert _read(booted, yaml_path) == original, "the YAML, byte for byte"
            assert _read(booted, identity) is None and _read(booted, adoption) is None
            assert _read(booted, cloudinit.DISABLE) is None
            _until(lambda: global_addresses(booted, "eth0") >= owned)
            assert global_addresses(booted, "eth0") >= owned
            eth0 = _networkd(booted, "eth0")
            assert eth0["Network File"] == "/run/systemd/network/10-netplan-eth0.network"
            _until(lambda: _networkd(booted, "eth0")["State"].endswith("(configured)"))
            assert _networkd(booted, "eth0")["State"] == "routable (configured)"
            assert not booted.host.path("/run/systemd/network/10-netplan-br0.netdev").exists()
            if leased:
                assert _lease(booted, mac) == leased
        figures.append(
            f"hand-over: longest gap median {statistics.median(gaps):.1f} ms "
            f"(runs {', '.join(f'{g:.1f}' for g in gaps)}), lost {losses}"
        )
    plain_gaps = []
    with Lab() as plain:
        for _ in range(_RUNS):
            meter = _Meter(plain, plain.host_ns, [plain.addrs.gw_v4, plain.addrs.gw_v6])
            argv = [sys.executable, "-m", "bridge_migrate", "--state-dir", f"/tmp/{plain.prefix}"]
            done = plain.run(plain.host_ns, [*argv, "apply"], timeout=60)
            measured = meter.stop()
            assert done.returncode == 0, done.stdout + done.stderr
            plain_gaps.append(_gap(measured))
            undone = plain.run(plain.host_ns, [*argv, "rollback"], timeout=60)
            assert undone.returncode == 0, undone.stdout + undone.stderr
    figures.append(
        f"plain takeover: longest gap median {statistics.median(plain_gaps):.1f} ms "
        f"(runs {', '.join(f'{g:.1f}' for g in plain_gaps)})"
    )
    print(f"{name}: " + "; ".join(figures))
    # The hand-over adds no gap of its own: networkd adopts what the takeover made.
    assert statistics.median(gaps) <= max(20.0, 3 * statistics.median(plain_gaps)), figures


def _files(booted: BootedLab) -> dict[str, bytes | None]:
    identity, adoption = netplan.dropins("br0")
    return {p: _read(booted, p) for p in (YAML, identity, adoption)}


def _states(booted: BootedLab) -> dict[str, str]:
    done = booted.host.run(["networkctl", "list", "--json=short", "--no-pager"], check=True)
    return {i["Name"]: i["AdministrativeState"] for i in json.loads(done.stdout)["Interfaces"]}


def test_systemctl_start_hands_netplan_over_from_inside_the_sandbox() -> None:
    """The unit's sandbox keeps /run read-only; netplan generate runs as systemd's own."""
    r = row("netplan-dhcp")
    with booted_lab(r, units=installed_units()) as booted:
        configured(booted, r)
        before = _files(booted)
        owned = global_addresses(booted, "eth0")
        started = booted.host.systemctl("start", "bridge-migrate", timeout=90)
        assert started.returncode == 0, started.stderr + str(booted.host.journal())
        assert global_addresses(booted, "br0") >= owned
        assert _states(booted) == {"lo": "unmanaged", "eth0": "configured", "br0": "configured"}
        assert all(_files(booted)[p] is not None for p in before)
        back = _agent(booted, "rollback")
        assert back.returncode == ExitCode.OK, back.stdout + back.stderr
        assert _files(booted) == before


def test_dead_man_gives_netplan_its_yaml_back_when_the_agent_dies_after_the_handover() -> None:
    r = row("netplan-dhcp")
    timeout = 3.0
    with booted_lab(r, units=installed_units()) as booted:
        configured(booted, r)
        before = _files(booted)
        owned = global_addresses(booted, "eth0")
        killed = booted.host.run(
            [AGENT, "--state-dir", STATE, "apply", "--timeout", str(timeout)],
            env={KILL_AT_ENV: "handover"},
            timeout=60,
        )
        assert killed.returncode in (137, -9), killed.stdout + killed.stderr
        assert _files(booted) != before  # the hand-over was made
        store = Store(booted.outside(STATE))
        deadline = time.monotonic() + timeout + GRACE + handover.WAIT + 10
        while (tx := store.load()) is not None and tx.phase.pending:
            assert time.monotonic() < deadline, f"still {tx.phase}: {booted.host.journal()}"
            time.sleep(0.2)
        assert tx is not None and tx.phase == Phase.ROLLED_BACK, tx
        assert _files(booted) == before
        assert global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")
        assert _states(booted)["eth0"] == "configured"


def test_a_nic_defined_in_two_yaml_files_is_refused_with_the_manual_way() -> None:
    r = row("netplan-dhcp")
    extra = "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp6: true\n"
    with booted_lab(r, files={"/etc/netplan/90-extra.yaml": (extra, 0o600)}) as booted:
        configured(booted, r)
        before = _files(booted)
        owned = global_addresses(booted, "eth0")
        apply = _agent(booted, "apply", "--timeout", "10")
        assert apply.returncode == ExitCode.REFUSED, apply.stdout + apply.stderr
        said = apply.stderr
        assert "eth0 is defined in /etc/netplan/01-lab.yaml, /etc/netplan/90-extra.yaml" in said
        assert "bridges: {br0: {interfaces: [eth0]" in said and "netplan generate" in said
        assert "Nothing was changed" in said
        assert _files(booted) == before and global_addresses(booted, "eth0") >= owned
        assert not global_addresses(booted, "br0")


def test_a_restart_mid_transaction_boots_netplan_on_the_nic_with_the_yaml_back() -> None:
    """netplan's generator renders the rewritten YAML at boot, before anything of ours runs:
    `bridge-migrate recover` (networkd's ExecStartPre, from the hand-over's drop-in) puts the
    YAML back and renders it again before networkd starts."""
    r = row("netplan-dhcp")
    wrapper = {"/usr/local/bin/bridge-migrate": (f'#!/bin/sh\nexec {AGENT} "$@"\n', 0o755)}
    with booted_lab(r, files=wrapper) as booted:
        configured(booted, r)
        before = _files(booted)
        owned = global_addresses(booted, "eth0")
        pending = _agent(booted, "apply", "--timeout", "20", "--confirm-within", "300")
        assert pending.returncode == ExitCode.OK, pending.stdout + pending.stderr
        booted.crash()  # a power cut inside the confirmation window
        booted.boot(plug_first=True)
        _until(lambda: global_addresses(booted, "eth0") >= owned)
        assert global_addresses(booted, "eth0") >= owned, "booted on the NIC"
        assert not global_addresses(booted, "br0")
        assert _files(booted) == before
        assert not booted.host.path("/run/systemd/network/10-netplan-br0.netdev").exists()
        _until(lambda: _states(booted).get("eth0") == "configured")
        assert _states(booted) == {"lo": "unmanaged", "eth0": "configured"}
        tx = Store(booted.outside(STATE)).load()
        assert tx is not None and tx.phase == Phase.INTERRUPTED, tx
