"""The Ansible role and playbook (ansible/) against five lab hosts booted with systemd, each
running a real sshd and reached through its own lab's peer namespace (ProxyCommand): one of each
outcome -- migrated (then "already migrated"), rolled back by the agent (dead gateway), rolled
back by the host's dead man (a firewall lets nothing but ICMPv6 in on br0), refused (br0 exists
already), and unknown (powered off during its window, never back). With the threshold at 0 the
rollout stops after the first batch; with it at 100 every host is attempted; every host's exit
code and JSON report are checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate_testlab.sshlab import ClientHost, SshKeys, drop_new_ssh, proxy_command
from bridge_migrate_testlab.sshlab import write_client_config as write_ssh_config
from hostview import assert_unchanged
from test_remote import (  # noqa: F401
    SshHost,
    assert_migrated,
    block_all_on,
    machine_untouched,
    port,
    wait_for,
    wheels,
)

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "ansible" / "migrate.yml"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent))
NAMES = ("alpha", "bravo", "charlie", "delta", "echo")
PLAYBOOK_TIMEOUT = 240.0


@dataclass
class Rollout:
    code: int
    output: str
    reports: dict[str, dict[str, Any]]
    seconds: float


class Fleet:
    """Three booted lab hosts with sshd, an inventory and an ssh configuration for them, and
    an Ansible that keeps everything it writes (control sockets, temp files) in the test."""

    def __init__(self, directory: Path, keys: SshKeys, wheelhouse: Path) -> None:
        self.directory, self.keys, self.wheels = directory, keys, wheelhouse
        self.hosts = {n: SshHost(directory / n, keys, hostname=n) for n in NAMES}
        # A short path: control sockets must fit in sockaddr_un.
        self.control = Path(tempfile.mkdtemp(prefix="bm-cp-"))

    def __enter__(self) -> Fleet:
        self._stack = contextlib.ExitStack()
        self._stack.callback(shutil.rmtree, self.control, ignore_errors=True)
        self._stack.callback(self._stop_masters)
        try:
            for host in self.hosts.values():
                self._stack.enter_context(host.booted)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _stop_masters(self) -> None:
        """Ansible's persistent connections (ControlPersist) outlive the playbook: end them."""
        for socket in self.control.glob("*"):
            subprocess.run(
                ["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
            )

    def play(self, *extra: str, **variables: object) -> Rollout:
        entries = []
        for name, host in self.hosts.items():
            lab = host.booted.lab
            via = proxy_command(lab, lab.peer_ns, lab.addrs.host_v4)
            entries.append(ClientHost(name, lab.addrs.host_v4, proxy_command=via))
        config = write_ssh_config(self.directory / "ssh_config", self.keys, entries)
        inventory = self.directory / "inventory.ini"
        inventory.write_text(
            "[bridge_migrate]\n"
            + "".join(f"{n}\n" for n in NAMES)
            + "\n[bridge_migrate:vars]\n"
            + "ansible_user=root\n"
            + "ansible_python_interpreter=/usr/bin/python3\n"
            + f"ansible_ssh_common_args='-F {config}'\n"
        )
        report_dir = self.directory / "report"
        shutil.rmtree(report_dir, ignore_errors=True)
        variables = {
            "bridge_migrate_wheels": str(self.wheels),
            "bridge_migrate_report_dir": str(report_dir),
            **variables,
        }
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "HOME": str(home),
            "ANSIBLE_CONFIG": str(ROOT / "ansible" / "ansible.cfg"),
            "ANSIBLE_HOME": str(home / ".ansible"),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            # Tasks on the controller (delegate_to: localhost) would use ~/.ansible/tmp of the
            # machine's user, whatever HOME says; on the lab hosts it lands in their own /tmp.
            "ANSIBLE_REMOTE_TMP": str(home / "remote-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
        }
        assert ANSIBLE_PLAYBOOK is not None, "ansible-core is a test dependency: scripts/bootstrap"
        argv = [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(PLAYBOOK), "-e", json.dumps(variables)]
        started = time.monotonic()
        done = subprocess.run(
            [*argv, *extra], capture_output=True, text=True, env=env, timeout=PLAYBOOK_TIMEOUT
        )
        seconds = time.monotonic() - started
        reports = {
            n: json.loads((report_dir / f"{n}.json").read_text())
            for n in NAMES
            if (report_dir / f"{n}.json").exists()
        }
        return Rollout(done.returncode, done.stdout + done.stderr, reports, seconds)


@pytest.fixture
def fleet(
    tmp_path: Path,
    wheels: Path,  # noqa: F811
    machine_untouched: None,  # noqa: F811
) -> Iterator[Fleet]:
    keys = SshKeys.make(tmp_path / "keys")
    with Fleet(tmp_path, keys, wheels) as f:
        f.hosts["bravo"].booted.lab.kill_gateway("addr")
        block_all_on(f.hosts["charlie"], "br0", but="meta l4proto ipv6-icmp accept")
        delta = f.hosts["delta"].booted.lab
        delta.run(delta.host_ns, ["ip", "link", "add", "br0", "type", "bridge"], check=True)
        drop_new_ssh(f.hosts["echo"].booted.lab, "br0")  # nothing confirms it before it is off
        yield f


def _confirmed_over_a_new_connection(report: dict[str, Any]) -> None:
    assert report["exit_code"] == 0 and report["result"] == "migrated", report
    assert report["phase"] == "committed"
    first = next(c for c in report["connections"] if c["purpose"] == "first session")
    confirm = [c for c in report["connections"] if c["saw"] == "committed"]
    assert len(confirm) == 1 and port(confirm[0]["ssh_connection"]) != port(first["ssh_connection"])


def _rolled_back(report: dict[str, Any], why: str) -> None:
    assert report["exit_code"] == 4 and report["result"] == "rolled back", report
    assert report["phase"] == "rolled-back" and why in report["message"], report
    assert not [c for c in report["connections"] if c["saw"] == "committed"]


ROLLOUT = {
    "bridge_migrate_timeout": 3,
    "bridge_migrate_confirm_within": 8,
    "bridge_migrate_connect_timeout": 2,
    "bridge_migrate_reconnect_within": 4,
}


def test_rollout_one_of_each_outcome_stops_at_the_threshold_and_carries_on_below_it(
    fleet: Fleet,
) -> None:
    before = {n: h.view() for n, h in fleet.hosts.items()}

    # 1. Batches of 2, then 3; threshold 0%: alpha migrates, bravo rolls back, and the rollout
    # stops before the next batch.
    stopped = fleet.play(
        **ROLLOUT, bridge_migrate_serial=[2, 3], bridge_migrate_max_fail_percentage=0
    )
    assert stopped.code != 0, stopped.output
    reports = stopped.reports
    _confirmed_over_a_new_connection(reports["alpha"])
    assert reports["alpha"]["installed_now"] is True
    assert_migrated(fleet.hosts["alpha"].view())
    _rolled_back(reports["bravo"], "not verified within 3 s")
    assert_unchanged(before["bravo"], fleet.hosts["bravo"].view(), learned_may_go=True)
    for name in ("charlie", "delta", "echo"):
        assert reports[name]["result"] == "not attempted" and reports[name]["exit_code"] is None
        assert not any(fleet.hosts[name].opt.iterdir())  # not even installed
    assert "bravo: rolled back (exit 4)" in stopped.output
    assert "echo: not attempted" in stopped.output  # the summary at the end
    for name in ("alpha", "bravo"):
        assert not fleet.hosts[name].leftovers()

    # 2. All in one batch, threshold 100%: every host is attempted, at the same time; echo is
    # powered off once it waits for confirmation, and never comes back.
    echo = fleet.hosts["echo"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            fleet.play, **ROLLOUT, bridge_migrate_serial=5, bridge_migrate_max_fail_percentage=100
        )
        wait_for(lambda: echo.phase() == "confirming" or running.done(), 120, "echo confirming")
        assert not running.done(), running.result().output
        # The driver learns of the verification from the agent's events over SSH, which a loaded
        # machine delays: the power goes once they had time to arrive (well within the window).
        time.sleep(2.0)
        echo.booted.poweroff()
        carried_on = running.result(timeout=PLAYBOOK_TIMEOUT)
    assert carried_on.code != 0, carried_on.output
    reports = carried_on.reports
    assert reports["alpha"]["exit_code"] == 0, reports["alpha"]
    assert reports["alpha"]["result"] == "already migrated"
    assert reports["alpha"]["installed_now"] is False
    _rolled_back(reports["bravo"], "not verified within 3 s")
    _rolled_back(reports["charlie"], "deadline passed while confirming")
    assert reports["delta"]["exit_code"] == 3 and reports["delta"]["result"] == "refused"
    assert "br0" in reports["delta"]["message"]
    assert reports["echo"]["exit_code"] == 1 and reports["echo"]["result"] == "unknown"
    # What is known: how far it got before it went silent (verified, at least).
    assert "state is unknown" in reports["echo"]["message"], reports["echo"]
    assert "verif" in reports["echo"]["message"], reports["echo"]
    for name in ("bravo", "charlie"):
        # Minutes after the rollback: learned entries may have gone unused.
        assert_unchanged(before[name], fleet.hosts[name].view(), learned_may_go=True)
    assert_migrated(fleet.hosts["alpha"].view())
    for name in ("alpha", "bravo", "charlie", "delta"):
        assert not fleet.hosts[name].leftovers()
    assert (fleet.directory / "report").stat().st_mode & 0o077 == 0  # private
