"""What the user sees of a run: the engine hands over typed stages (contract.Stage) and results;
this renders them as a line per stage, one JSON document, or (for programs) one JSON line per
event (contract.Event), and as sd_notify STATUS= and journal fields. The engine formats none of
it."""

from __future__ import annotations

import enum
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO, assert_never

from . import serde
from .contract import Event, ExitCode, Stage, StageName
from .events import Events, printable


class Output(enum.Enum):
    TEXT = "text"  # a line per stage, as it ends
    JSON = "json"  # one document at the end
    EVENTS = "events"  # a JSON line per event, as it happens


@dataclass
class Progress:
    """Collects stages as they end; prints each at once unless JSON was asked for. The clock
    runs from its creation (the run's start): each stage lasts from the end of the one before."""

    output: Output
    out: TextIO = sys.stdout
    events: Events = field(default_factory=Events)
    stages: list[Stage] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    _mark: float = field(default_factory=time.perf_counter)

    def bind(
        self, transaction: str | None = None, nic: str | None = None, bridge: str | None = None
    ) -> None:
        """Name the transaction, NIC and bridge in every later event."""
        self.events.bind(transaction, nic, bridge)

    def ping(self) -> None:
        """Still alive: for systemd's watchdog, if one is configured."""
        self.events.ping()

    def stage(self, name: StageName, **measured: Any) -> Stage:
        """A stage ended now; `measured` are its other Stage fields."""
        now = time.perf_counter()
        stage = Stage(name, (now - self._mark) * 1000, **measured)
        self._mark = now
        self.stages.append(stage)
        detail = describe(stage)
        line = f"{stage.name:<10} {stage.ms:9.1f} ms  {detail}"
        self._emit(self.events.stage(stage, detail, line))
        self._print(line)
        return stage

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
        """Add a section to the JSON document (snapshot, plan, differences, ...): turned into
        data only if the document is printed, after the run."""
        if self.output is Output.JSON:
            self.extra[key] = value

    def finish(self, code: int, result: str, message: str = "") -> None:
        self._emit(self.events.result(ExitCode(code), result, message))
        match self.output:
            case Output.JSON:
                doc = {
                    "result": result,
                    "exit_code": code,
                    "message": message,
                    "phases": [{**s.to_data(), "detail": describe(s)} for s in self.stages],
                    **{k: serde.to_data(v) for k, v in self.extra.items()},
                }
                # One write: json.dump writes each of its (hundreds of thousands of) pieces.
                print(json.dumps(doc, indent=1), file=self.out, flush=True)
            case Output.TEXT:
                self._print(f"{result}: {message}" if message else result)
            case Output.EVENTS:
                pass
            case _:
                assert_never(self.output)


def describe(s: Stage) -> str:
    """A stage in words: the detail of its line, STATUS= and journal record."""
    acked = f"{s.acked}/{s.total} acknowledged in {s.kernel_ms or 0.0:.2f} ms"
    problems = "; ".join(s.problems)
    match s.name:
        case StageName.SNAPSHOT:
            counts = ", ".join(f"{n} {kind}" for kind, n in s.counts if n)
            return f"{s.subject}: carries {counts or 'nothing'}"
        case StageName.PLAN:
            return _counted(s)
        case StageName.RECORD:
            return f"written; dead man: {s.subject or 'this process'}"
        case StageName.PREPARE:
            if s.ready_ms is None:
                return f"{s.subject}; {acked}; {problems or 'not sent on'}"
            return f"{s.subject}; {acked}; ready after {s.ready_ms:.2f} ms"
        case StageName.BATCH | StageName.HANDOVER:
            return acked
        case StageName.CHECK:  # attach: the guest's addresses, none in use
            if s.counts:
                return f"{s.subject}: {_counted(s)}, nothing in use"
            return problems or "host matches the plan"
        case StageName.VERIFY:
            if s.total == 0:
                return "nothing to verify: no gateway, and the host is not on the prefix"
            return f"no answer from {problems}" if s.problems else "every probe answered"
        case StageName.ROLLBACK:
            if s.total is None:  # attach
                return f"removed {s.subject} and its guest end"
            undone = f"{s.total} inverse operations in {s.kernel_ms or 0.0:.2f} ms"
            left = f"{len(s.problems)} difference(s) left" if s.problems else "host equals snapshot"
            return f"{undone}; {left}"
        case StageName.ATTACH:
            return f"{s.subject} on the bridge"
        case StageName.DETACH:
            return f"removed {s.subject}" if s.acked else f"{s.subject} was gone already"
        case _:
            assert_never(s.name)


def _counted(s: Stage) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in s.counts)
