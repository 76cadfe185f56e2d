"""bridge-migrate-remote (bridge_migrate.remote) against real sshd in lab hosts booted with
systemd: the driver runs in each lab's peer namespace across the lab LAN, with a throwaway key
and its own ssh configuration. Independent scenarios run at the same time, each on a host of its
own, with faults injected for real: a dead gateway, a firewall on the host that drops everything
arriving on br0 (the established first session too), the first session killed mid-trial, new
connections that get through only after a while, a reboot during the window. Plus an upgrade
(a host with a different agent build gets this one) and --sudo."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate.contract import ExitCode
from bridge_migrate.record import Store, Transaction
from bridge_migrate_testlab.sshlab import ClientHost, SshKeys, drop_new_ssh, ssh_spec, tree_digest
from bridge_migrate_testlab.sshlab import write_client_config as write_ssh_config
from bridge_migrate_testlab.systemd import Bind, BootedLab, BootSpec
from hostview import HostView, assert_unchanged, read_view

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
DRIVER = [sys.executable, "-m", "bridge_migrate.remote"]
PREFIX = "/opt/bridge-migrate"
STATE = "/var/lib/bridge-migrate"
DRIVER_TIMEOUT = 150.0  # bounds every run of the driver; the slowest scenario takes ~25 s
SUDO_USER, SUDO_UID = "bmtest", 4242


def _shared_dir(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _build_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """Built once per test session, shared by xdist workers (a lock, then a done mark)."""
    shared = _shared_dir(factory)
    target = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".done").exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            (target / ".done").touch()
    return target


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(target: Path) -> None:
        argv = [*DRIVER, "--build-wheels", str(target)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    return _build_once(tmp_path_factory, "bridge-migrate-wheels", build)


@pytest.fixture(scope="session")
def other_wheels(tmp_path_factory: pytest.TempPathFactory, wheels: Path) -> Path:
    """The same version number, another build: the agent of a checkout one comment apart."""

    def build(target: Path) -> None:
        source = target.parent / f"{target.name}-src"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "agent", source / "agent", ignore=shutil.ignore_patterns("__py*"))
        with open(source / "agent" / "bridge_migrate" / "contract.py", "a") as f:
            f.write("# an older build\n")
        target.mkdir()
        _build_agent(source, target)
        for dep in wheels.glob("*.whl"):
            if not dep.name.startswith("bridge_migrate-"):
                shutil.copy2(dep, target)
        shutil.rmtree(source)

    return _build_once(tmp_path_factory, "bridge-migrate-other-wheels", build)


def _build_agent(source: Path, target: Path) -> None:
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "-w", str(target), str(source)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


@dataclass(frozen=True)
class Report:
    code: int
    doc: dict[str, Any]
    output: str  # the progress, as a user sees it
    seconds: float

    def connections(self, purpose: str) -> list[dict[str, Any]]:
        return [c for c in self.doc["connections"] if c["purpose"] == purpose]


class SshHost:
    """A booted lab host running sshd with throwaway keys. /opt and the agent's state directory
    are test directories (empty at first): nothing is found pre-installed, the record can be
    read from here, and the install's own directories can be checked."""

    def __init__(
        self, directory: Path, keys: SshKeys, hostname: str = "labhost", sudo_user: bool = False
    ) -> None:
        self.name = hostname
        self.opt, self.state = directory / "opt", directory / "state"
        self.opt.mkdir(parents=True)
        self.state.mkdir(mode=0o700)
        binds = [Bind(self.opt, "/opt"), Bind(self.state, STATE)]
        requires: tuple[str, ...] = ()
        if sudo_user:
            binds += _sudo_user_binds(directory / "sudo", keys, hostname)
            # It removes /run/nologin, which keeps users other than root out while booting.
            requires = ("systemd-user-sessions.service",)
        spec = BootSpec(hostname=hostname, binds=tuple(binds), requires=requires)
        self.booted = BootedLab(ssh_spec(keys, spec))

    def record(self) -> Transaction | None:
        return Store(self.state).load()

    def phase(self) -> str | None:
        record = self.record()
        return None if record is None else str(record.phase)

    def view(self) -> HostView:
        return read_view(self.booted.lab.host_ns)

    def leftovers(self) -> list[str]:
        """What a remote run may not leave on the host: units, timers, processes of its own,
        temporary files, install directories."""
        host = self.booted.host
        units = host.systemctl("list-units", "--all", "--plain", "--no-legend", "bridge-migrate*")
        temp = host.run(["sh", "-c", "ls -d /tmp/bridge-migrate* /var/tmp/bridge-migrate* || :"])
        procs = host.run(["pgrep", "-a", "-f", "bridge-migrate|journalctl"])
        found = (units.stdout + temp.stdout + procs.stdout).splitlines()
        found += [p.name for p in self.opt.iterdir() if p.name != "bridge-migrate"]
        return [x for x in found if x.strip()]


