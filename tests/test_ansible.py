"""The Ansible role and playbook (ansible/) against three lab hosts booted with systemd, each
running a real sshd and reached through its own lab's peer namespace (ProxyCommand), one of
them with a dead gateway: that host rolls back and is reported; with the threshold set to stop,
the rollout stops before the next batch; run again below the threshold, it carries on."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostview import assert_unchanged
from netlab.sshlab import ClientHost, SshKeys, proxy_command
from netlab.sshlab import write_client_config as write_ssh_config
from test_remote import SshHost, assert_migrated, machine_untouched, wheels  # noqa: F401

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "ansible" / "migrate.yml"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent))
NAMES = ("alpha", "bravo", "charlie")  # bravo's gateway is dead
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
        yield f


def _port(connection: str) -> str:
    return connection.split()[1]


def _assert_confirmed_over_a_new_connection(report: dict[str, Any]) -> None:
    assert report["exit_code"] == 0 and report["result"] == "migrated", report
    assert report["phase"] == "committed"
    assert report["first_session"] == "survived"
    assert _port(report["first_connection"]) != _port(report["confirm_connection"])


def _assert_rolled_back(report: dict[str, Any]) -> None:
    assert report["exit_code"] == 4 and report["result"] == "rolled back", report
    assert report["phase"] == "rolled-back"
    assert "not verified within" in report["message"]
    assert report["confirm_connection"] is None  # never confirmed


ROLLOUT = {
    "bridge_migrate_serial": [2, 1],  # alpha and bravo, then charlie
    "bridge_migrate_timeout": 2,
    "bridge_migrate_confirm_within": 17,
}


def test_rollout_stops_at_the_failure_threshold_and_carries_on_below_it(fleet: Fleet) -> None:
    before = {n: h.view() for n, h in fleet.hosts.items()}

    # 1. Threshold 0%: alpha migrates, bravo rolls back, and the rollout stops before charlie.
    stopped = fleet.play(**ROLLOUT, bridge_migrate_max_fail_percentage=0)
    assert stopped.code != 0, stopped.output
    reports = stopped.reports
    _assert_confirmed_over_a_new_connection(reports["alpha"])
    assert reports["alpha"]["installed_now"] is True
    assert_migrated(fleet.hosts["alpha"].view())
    _assert_rolled_back(reports["bravo"])
    assert_unchanged(before["bravo"], fleet.hosts["bravo"].view())
    assert reports["charlie"]["result"] == "not attempted"
    assert reports["charlie"]["exit_code"] is None
    assert_unchanged(before["charlie"], fleet.hosts["charlie"].view())
    assert not any(fleet.hosts["charlie"].opt.iterdir())  # not even installed
    assert fleet.hosts["charlie"].record() is None
    assert "bravo: rolled back (exit 4)" in stopped.output
    assert "charlie: not attempted" in stopped.output  # the summary at the end
    for name in ("alpha", "bravo"):
        assert not fleet.hosts[name].leftovers()

    # 2. The same rollout again, threshold 50%: alpha is already migrated, bravo rolls back
    # again (half of its batch: not more than allowed), and the rollout goes on to charlie.
    carried_on = fleet.play(**ROLLOUT, bridge_migrate_max_fail_percentage=50)
    assert carried_on.code != 0, carried_on.output  # bravo failed, and says so
    reports = carried_on.reports
    assert reports["alpha"]["exit_code"] == 0, reports["alpha"]
    assert reports["alpha"]["result"] == "already migrated"
    assert reports["alpha"]["installed_now"] is False
    _assert_rolled_back(reports["bravo"])
    assert_unchanged(before["bravo"], fleet.hosts["bravo"].view())
    _assert_confirmed_over_a_new_connection(reports["charlie"])
    for name in ("alpha", "charlie"):
        assert_migrated(fleet.hosts[name].view())
        assert not fleet.hosts[name].leftovers()
