"""sd_notify and journal records: used when their sockets are there, harmless when they are not."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bridge_migrate.contract import ExitCode
from bridge_migrate.events import Events


def test_no_sockets_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    events = Events()
    events.journal = False
    events.phase("batch", 1.0, "20/20", "batch  1.0 ms  20/20")
    events.result(ExitCode.OK, "migrated", "eth0 -> br0")


@pytest.mark.parametrize("address", ["/nonexistent/notify", "@bridge-migrate-test-stale"])
def test_missing_or_stale_notify_socket_is_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    events = Events()
    events.journal = False
    events.phase("batch", 1.0, "20/20", "batch")
    events.result(ExitCode.OK, "migrated", "")  # no second complaint: notifying was switched off
    assert capsys.readouterr().err.count("sd_notify failed") == 1


def test_notify_sends_status_ready_and_watchdog(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        events = Events()
        events.journal = False
        events.phase("verify", 2.0, "every probe answered", "verify")
        events.result(ExitCode.OK, "migrated", "eth0 -> br0")
        got = [listener.recv(4096).decode() for _ in range(4)]
    assert got == [
        "STATUS=verify: every probe answered",
        "WATCHDOG=1",
        "STATUS=migrated: eth0 -> br0",
        "READY=1",
    ]


def test_stale_journal_is_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from systemd import journal

    def refuse(*_args: object, **_kw: object) -> None:
        raise ConnectionRefusedError("stale journal socket")

    monkeypatch.setattr(journal, "send", refuse)  # a stale socket cannot be made here safely
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    events = Events()
    events.journal = True
    events.phase("batch", 1.0, "20/20", "batch")
    events.phase("check", 1.0, "ok", "check")
    assert capsys.readouterr().err.count("journal unavailable") == 1