def _sudo_user_binds(directory: Path, keys: SshKeys, hostname: str) -> list[Bind]:
    """A user with passwordless sudo inside the boot: passwd, shadow and group copies with the
    user added, a sudoers drop-in and a home with the test's key (the machine's files are only
    read); and the host's name in /etc/hosts, as on an installed system (sudo looks it up, and
    would otherwise ask a DNS server that the lab cannot reach)."""
    directory.mkdir(parents=True)
    home = directory / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text(keys.client_key.with_suffix(".pub").read_text())
    for p in (home, home / ".ssh", home / ".ssh" / "authorized_keys"):
        os.chown(p, SUDO_UID, SUDO_UID)
        p.chmod(0o600 if p.is_file() else 0o700)
    added = {
        "passwd": f"{SUDO_USER}:x:{SUDO_UID}:{SUDO_UID}::/home/{SUDO_USER}:/bin/sh\n",
        "shadow": f"{SUDO_USER}:*:19000:0:99999:7:::\n",
        "group": f"{SUDO_USER}:x:{SUDO_UID}:\n",
        "hosts": f"127.0.1.1 {hostname}\n",
    }
    binds = [Bind(home, f"/home/{SUDO_USER}", read_only=True)]
    for name, line in added.items():
        copy = directory / name
        copy.write_text(Path(f"/etc/{name}").read_text().rstrip("\n") + "\n" + line)
        copy.chmod(0o640 if name == "shadow" else 0o644)
        binds.append(Bind(copy, f"/etc/{name}", read_only=True))
    sudoers = directory / "sudoers"
    sudoers.write_text(f"{SUDO_USER} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    binds.append(Bind(sudoers, "/etc/sudoers.d/bridge-migrate-test", read_only=True))
    return binds


class Remote:
    """The client side: ssh configuration and key of the test; the driver runs in the lab's
    peer namespace with a HOME of the test (so ~/.ssh is never read or written)."""

    def __init__(self, host: SshHost, keys: SshKeys, directory: Path, wheels: Path) -> None:
        self.host, self.wheels, self.home = host, wheels, directory / "home"
        self.home.mkdir(parents=True)
        entry = ClientHost(host.name, host.booted.lab.addrs.host_v4)
        self.config = write_ssh_config(directory / "ssh_config", keys, [entry])

    def run(
        self,
        *apply: str,
        own: tuple[str, ...] = (),
        ssh: tuple[str, ...] = (),
        wheels: Path | None = None,
    ) -> Report:
        lab = self.host.booted.lab
        argv = [*DRIVER, "--wheels", str(wheels or self.wheels), "--json"]
        argv += ["--connect-timeout", "2", "--reconnect-within", "20", *own]
        argv += [self.host.name, "-F", str(self.config), *ssh, "--", *apply]
        env = {"HOME": str(self.home), "PYTHONPATH": str(ROOT / "agent")}
        started = time.monotonic()
        done = lab.run(lab.peer_ns, argv, timeout=DRIVER_TIMEOUT, env=env)
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


def wait_for(condition: Callable[[], object], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit} s")
        time.sleep(0.05)


def assert_migrated(view: HostView) -> None:
    assert view.link("eth0")[5] == "br0"  # type: ignore[index]
    assert "198.18.0.10" in view.addresses_on("br0")
    assert not [a for a in view.addresses_on("eth0") if not a.startswith("fe80")]


def port(connection: str) -> str:
    """The client port of an SSH_CONNECTION value ("CLIENT PORT SERVER PORT")."""
    parts = connection.split()
    assert len(parts) == 4, connection
    return parts[1]


def assert_confirmed_over_a_new_connection(r: Report) -> None:
    assert r.code == ExitCode.OK, r.output
    assert r.doc["result"] == "migrated" and r.doc["phase"] == "committed", r.doc
    first = r.connections("first session")[0]["ssh_connection"]
    confirmed = [c for c in r.connections("confirm") if c["saw"] == "committed"]
    assert len(confirmed) == 1, r.doc["connections"]
    assert port(confirmed[0]["ssh_connection"]) != port(first)


def block_all_on(host: SshHost, device: str, but: str) -> None:
    """A firewall on the host that drops everything arriving on `device` (named, so it is not
    one of the NIC's rules the agent would carry over), established connections included,
    except what the rule `but` accepts first."""
    rules = f"""\
table inet bm_test_block {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {but}
        iifname "{device}" drop
    }}
}}
"""
    lab = host.booted.lab
    lab.run(lab.host_ns, ["nft", "-f", "-"], input=rules, check=True, timeout=10)


def kill_ssh_sessions(host: SshHost) -> list[str]:
    """End every SSH connection on the host (the per-connection sshd processes, by pid), not
    the listener."""
    h = host.booted.host
    listener = h.systemctl("show", "--property=MainPID", "--value", "ssh.service").stdout.strip()
    children = h.run(["pgrep", "-P", listener]).stdout.split()
    if children:
        h.run(["kill", *children], check=True)
    return children


# -- scenarios: each on a host of its own ------------------------------------------------------


def upgrade_then_migrate(host: SshHost, remote: Remote, other_wheels: Path) -> None:
    """A host with another build of the agent (same version number) gets this one; the
    migration is confirmed over a new connection; run again, the agent says it was already
    migrated and nothing is reinstalled."""
    # Bad apply options, with the other build: it is installed on the way, then refuses.
    bad = remote.run("--timeout", "2", "--probe", "bogus", wheels=other_wheels)
    assert bad.code == ExitCode.USAGE and bad.doc["result"] == "usage", bad.output
    assert "--probe" in bad.doc["message"] and bad.doc["installed_now"]
    other = bad.doc["agent_build"]
    assert host.record() is None

    report = remote.run("--timeout", "5", "--confirm-within", "20")
    assert report.doc["installed_now"], report.output
    assert report.doc["agent_before"]["build"] == other != report.doc["agent_build"]
    assert f"build {other} differs" in report.output
    assert_confirmed_over_a_new_connection(report)
    assert report.doc["first_session"] == "survived"
    record = host.record()
    assert record is not None and record.phase == "committed"
    assert record.id == report.doc["transaction"]
    assert_migrated(host.view())
    for step in ("snapshot", "batch", "verify"):  # progress came as the events happened
        assert f"  {step} " in report.output
    installed = host.booted.host.run([f"{PREFIX}/bin/bridge-migrate", "--version"]).stdout
    assert report.doc["agent_build"] in installed
    wait_for(lambda: not host.leftovers(), 5, "nothing left behind")

    again = remote.run("--timeout", "5")
    assert again.code == ExitCode.OK, again.output
    assert again.doc["result"] == "already migrated" and not again.doc["installed_now"]


def dead_gateway(host: SshHost, remote: Remote) -> None:
    host.booted.lab.kill_gateway("addr")
    before = host.view()
    report = remote.run("--timeout", "2", "--confirm-within", "20")
    assert report.code == ExitCode.ROLLED_BACK, report.output
    assert report.doc["result"] == "rolled back" and report.doc["phase"] == "rolled-back"
    assert "not verified within 2 s" in report.doc["message"]
    assert report.connections("confirm") == []  # nothing to confirm
    assert report.doc["first_session"] == "survived"
    assert_unchanged(before, host.view(), learned_may_go=True)
    wait_for(lambda: not host.leftovers(), 5, "nothing left behind")


def firewall_drops_all_on_br0(host: SshHost, remote: Remote) -> None:
    """After the takeover nothing reaches the host (the first session dies too, and so does
    the agent's ICMPv6 probe of the gateway): the host is rolled back, and the driver learns it
    over a new connection once the host answers on its NIC again -- never "already migrated"."""
    block_all_on(host, "br0", but="")
    before = host.view()
    report = remote.run("--timeout", "3", "--confirm-within", "5")
    doc = report.doc
    assert report.code == ExitCode.ROLLED_BACK, report.output
    assert doc["result"] == "rolled back" and doc["phase"] == "rolled-back", doc
    assert "not verified within 3 s" in doc["message"]
    assert report.connections("outcome")[-1]["reached"]
    assert_unchanged(before, host.view())
    wait_for(lambda: not host.leftovers(), 5, "nothing left behind")


def firewall_lets_only_icmpv6_in_on_br0(host: SshHost, remote: Remote) -> None:
    """The same firewall, but the gateway's ICMPv6 answers get in: the agent verifies, and
    nothing else does (SSH included): nothing can confirm, the host's dead man rolls back."""
    block_all_on(host, "br0", but="meta l4proto ipv6-icmp accept")
    before = host.view()
    window = 5.0
    report = remote.run("--timeout", "5", "--confirm-within", f"{window:g}")
    doc = report.doc
    assert report.code == ExitCode.ROLLED_BACK, report.output
    assert doc["result"] == "rolled back" and doc["phase"] == "rolled-back", doc
    assert "deadline passed while confirming" in doc["message"]
    assert doc["first_session"] == "dropped"
    outcomes = report.connections("outcome")
    assert not outcomes[0]["reached"] and outcomes[-1]["reached"], outcomes
    record = host.record()
    assert record is not None and record.phase == "rolled-back"
    assert record.id == doc["transaction"]
    assert report.seconds > window
    assert_unchanged(before, host.view())
    wait_for(lambda: not host.leftovers(), 5, "nothing left behind")


def first_session_killed(host: SshHost, remote: Remote) -> None:
    """The first session ends while the agent verifies (its sshd killed on the host): the
    driver reads the outcome and confirms over new connections."""
    lab = host.booted.lab
    probe = f"tcp:{lab.addrs.peer_v4}:7077"  # answers only once the test starts listening
    listener: subprocess.Popen[str] | None = None
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(remote.run, "--timeout", "15", "--probe", probe)
        try:
            wait_for(lambda: host.phase() == "verifying" or running.done(), 60, "verifying")
            assert not running.done(), running.result().output
            assert kill_ssh_sessions(host)
            listen = "import socket,time; s=socket.create_server(('0.0.0.0',7077)); time.sleep(60)"
            listener = lab.popen(lab.peer_ns, [sys.executable, "-c", listen])
            report = running.result(timeout=DRIVER_TIMEOUT)
        finally:
            if listener is not None:
                listener.kill()
                listener.wait(timeout=10)
    assert_confirmed_over_a_new_connection(report)
    assert report.doc["first_session"] == "dropped"
    assert "the first session stopped" in report.output
    assert_migrated(host.view())


def confirm_connection_slow_with_sudo(host: SshHost, remote: Remote) -> None:
    """As a user with passwordless sudo; new SSH connections over the new path get through
    only some seconds after verification: the driver keeps trying within the window."""
    lab = host.booted.lab
    drop_new_ssh(lab, "br0")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            remote.run, "--timeout", "5", "--confirm-within", "25", own=("--sudo",),
            ssh=("-l", SUDO_USER),
        )  # fmt: skip
        wait_for(lambda: host.phase() == "confirming" or running.done(), 90, "confirming")
        assert not running.done(), running.result().output
        time.sleep(3)
        lab.run(lab.host_ns, ["nft", "delete", "table", "inet", "netlab_ssh"], check=True)
        report = running.result(timeout=DRIVER_TIMEOUT)
    assert_confirmed_over_a_new_connection(report)
    assert report.doc["installed_now"]
    assert any(not c["reached"] for c in report.connections("outcome")), report.doc
    assert report.doc["first_session"] == "survived"
    assert_migrated(host.view())
    owner = (host.opt / "bridge-migrate" / "bin" / "python").lstat().st_uid
    assert owner == 0  # installed as root, through sudo


