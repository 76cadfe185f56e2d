"""What the user sees: a short line per phase with its duration, or one JSON document."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import serde
from .events import Events


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    ms: float
    detail: str


@dataclass
class Report:
    """Collects phases as they end; prints each at once unless JSON was asked for."""

    as_json: bool
    out: TextIO = sys.stdout
    events: Events = field(default_factory=Events)
    phases: list[PhaseRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def bind(self, **fields: str) -> None:
        """Name the transaction, NIC and bridge in every later journal record."""
        self.events.bind(**fields)

    def ping(self) -> None:
        """Still alive: for systemd's watchdog, if one is configured."""
        self.events.ping()

    def phase(self, name: str, started: float, detail: str) -> None:
        """Record a phase that began at `started` (time.perf_counter()) and ends now."""
        record = PhaseRecord(name, (time.perf_counter() - started) * 1000, detail)
        self.phases.append(record)
        line = f"{name:<10} {record.ms:9.1f} ms  {detail}"
        self.events.phase(name, record.ms, detail, line)
        self._print(line)

    def _print(self, line: str) -> None:
        # Under systemd, stdout is the journal: the structured record already says it.
        if not self.as_json and not self.events.stdout_is_journal:
            print(line, file=self.out, flush=True)

    def note(self, line: str) -> None:
        if not self.as_json:
            print(f"{'':<10} {'':>12}  {line}", file=self.out, flush=True)

    def attach(self, key: str, value: Any) -> None:
        """Add a section to the JSON document (snapshot, plan, differences, ...)."""
        self.extra[key] = serde.to_data(value)

    def finish(self, code: int, result: str, message: str = "") -> None:
        self.events.result(code == 0, result, message)
        if self.as_json:
            doc = {
                "result": result,
                "exit_code": code,
                "message": message,
                "phases": [serde.to_data(p) for p in self.phases],
                **self.extra,
            }
            json.dump(doc, self.out, indent=1)
            print(file=self.out, flush=True)
        else:
            self._print(f"{result}: {message}" if message else result)
