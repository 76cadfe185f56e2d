"""The contract's event schema round-trips, `apply --events` prints it as JSON lines, and the
remote driver's host helper refuses to install where it could destroy what it did not make."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from bridge_migrate.contract import Event, EventKind, ExitCode
from conftest import Agent

HELPER = resources.files("bridge_migrate.remote").joinpath("hosthelper.py").read_text()


def test_event_round_trips_through_json_and_journal_fields() -> None:
    event = Event(EventKind.RESULT, "rolled back", "why", "abc", "eth0", "br0", None, ExitCode(4))
    assert Event.from_json(event.to_json()) == event
    assert Event.from_journal({"MESSAGE": "x", **event.journal_fields()}) == event
    assert Event.from_journal({"MESSAGE": "not an event"}) is None


@pytest.mark.root
def test_apply_events_are_json_lines(agent: Agent) -> None:
    run = agent("apply", "--events", "--timeout", "5")
    assert run.code == ExitCode.OK, run.stderr
    events = [Event.from_json(line) for line in run.stdout.splitlines()]
    assert [e.name for e in events][:2] == ["snapshot", "plan"]
    assert events[-1].kind is EventKind.RESULT and events[-1].exit_code is ExitCode.OK
    assert len({e.transaction for e in events}) == 1 and events[0].transaction
    again = agent("apply", "--events")
    last = Event.from_json(again.stdout.splitlines()[-1])
    assert last.name == "already migrated" and last.exit_code is ExitCode.OK


def _helper(*args: str, stdin: bytes = b"") -> dict[str, object]:
    argv = [sys.executable, "-I", "-c", HELPER, "", *args]
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, cwd="/")
    answer: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return answer


@pytest.mark.parametrize("prefix", ["/opt", "/usr/local", "/", "/srv"])
def test_install_refuses_a_system_directory(prefix: str) -> None:
    answer = _helper("install", prefix, "build")
    assert answer["ok"] is False and "system directory" in str(answer["error"])


def test_install_refuses_a_directory_it_did_not_make_and_leaves_it(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data").write_text("keep")
    answer = _helper("install", str(theirs), "build")
    assert answer["ok"] is False and "not bridge-migrate's" in str(answer["error"])
    assert (theirs / "data").read_text() == "keep"


def test_failed_install_leaves_nothing_behind(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    answer = _helper("install", str(parent / "agent"), "build", stdin=b"not a tar")
    assert answer["ok"] is False
    assert list(parent.iterdir()) == []


def test_the_remote_apply_runs_in_the_agents_sandbox() -> None:
    # The helper is standard library only: the controller hands it the sandbox, and every
    # property of the shared list reaches systemd-run.
    from bridge_migrate.remote import hosthelper
    from bridge_migrate.sandbox import APPLY, run_properties

    args = [*run_properties(APPLY, Path("/var/lib/bridge-migrate")), "--", "--timeout", "5"]
    argv = hosthelper.start_argv("/opt/bridge-migrate", "/var/lib/bridge-migrate", "u", args)
    assert all(f"--property={p}" in argv for p in APPLY)
    assert argv[argv.index("--") + 1 :][-3:] == ["apply", "--timeout", "5"]
    with pytest.raises(hosthelper.Failed):
        hosthelper.start_argv("/opt/b", "/var/lib/b", "u", ["--timeout", "5"])
