"""What systemd hears: sd_notify READY/STATUS/WATCHDOG, and journal records with structured
fields (contract.Event: what drivers read with `journalctl -o json`). Each is used only when its
socket is there, and a missing or stale socket is not an error (the transaction matters more than
its log)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from .contract import Event, EventKind, ExitCode, Stage

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# C0 and C1 control characters and DEL, shown as \xNN: a newline in a value must not become a
# second sd_notify assignment (READY=1), a forged journal field or a terminal escape.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    return text.translate(_ESCAPES)


class Events:
    def __init__(self) -> None:
        self.bound = Event(EventKind.STEP, "", "")  # transaction, NIC, bridge once known
        self.journal = os.path.exists(JOURNAL_SOCKET)
        self.notify_socket = os.environ.get("NOTIFY_SOCKET")
        self.watchdog = self.notify_socket is not None and _watchdog_is_ours()
        self.stdout_is_journal = self.journal and _stdout_is_journal()

    def bind(
        self, transaction: str | None = None, nic: str | None = None, bridge: str | None = None
    ) -> None:
        """Fields sent with every later record."""
        b = self.bound
        self.bound = replace(
            b,
            transaction=transaction or b.transaction,
            nic=nic or b.nic,
            bridge=bridge or b.bridge,
        )

    def stage(self, stage: Stage, detail: str, line: str) -> Event:
        event = replace(
            self.bound,
            name=stage.name,
            detail=detail,
            ms=stage.ms,
            acked=stage.acked,
            total=stage.total,
        )
        self._notify(f"STATUS={stage.name}: {detail}")
        self._log(line, event, priority=6)
        self.ping()
        return event

    def result(self, code: ExitCode, result: str, message: str) -> Event:
        event = replace(
            self.bound, kind=EventKind.RESULT, name=result, detail=message, exit_code=code
        )
        text = f"{result}: {message}" if message else result
        self._log(text, event, priority=6 if code == ExitCode.OK else 3)
        self._notify(f"STATUS={text}")
        if code == ExitCode.OK:
            self._notify("READY=1")
        return event

    def ping(self) -> None:
        if self.watchdog:
            self._notify("WATCHDOG=1")

    def _notify(self, state: str) -> None:
        if self.notify_socket is None:
            return
        try:
            from systemd import daemon

            daemon.notify(printable(state))
        # A stale or missing socket, or no systemd bindings: say so once, go on.
        except (OSError, ImportError) as e:
            print(f"bridge-migrate: sd_notify failed: {e}", file=sys.stderr)
            self.notify_socket = None

    def _log(self, message: str, event: Event, priority: int) -> None:
        if not self.journal:
            return
        try:
            from systemd import journal

            fields = {k: printable(v) for k, v in event.journal_fields().items()}
            journal.send(
                printable(message),
                SYSLOG_IDENTIFIER="bridge-migrate",
                PRIORITY=str(priority),
                **fields,
            )
        except (OSError, ImportError) as e:  # a stale socket, or no systemd bindings
            print(f"bridge-migrate: journal unavailable: {e}", file=sys.stderr)
            self.journal = False


def _stdout_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _watchdog_is_ours() -> bool:
    pid = os.environ.get("WATCHDOG_PID")
    return "WATCHDOG_USEC" in os.environ and (pid is None or pid == str(os.getpid()))