def rebooted_during_the_window(host: SshHost, remote: Remote) -> None:
    """The host restarts while it waits for confirmation: it boots on its NIC, and the driver
    reports the transaction cut short, from the record and the new boot id."""
    drop_new_ssh(host.booted.lab, "br0")  # nothing confirms before the restart
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(remote.run, "--timeout", "5", "--confirm-within", "30")
        wait_for(lambda: host.phase() == "confirming" or running.done(), 90, "confirming")
        assert not running.done(), running.result().output
        host.booted.reboot()
        report = running.result(timeout=DRIVER_TIMEOUT)
    assert report.code == ExitCode.ROLLED_BACK, report.output
    assert report.doc["result"] == "interrupted", report.doc
    assert "restarted" in report.doc["message"]
    assert report.doc["first_session"] == "dropped"
    assert not [c for c in report.connections("confirm") if c["saw"] == "committed"]
    assert host.view().link("br0") is None


SCENARIOS: dict[str, Callable[..., None]] = {
    "upgrade": upgrade_then_migrate,
    "deadgw": dead_gateway,
    "dropall": firewall_drops_all_on_br0,
    "deadman": firewall_lets_only_icmpv6_in_on_br0,
    "killed": first_session_killed,
    "slow": confirm_connection_slow_with_sudo,
    "reboot": rebooted_during_the_window,
}


