"""What the user sees: a short line per phase with its duration, one JSON document, or (for
programs) one JSON line per event (contract.Event)."""

from __future__ import annotations

import enum
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO, assert_never

from . import serde
from .contract import Event, ExitCode
from .events import Events, printable


class Output(enum.Enum):
    TEXT = "text"  # a line per phase, as it ends
    JSON = "json"  # one document at the end
    EVENTS = "events"  # a JSON line per event, as it happens


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    ms: float
    detail: str


@dataclass
class Report:
    """Collects phases as they end; prints each at once unless JSON was asked for."""

    output: Output
    out: TextIO = sys.stdout
    events: Events = field(default_factory=Events)
    phases: list[PhaseRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def bind(
        self, transaction: str | None = None, nic: str | None = None, bridge: str | None = None
    ) -> None:
        """Name the transaction, NIC and bridge in every later event."""
        self.events.bind(transaction, nic, bridge)

    def ping(self) -> None:
        """Still alive: for systemd's watchdog, if one is configured."""
        self.events.ping()

    def phase(self, name: str, started: float, detail: str) -> None:
        """Record a phase that began at `started` (time.perf_counter()) and ends now."""
        record = PhaseRecord(name, (time.perf_counter() - started) * 1000, detail)
        self.phases.append(record)
        line = f"{name:<10} {record.ms:9.1f} ms  {detail}"
        self._emit(self.events.phase(name, record.ms, detail, line))
        self._print(line)

    def _print(self, line: str) -> None:
        # Under systemd, stdout is the journal: the structured record already says it.
        if self.output is Output.TEXT and not self.events.stdout_is_journal:
            print(printable(line), file=self.out, flush=True)

    def _emit(self, event: Event) -> None:
        if self.output is Output.EVENTS:
            print(event.to_json(), file=self.out, flush=True)

    def note(self, line: str) -> None:
        if self.output is Output.TEXT:
            print(f"{'':<10} {'':>12}  {printable(line)}", file=self.out, flush=True)

    def attach(self, key: str, value: Any) -> None:
        """Add a section to the JSON document (snapshot, plan, differences, ...)."""
        self.extra[key] = serde.to_data(value)

    def finish(self, code: int, result: str, message: str = "") -> None:
        self._emit(self.events.result(ExitCode(code), result, message))
        match self.output:
            case Output.JSON:
                doc = {
                    "result": result,
                    "exit_code": code,
                    "message": message,
                    "phases": [serde.to_data(p) for p in self.phases],
                    **self.extra,
                }
                json.dump(doc, self.out, indent=1)
                print(file=self.out, flush=True)
            case Output.TEXT:
                self._print(f"{result}: {message}" if message else result)
            case Output.EVENTS:
                pass
            case _:
                assert_never(self.output)
