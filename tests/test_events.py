"""sd_notify and journal records: used when their sockets are there, harmless when they are not."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import pytest

from bridge_migrate.contract import Event, ExitCode, Field, Stage, StageName
from bridge_migrate.events import Events
from bridge_migrate.progress import Output, Progress

BATCH = Stage(StageName.BATCH, 1.0, acked=20, total=20, kernel_ms=0.4)


def test_no_sockets_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    events = Events()
    events.journal = False
    events.stage(BATCH, "20/20", "batch  1.0 ms  20/20")
    events.result(ExitCode.OK, "migrated", "eth0 -> br0")


@pytest.mark.parametrize("address", ["/nonexistent/notify", "@bridge-migrate-test-stale"])
def test_missing_or_stale_notify_socket_is_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    events = Events()
    events.journal = False
    events.stage(BATCH, "20/20", "batch")
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
        events.stage(Stage(StageName.VERIFY, 2.0), "every probe answered", "verify")
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
    events.stage(BATCH, "20/20", "batch")
    events.stage(Stage(StageName.CHECK, 1.0), "ok", "check")
    assert capsys.readouterr().err.count("journal unavailable") == 1


def _quiet_progress(output: Output, out: io.StringIO) -> Progress:
    events = Events()
    events.journal, events.notify_socket = False, None
    return Progress(output, out, events)


def test_progress_renders_typed_stages_everywhere() -> None:
    """The engine hands over typed stages; text, JSON, events and journal fields all come from
    them, and a reader gets the same typed stage back."""
    text, doc, lines = io.StringIO(), io.StringIO(), io.StringIO()
    for output, out in ((Output.TEXT, text), (Output.JSON, doc), (Output.EVENTS, lines)):
        p = _quiet_progress(output, out)
        p.stage(StageName.BATCH, acked=9, total=11, kernel_ms=0.42)
        p.stage(StageName.VERIFY, acked=1, total=2, problems=("arp:198.18.0.1",))
        p.finish(ExitCode.ROLLED_BACK, "rolled back", "not verified")
    assert "9/11 acknowledged in 0.42 ms" in text.getvalue()
    assert "no answer from arp:198.18.0.1" in text.getvalue()
    stages = [Stage.from_data(d) for d in json.loads(doc.getvalue())["phases"]]
    assert [(s.name, s.acked, s.total) for s in stages] == [
        (StageName.BATCH, 9, 11),
        (StageName.VERIFY, 1, 2),
    ]
    assert stages[0].kernel_ms == 0.42 and stages[1].problems == ("arp:198.18.0.1",)
    event = Event.from_json(lines.getvalue().splitlines()[0])
    assert (event.name, event.acked, event.total) == ("batch", 9, 11)
    fields = event.journal_fields()
    assert fields[Field.ACKED] == "9" and fields[Field.TOTAL] == "11"
    read = Event.from_journal(fields)
    assert read is not None and (read.name, read.acked, read.total) == ("batch", 9, 11)


def test_stages_follow_each_other_without_gaps() -> None:
    p = _quiet_progress(Output.JSON, io.StringIO())
    started = time.perf_counter()
    time.sleep(0.02)
    p.stage(StageName.SNAPSHOT, subject="eth0")
    time.sleep(0.01)  # between two stages: counted in the second
    p.stage(StageName.PLAN)
    elapsed = (time.perf_counter() - started) * 1000
    assert p.stages[1].ms >= 10
    assert sum(s.ms for s in p.stages) <= elapsed