def test_remote_scenarios_on_hosts_of_their_own(
    tmp_path: Path, keys: SshKeys, wheels: Path, other_wheels: Path, machine_untouched: None
) -> None:
    failures: dict[str, str] = {}
    lock = threading.Lock()
    with ExitStack() as stack:
        hosts = {}
        for name in SCENARIOS:
            host = SshHost(tmp_path / name, keys, hostname=name, sudo_user=name == "slow")
            stack.enter_context(host.booted)
            hosts[name] = (host, Remote(host, keys, tmp_path / name / "client", wheels))

        def run(name: str) -> None:
            host, remote = hosts[name]
            extra = (other_wheels,) if name == "upgrade" else ()
            try:
                SCENARIOS[name](host, remote, *extra)
            except BaseException:
                with lock:
                    failures[name] = traceback.format_exc()

        with ThreadPoolExecutor(len(SCENARIOS)) as pool:
            list(pool.map(run, hosts))
    assert not failures, "\n".join(f"--- {n}:\n{t}" for n, t in failures.items())


def test_usage_errors_exit_2_and_change_nothing() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DRIVER, *args], capture_output=True, text=True, timeout=30)

    assert run().returncode == 2
    assert run("--bogus", "host").returncode == 2
    assert run("host", "not-an-option").returncode == 2
    json_flag = run("host", "--", "--json")
    assert json_flag.returncode == 2 and "--json" in json_flag.stderr
    assert run("host", "--", "--confirm-within", "0").returncode == 2
    assert run("--prefix", "opt", "host").returncode == 2
    helped = run("--help")
    assert helped.returncode == 0 and "Exit codes" in helped.stdout


def test_unreachable_host_is_refused(tmp_path: Path, keys: SshKeys, wheels: Path) -> None:
    # Nothing listens at this loopback address: the first connection fails, nothing happens.
    config = write_ssh_config(tmp_path / "ssh_config", keys, [ClientHost("nowhere", "127.0.0.9")])
    argv = [*DRIVER, "--wheels", str(wheels), "--connect-timeout", "2"]
    argv += ["--json", "nowhere", "-F", str(config), "-p", "9"]
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == ExitCode.REFUSED, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["result"] == "refused" and "cannot connect" in doc["message"]
    assert doc["connections"] == [] and doc["first_session"] == "not opened"
