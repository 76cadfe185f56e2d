"""scripts/bridge-migrate-remote against a real sshd in a lab host booted with systemd: the client
runs in the lab's peer namespace across the lab LAN, with a throwaway key and its own ssh
configuration. Success (the first session survives, a new connection confirms), a dead gateway
(rolled back by the agent), SSH blocked on the new path only (not confirmed: rolled back by the
host's dead man, reported after reconnecting)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate.record import Store, Transaction
from hostview import HostView, assert_unchanged, read_view
from netlab.sshlab import ClientHost, SshKeys, drop_new_ssh, ssh_spec, tree_digest
from netlab.sshlab import write_client_config as write_ssh_config
from netlab.systemd import Bind, BootedLab, BootSpec

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bridge-migrate-remote"
PREFIX = "/opt/bridge-migrate"
STATE = "/var/lib/bridge-migrate"
SCRIPT_TIMEOUT = 120.0  # bounds every run of the script; the slowest case takes ~15 s


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's wheels, built once per test session (shared by xdist workers)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target = shared / "bridge-migrate-wheels"
    with open(shared / "bridge-migrate-wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".done").exists():
            done = subprocess.run(
                [sys.executable, str(SCRIPT), "--build-wheels", str(target)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            (target / ".done").touch()
    return target


@dataclass
class Report:
    code: int
    doc: dict[str, Any]
    output: str  # the progress, as a user sees it
    seconds: float


class SshHost:
    """A booted lab host running sshd with throwaway keys; the agent's prefix and its state
    directory are test directories (empty at first), so that nothing is found pre-installed
    and the record can be read from here."""

    def __init__(self, directory: Path, keys: SshKeys, hostname: str = "labhost") -> None:
        self.name = hostname
        self.opt, self.state = directory / "opt", directory / "state"
        self.opt.mkdir(parents=True)
        self.state.mkdir(mode=0o700)
        binds = (Bind(self.opt, PREFIX), Bind(self.state, STATE))
        self.booted = BootedLab(ssh_spec(keys, BootSpec(hostname=hostname, binds=binds)))

    def record(self) -> Transaction | None:
        return Store(self.state).load()

    def view(self) -> HostView:
        return read_view(self.booted.lab.host_ns)

    def leftovers(self) -> list[str]:
        """What the remote run may not leave on the host: units, timers, processes of its
        own, temporary files."""
        host = self.booted.host
        units = host.systemctl("list-units", "--all", "--plain", "--no-legend", "bridge-migrate*")
        temp = host.run(["sh", "-c", "ls -d /tmp/bridge-migrate* /var/tmp/bridge-migrate* || :"])
        procs = host.run(["pgrep", "-a", "-f", "bridge-migrate|journalctl"])
        return [x for x in (units.stdout + temp.stdout + procs.stdout).splitlines() if x.strip()]


class Remote:
    """The client side: ssh configuration and a throwaway key of the test; the script runs in
    the lab's peer namespace, with a HOME of the test (so ~/.ssh is never read or written)."""

    def __init__(self, host: SshHost, keys: SshKeys, directory: Path, wheels: Path) -> None:
        self.host, self.wheels, self.home = host, wheels, directory / "home"
        self.home.mkdir()
        lab = host.booted.lab
        entry = ClientHost(host.name, lab.addrs.host_v4)
        self.config = write_ssh_config(directory / "ssh_config", keys, [entry])

    def run(self, *apply: str, own: tuple[str, ...] = ()) -> Report:
        lab = self.host.booted.lab
        argv = [sys.executable, str(SCRIPT), "--wheels", str(self.wheels), "--json"]
        argv += ["--connect-timeout", "2", *own, self.host.name, "-F", str(self.config)]
        argv += ["--", *apply]
        started = time.monotonic()
        done = lab.run(lab.peer_ns, argv, timeout=SCRIPT_TIMEOUT, env={"HOME": str(self.home)})
        seconds = time.monotonic() - started
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"no JSON report (exit {done.returncode}): {done.stdout}{done.stderr}")
        return Report(done.returncode, doc, done.stderr, seconds)


def _machine_sshd() -> list[int]:
    """sshd processes in the machine's own network namespace (there must be none)."""
    mine = os.stat("/proc/self/ns/net")
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            ns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if comm == "sshd" and (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino):
            found.append(int(pid))
    return found


@pytest.fixture
def machine_untouched() -> Iterator[None]:
    """The machine's own SSH setup is not changed, and no sshd runs on its interfaces."""
    watched = [Path("/etc/ssh"), Path.home() / ".ssh", Path.home() / ".ansible"]
    before = {p: tree_digest(p) for p in watched if p.exists()}
    yield
    assert {p: tree_digest(p) for p in watched if p.exists()} == before
    assert _machine_sshd() == []


@pytest.fixture
def keys(tmp_path: Path) -> SshKeys:
    return SshKeys.make(tmp_path / "keys")


@pytest.fixture
def host(tmp_path: Path, keys: SshKeys, machine_untouched: None) -> Iterator[SshHost]:
    h = SshHost(tmp_path / "host", keys)
    with h.booted:
        yield h


@pytest.fixture
def remote(host: SshHost, keys: SshKeys, tmp_path: Path, wheels: Path) -> Remote:
    return Remote(host, keys, tmp_path, wheels)


