"""Tests for bridge_migrate_testlab.systemd: a real systemd as PID 1 in namespaces, as the lab's
host. Root only."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge_migrate_testlab.systemd import (
    Bind,
    BootedHost,
    BootedLab,
    BootSpec,
    UnitFailure,
    cgroup_base,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
]

VENV_BIN = Path(sys.executable).parent
# What a lab boot runs on this machine (Debian 12, systemd 252): anything new needs a look
# (does it touch the machine?) and then either a mask in the lab's systemd.py or a place here.
EXPECTED_SERVICES = {
    "systemd-journald.service",
    "systemd-journal-flush.service",
    "systemd-sysusers.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup.service",
    "systemd-update-utmp.service",
}
# Where a leaky boot would write on the machine (docs/lab.md: timer stamps, udev in /dev).
MACHINE_PATHS = ("/etc", "/var/lib/systemd", "/var/log/journal")

NOTIFY_SCRIPT = """
import time
from systemd import daemon
daemon.notify("STATUS=warming up")
time.sleep(0.3)
daemon.notify("READY=1\\nSTATUS=serving requests")
time.sleep(60)
"""
MARKER_UNIT = """[Unit]
Description=append this boot's ID to the persistent state
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat /proc/sys/kernel/random/boot_id >> /var/lib/bridge-migrate/boots'
"""


@pytest.fixture
def host() -> Iterator[BootedHost]:
    with BootedHost() as booted:
        yield booted


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def processes_in_cgroup(name: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"netlab-{name}" in (proc / "cgroup").read_text():
                found.append(int(proc.name))
        except OSError:
            continue  # exited meanwhile
    return found


def machine_snapshot() -> dict[str, tuple[int, ...]]:
    """Owner, mode, size, mtime of everything a boot could write to on the machine."""
    snap: dict[str, tuple[int, ...]] = {}
    paths = [os.path.join("/dev", n) for n in os.listdir("/dev")]
    for top in MACHINE_PATHS:
        for root, dirs, files in os.walk(top):
            paths += [os.path.join(root, n) for n in [*dirs, *files]]
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        snap[p] = (st.st_uid, st.st_gid, st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def assert_gone(booted: BootedHost) -> None:
    assert not booted.alive
    assert not processes_in_cgroup(booted.name)
    assert not (cgroup_base() / f"netlab-{booted.name}").exists()
    assert booted.name not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path(tempfile.gettempdir()).glob(f"netlab-{booted.name}-*"))


def test_boots_to_running_with_nothing_of_the_machines(host: BootedHost) -> None:
    assert host.state == "running", host.failed
    assert host.boot_seconds < 5
    assert host.run(["hostname"]).stdout.strip() == "labhost"
    assert host.systemctl("is-system-running").stdout.strip() == "running"
    done = host.systemctl("list-units", "--plain", "--no-legend", "--state=active", "*.service")
    assert {line.split()[0] for line in done.stdout.splitlines()} <= EXPECTED_SERVICES
    assert host.systemctl("is-enabled", "systemd-sysctl.service").stdout.strip() == "masked-runtime"
    # Kernel-wide settings are read-only inside (the same value, in case they were not),
    # the network namespace's own ones are not.
    swappiness = Path("/proc/sys/vm/swappiness").read_text().strip()
    done = host.run(["sh", "-c", f"echo {swappiness} > /proc/sys/vm/swappiness"])
    assert done.returncode != 0 and "Read-only file system" in done.stderr
    host.run(["sysctl", "-q", "-w", "net.ipv4.conf.lo.forwarding=0"], check=True)
    # Its own boot ID (also in a service with a /proc of its own) and PID namespace; the
    # agent's venv runs inside.
    boot_id = host.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
    assert boot_id != Path("/proc/sys/kernel/random/boot_id").read_text()
    own_proc = ["--property=ProtectProc=invisible", "--property=ProtectKernelTunables=yes"]
    done = host.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            *own_proc,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]
    )
    assert done.stdout == boot_id, done.stderr
    assert host.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    done = host.run([str(VENV_BIN / "bridge-migrate"), "--help"], timeout=30)
    assert done.returncode == 0 and "usage: bridge-migrate" in done.stdout


def test_a_failing_required_unit_degrades_the_boot() -> None:
    failing = "[Service]\nType=oneshot\nExecStart=/bin/false\n"
    spec = BootSpec(units={"lab-fails.service": failing}, requires=("lab-fails.service",))
    with BootedHost(spec) as booted:
        assert booted.state == "degraded"
        assert booted.failed == (UnitFailure("lab-fails.service", "exit-code"),)


def test_transient_timer_fires_on_time_without_dbus(host: BootedHost) -> None:
    # The timer is collected once elapsed: its service stays (RemainAfterExit) to be asked.
    argv = ["systemd-run", "--unit=lab-tick", "--on-active=1", "--timer-property=AccuracySec=10ms"]
    argv += ["--property=Type=oneshot", "--property=RemainAfterExit=yes", "--", "true"]
    host.run(argv, check=True)
    armed = int(host.show("lab-tick.timer", "ActiveEnterTimestampMonotonic"))
    deadline = time.monotonic() + 3
    while (fired := int(host.show("lab-tick.service", "InactiveExitTimestampMonotonic"))) == 0:
        assert time.monotonic() < deadline, "timer did not fire in 3 s"
        time.sleep(0.05)
    assert 1.0 <= (fired - armed) / 1e6 <= 1.2
    assert host.show("lab-tick.service", "Result") == "success"


def test_persistent_timer_stamps_stay_inside(host: BootedHost) -> None:
    argv = ["systemd-run", "--unit=lab-stamp", "--on-calendar=*:*:0/1"]
    argv += ["--timer-property=Persistent=true", "--timer-property=AccuracySec=10ms", "true"]
    host.run(argv, check=True)
    stamp = host.path("/var/lib/systemd/timers/stamp-lab-stamp.timer")
    deadline = time.monotonic() + 3
    while not stamp.exists():
        assert time.monotonic() < deadline, "no timer stamp in 3 s"
        time.sleep(0.05)
    assert not Path("/var/lib/systemd/timers/stamp-lab-stamp.timer").exists()
    # systemctl and systemd-run talk to PID 1 directly: the bus was never started
    assert host.systemctl("is-active", "dbus.service").stdout.strip() == "inactive"


def test_notify_service_reports_ready_and_status(host: BootedHost) -> None:
    host.path("/run/lab-notify.py").write_text(NOTIFY_SCRIPT)
    unit = f"[Service]\nType=notify\nExecStart={VENV_BIN / 'python'} /run/lab-notify.py\n"
    host.install_unit("lab-notify.service", unit)
    started = time.monotonic()
    host.systemctl("start", "lab-notify.service", check=True, timeout=10)
    assert time.monotonic() - started >= 0.3  # start waited for READY=1
    assert host.show("lab-notify.service", "StatusText") == "serving requests"
    status = host.systemctl("status", "lab-notify.service").stdout
    assert 'Status: "serving requests"' in status and "active (running)" in status


def test_journal_shows_structured_fields(host: BootedHost) -> None:
    code = "from systemd import journal; journal.send(MESSAGE='hello lab', FOO_FIELD='bar 42')"
    host.run([str(VENV_BIN / "python"), "-c", code], check=True)
    entry = host.wait_journal({"FOO_FIELD": "bar 42"}, timeout=5)
    assert entry["MESSAGE"] == "hello lab"
    assert entry["_HOSTNAME"] == "labhost"
    assert any(e.get("MESSAGE", "").startswith("Startup finished") for e in host.journal())


def test_reboot_keeps_persistent_dirs_and_leaves_nothing(tmp_path: Path) -> None:
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir()
    spec = BootSpec(
        hostname="rebooter",
        units={"lab-marker.service": MARKER_UNIT},
        requires=("lab-marker.service",),
        binds=(Bind(etc, "/etc/bridge-migrate"), Bind(state, "/var/lib/bridge-migrate")),
    )
    before = machine_snapshot()
    with BootedLab(spec) as bl:
        lab, first = bl.lab, bl.host
        assert first.state == "running", first.failed
        assert first.run(["ip", "-o", "link", "show", "eth0"]).returncode == 0
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6])
        first.run(["sh", "-c", "echo kept > /etc/bridge-migrate/config"], check=True)
        first.run(["sh", "-c", "echo lost > /var/tmp/scratch"], check=True)
        first_pid = first.pid

        assert bl.poweroff() < 5
        assert lab.host_ns not in netns_names()  # the host's namespace and NIC vanished
        assert "p-host" not in lab.run(lab.lan_ns, ["ip", "-o", "link"]).stdout
        assert_gone(first)

        second = bl.boot()
        assert second.pid != first_pid and second.state == "running"
        assert second.run(["cat", "/etc/bridge-migrate/config"]).stdout == "kept\n"
        assert second.run(["cat", "/var/tmp/scratch"]).returncode != 0
        boots = (state / "boots").read_text().split()
        assert len(boots) == 2 and boots[0] != boots[1]
        lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6, lab.addrs.peer_v4])
        namespaces = lab.namespaces
    assert not set(namespaces) & netns_names()
    assert_gone(second)
    assert (etc / "config").read_text() == "kept\n"  # caller-owned: never removed
    assert machine_snapshot() == before


def test_exit_cleans_up_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="test failure"), BootedLab() as bl:
        booted, namespaces = bl.host, bl.lab.namespaces
        booted.popen(["sleep", "60"])
        raise RuntimeError("test failure")
    assert not set(namespaces) & netns_names()
    assert_gone(booted)


def test_a_hanging_poweroff_is_killed_within_its_timeout() -> None:
    stubborn = "[Service]\nExecStart=sleep 300\nExecStop=sleep 300\nTimeoutStopSec=300\n"
    spec = BootSpec(units={"lab-stubborn.service": stubborn}, requires=("lab-stubborn.service",))
    with BootedHost(spec) as booted:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not power off"):
            booted.poweroff(timeout=1.0)
        assert time.monotonic() - started < 3
        assert_gone(booted)
