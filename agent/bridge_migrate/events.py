"""What systemd hears: sd_notify READY/STATUS/WATCHDOG, and journal records with structured
fields. Each is used only when its socket is there, and a missing or stale socket is not an error
(the transaction matters more than its log)."""

from __future__ import annotations

import os
import sys
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"


class Events:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.journal = os.path.exists(JOURNAL_SOCKET)
        self.notify_socket = os.environ.get("NOTIFY_SOCKET")
        self.watchdog = self.notify_socket is not None and _watchdog_is_ours()
        self.stdout_is_journal = self.journal and _stdout_is_journal()

    def bind(self, **fields: str) -> None:
        """Fields sent with every later record (transaction id, NIC, bridge)."""
        self.fields.update({f"BRIDGE_MIGRATE_{k.upper()}": v for k, v in fields.items()})

    def phase(self, name: str, ms: float, detail: str, line: str) -> None:
        self._notify(f"STATUS={name}: {detail}")
        self._log(line, PHASE=name, DURATION_MS=f"{ms:.3f}")
        self.ping()

    def result(self, ok: bool, result: str, message: str) -> None:
        text = f"{result}: {message}" if message else result
        self._log(text, PHASE="result", RESULT=result, PRIORITY="6" if ok else "3")
        self._notify(f"STATUS={text}")
        if ok:
            self._notify("READY=1")

    def ping(self) -> None:
        if self.watchdog:
            self._notify("WATCHDOG=1")

    def _notify(self, state: str) -> None:
        if self.notify_socket is None:
            return
        try:
            from systemd import daemon

            daemon.notify(state)
        # A stale or missing socket, or no systemd bindings: say so once, go on.
        except (OSError, ImportError) as e:
            print(f"bridge-migrate: sd_notify failed: {e}", file=sys.stderr)
            self.notify_socket = None

    def _log(self, message: str, **fields: Any) -> None:
        if not self.journal:
            return
        try:
            from systemd import journal

            journal.send(
                message,
                SYSLOG_IDENTIFIER="bridge-migrate",
                **self.fields,
                **{f"BRIDGE_MIGRATE_{k}": v for k, v in fields.items() if k != "PRIORITY"},
                PRIORITY=fields.get("PRIORITY", "6"),
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