def _wait_for(condition: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {limit} s")
        time.sleep(0.1)


def assert_migrated(view: HostView) -> None:
    assert view.link("eth0")[5] == "br0"  # type: ignore[index]
    assert "198.18.0.10" in view.addresses_on("br0")
    assert not [a for a in view.addresses_on("eth0") if not a.startswith("fe80")]


def _port(connection: str) -> str:
    """The client port of an SSH_CONNECTION value ("CLIENT PORT SERVER PORT")."""
    parts = connection.split()
    assert len(parts) == 4, connection
    return parts[1]


def test_installs_migrates_and_confirms_over_a_new_connection(
    remote: Remote, host: SshHost
) -> None:
    report = remote.run("--timeout", "5", "--confirm-within", "20")
    doc = report.doc
    assert report.code == 0, report.output
    assert doc["result"] == "migrated" and doc["phase"] == "committed"
    assert doc["installed_now"] and doc["agent_version"] == "0.1.0"
    assert (host.opt / "bin" / "bridge-migrate").exists()
    # The first session (install, apply, journal) survived the takeover; the confirmation
    # came over another TCP connection, opened after it.
    assert doc["first_session"] == "survived"
    assert _port(doc["first_connection"]) != _port(doc["confirm_connection"])
    assert doc["confirm_attempts"] == [a for a in doc["confirm_attempts"] if "confirmed" in a]
    record = host.record()
    assert record is not None and record.phase == "committed"
    assert record.id == doc["transaction"]
    assert_migrated(host.view())
    # Progress was streamed: the agent's phases, as they happened.
    for phase in ("snapshot", "batch", "verify"):
        assert f"] {phase} " in report.output
    # Nothing left behind but the agent and its record (the dead man's timer is gone too).
    _wait_for(lambda: not host.leftovers(), 5)

    again = remote.run("--timeout", "5")
    assert again.code == 0, again.output
    assert again.doc["result"] == "already migrated"
    assert not again.doc["installed_now"]  # the same version is there: not reinstalled
    assert "already migrated" in again.doc["message"]


def test_dead_gateway_is_rolled_back_and_reported(remote: Remote, host: SshHost) -> None:
    lab = host.booted.lab
    lab.kill_gateway("addr")
    before = host.view()
    # Bad apply options: the agent (installed on the way) refuses them in its unit; exit 2.
    bad = remote.run("--timeout", "2", "--probe", "bogus")
    assert bad.code == 2 and bad.doc["result"] == "usage", bad.output
    assert "--probe" in bad.doc["message"] and bad.doc["installed_now"]
    assert host.record() is None
    assert_unchanged(before, host.view())

    report = remote.run("--timeout", "2", "--confirm-within", "20")
    doc = report.doc
    assert report.code == 4, report.output
    assert not doc["installed_now"]  # there since the first run
    assert doc["result"] == "rolled back" and doc["phase"] == "rolled-back"
    assert "not verified within 2 s" in doc["message"]
    assert doc["confirm_attempts"] == []  # nothing to confirm
    assert doc["first_session"] == "survived"
    assert_unchanged(before, host.view())
    _wait_for(lambda: not host.leftovers(), 5)


def test_ssh_blocked_on_the_new_path_is_not_confirmed_and_rolled_back_by_the_dead_man(
    remote: Remote, host: SshHost
) -> None:
    lab = host.booted.lab
    # After the takeover, new SSH connections arriving on br0 are dropped; the established
    # first session carries on. Before the takeover (on eth0) the rule matches nothing.
    drop_new_ssh(lab, "br0")
    before = host.view()
    window = 4.0
    report = remote.run("--timeout", "5", "--confirm-within", f"{window:g}")
    doc = report.doc
    assert report.code == 4, report.output
    assert doc["result"] == "rolled back" and doc["phase"] == "rolled-back"
    assert "not confirmed over a new SSH connection" in doc["message"]
    # Every confirmation attempt failed to connect; none went over the first session.
    assert doc["confirm_attempts"] and all(
        "no new connection" in a for a in doc["confirm_attempts"]
    )
    assert doc["confirm_connection"] == ""
    assert doc["first_session"] == "survived"
    # The host's dead man did it, at the end of the window; the script reconnected after.
    record = host.record()
    assert record is not None and record.phase == "rolled-back"
    assert record.detail == "deadline passed while confirming"
    assert "deadline passed while confirming" in doc["message"]
    assert report.seconds > window
    assert_unchanged(before, host.view())
    _wait_for(lambda: not host.leftovers(), 5)


def test_usage_errors_exit_2_and_change_nothing(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(SCRIPT), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    assert run().returncode == 2
    assert run("--bogus", "host").returncode == 2
    assert run("host", "not-an-option").returncode == 2
    json_flag = run("host", "--", "--json")
    assert json_flag.returncode == 2 and "--json" in json_flag.stderr
    assert run("host", "--", "--confirm-within", "0").returncode == 2
    helped = run("--help")
    assert helped.returncode == 0 and "Exit codes" in helped.stdout


def test_unreachable_host_is_refused(tmp_path: Path, keys: SshKeys, wheels: Path) -> None:
    # Nothing listens at this lab address: the first connection fails, nothing happens.
    config = write_ssh_config(tmp_path / "ssh_config", keys, [ClientHost("nowhere", "127.0.0.9")])
    argv = [sys.executable, str(SCRIPT), "--wheels", str(wheels), "--connect-timeout", "2"]
    argv += ["--json", "nowhere", "-F", str(config), "-p", "9"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert done.returncode == 3, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["result"] == "refused" and "cannot connect" in doc["message"]
