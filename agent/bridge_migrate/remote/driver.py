"""One remote run: install, start apply as a unit, follow its events over the first session,
then learn the outcome from the host's record over new connections, and confirm over one.

Nothing is guessed: the verdict is what the host's record says about this run's transaction
(by id), or what the agent's own result event says when it recorded none; if the host cannot be
reached until the dead man's deadline plus the reconnect window, the verdict is "unknown".
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO, assert_never

from ..contract import (
    ALREADY_MIGRATED,
    GRACE,
    Event,
    EventKind,
    ExitCode,
    Phase,
    Summary,
)
from ..sandbox import APPLY, run_properties
from . import wheels
from .errors import RemoteError
from .options import Options
from .ssh import Answer, Ssh

FOLLOW_SLACK = 30.0  # beyond --timeout, for the unit to get verified (snapshot, arming, ...)
_POLL = 0.5  # between two attempts over new connections


@dataclass(frozen=True)
class Connection:
    """One SSH connection the driver used, and what it learnt through it."""

    purpose: str  # "first session", "outcome", "confirm"
    at: float  # seconds since the start
    reached: bool
    ssh_connection: str  # SSH_CONNECTION on the host: client address and port, server's
    saw: str


@dataclass(frozen=True)
class Verdict:
    code: ExitCode
    result: str
    message: str


@dataclass(frozen=True)
class Started:
    """The apply unit's agent: its pid in that boot names the record it writes."""

    unit: str
    pid: int
    boot_id: str


@dataclass
class Trace:
    """What this run learnt so far (the report is made of it)."""

    started: float = field(default_factory=time.monotonic)
    connections: list[Connection] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    agent_before: dict[str, Any] | None = None
    installed_now: bool = False
    agent_build: str | None = None
    started_unit: Started | None = None
    summary: Summary | None = None
    first_session: str = "not opened"

    @property
    def transaction(self) -> str | None:
        return next((e.transaction for e in self.events if e.transaction), None)

    @property
    def result_event(self) -> Event | None:
        return next((e for e in self.events if e.kind is EventKind.RESULT), None)

    def seconds(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """Lines for a person, each with the seconds since the start."""

    def __init__(self, stream: TextIO, host: str, trace: Trace) -> None:
        self.stream, self.host, self.trace = stream, host, trace

    def say(self, text: str) -> None:
        print(f"{self.trace.seconds():6.1f}s {self.host}: {text}", file=self.stream, flush=True)

    def event(self, e: Event) -> None:
        match e.kind:
            case EventKind.STEP:
                self.say(f"  {e.name:<10} {e.ms or 0.0:9.1f} ms  {e.detail}")
            case EventKind.RESULT:
                self.say(f"  agent: {e.name}: {e.detail} (exit {e.exit_code})")
            case _:
                assert_never(e.kind)


class Migration:
    def __init__(self, o: Options, ssh: Ssh, trace: Trace, progress: Progress) -> None:
        self.o, self.ssh, self.trace, self.out = o, ssh, trace, progress
        # When the host's dead man has acted at the latest (monotonic); narrowed as the run
        # learns more (the agent's result, the record's time left).
        self.dead_man_by = 0.0

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Verdict:
        self.ssh.open()
        self.trace.first_session = "open"
        probe = self.first("probe", self.o.prefix)
        self._check(probe)
        self._ensure_agent(probe)
        unit = f"bridge-migrate-remote-{uuid.uuid4().hex[:12]}"
        sandbox = run_properties(APPLY, Path(self.o.state_dir))
        doc = self.first(
            "start", self.o.prefix, self.o.state_dir, unit, *sandbox, "--", *self.o.apply
        )
        self.trace.started_unit = Started(unit, int(doc["pid"]), str(doc["boot_id"]))
        started = time.monotonic()
        self.out.say(f"started {unit}.service: apply {' '.join(self.o.apply)}")
        # Whatever happens (verification, then the window), the dead man has acted by then.
        self.dead_man_by = started + self.o.timeout + FOLLOW_SLACK + self.o.window + GRACE
        self._follow(unit)
        return self._settle(unit)

    def first(self, *args: str, stdin: bytes | None = None) -> dict[str, Any]:
        """A helper command over the first session; it must work (nothing has changed yet)."""
        answer = self.ssh.helper(*args, fresh=False, stdin=stdin)
        self._log("first session", answer, args[0])
        if not answer.ok:
            why = answer.error or "no answer"
            raise RemoteError(ExitCode.REFUSED, f"{args[0]} on {self.o.host} failed: {why}")
        return answer.doc

    def _log(self, purpose: str, answer: Answer, saw: str) -> None:
        connection = str(answer.doc.get("connection", ""))
        what = saw if answer.ok else f"{saw}: {answer.error}"
        self.trace.connections.append(
            Connection(purpose, round(self.trace.seconds(), 2), answer.reached, connection, what)
        )

    # -- 1. the host and its agent ---------------------------------------------------------

    def _check(self, probe: dict[str, Any]) -> None:
        problems = []
        if not probe["python_ok"]:
            problems.append(f"{self.o.python} is Python {probe['python']}; the agent needs 3.11+")
        if not probe["systemd"]:
            problems.append("systemd is not PID 1 (the dead man is a systemd timer)")
        if probe["missing_tools"]:
            problems.append("missing: " + ", ".join(probe["missing_tools"]))
        if probe["uid"] != 0:
            problems.append("not root: log in as root, or pass --sudo (passwordless sudo)")
        if problems:
            raise RemoteError(ExitCode.REFUSED, "cannot run the agent: " + "; ".join(problems))

    def _ensure_agent(self, probe: dict[str, Any]) -> None:
        have: dict[str, Any] | None = probe["agent"]
        self.trace.agent_before = have
        directory = self.o.wheels
        if directory is None:
            raise RemoteError(ExitCode.INTERNAL, "no wheels to install from")
        want = wheels.identity(wheels.agent_wheel(directory))
        if have is not None and have["healthy"] and have["build"] == want:
            self.out.say(f"agent build {want} is installed in {self.o.prefix}")
            self.trace.agent_build = want
            return
        missing = []
        if not probe["venv"]:
            missing.append(f"{self.o.python} has no venv module (python3-venv)")
        if not probe["systemd_module"]:
            missing.append(f"{self.o.python} has no systemd bindings (python3-systemd)")
        if missing:
            raise RemoteError(ExitCode.REFUSED, "cannot install the agent: " + "; ".join(missing))
        why = (
            "missing"
            if have is None
            else "broken"
            if not have["healthy"]
            else f"build {have['build']} differs"
        )
        self.out.say(f"installing agent build {want} into {self.o.prefix} ({why})")
        self.first(
            "install", self.o.prefix, want, stdin=wheels.tar(directory, pip=not probe["pip"])
        )
        self.trace.installed_now, self.trace.agent_build = True, want

    # -- 2. follow the unit over the first session -----------------------------------------

    def _follow(self, unit: str) -> None:
        for entry in self.ssh.follow(unit, self.o.timeout + FOLLOW_SLACK):
            event = Event.from_journal(entry)
            if event is None:
                continue
            self._add_events([*self.trace.events, event])
            if event.kind is EventKind.RESULT:
                return
        self.out.say("the first session stopped before the agent's result; asking anew")

    def _add_events(self, events: list[Event]) -> None:
        for e in events[len(self.trace.events) :]:
            self.out.event(e)
            if e.kind is EventKind.RESULT and e.exit_code is ExitCode.OK:  # verified: window
                self.dead_man_by = min(self.dead_man_by, time.monotonic() + self.o.window + GRACE)
        if len(events) > len(self.trace.events):
            self.trace.events = events

    # -- 3. the outcome, over new connections ----------------------------------------------

    def _settle(self, unit: str) -> Verdict:
        while True:
            answer = self.ssh.helper("outcome", self.o.prefix, self.o.state_dir, unit, fresh=True)
            verdict = self._read_outcome(answer)
            if verdict is not None:
                return verdict
            if time.monotonic() > self.dead_man_by + self.o.reconnect_within:
                return self._unknown()
            time.sleep(_POLL)

    def _read_outcome(self, answer: Answer) -> Verdict | None:
        if not answer.ok:
            self._log("outcome", answer, "no answer")
            return None
        doc = answer.doc
        self._add_events([e for e in map(Event.from_journal, doc["events"]) if e is not None])
        summary = Summary.from_data(doc["summary"]) if doc["summary"] else None
        if summary is not None and self._ours(summary):
            self.trace.summary = summary
            if summary.phase is Phase.CONFIRMING and summary.seconds_left is not None:
                self.dead_man_by = time.monotonic() + max(0.0, summary.seconds_left) + GRACE
            self._log("outcome", answer, f"transaction {summary.transaction}: {summary.phase}")
            return self._judge(summary)
        result = self.trace.result_event
        self._log("outcome", answer, f"agent: {result.name if result else 'no result yet'}")
        if result is not None:
            return self._without_record(result)
        if doc["unit_active"]:
            return None
        return Verdict(
            ExitCode.INTERNAL,
            "error",
            f"the apply unit ended without a result, and the host's record is not of its "
            f"transaction ({self.trace.transaction or 'none seen'})",
        )

    def _ours(self, s: Summary) -> bool:
        """This run's transaction: by its id, once an event named it; else by the agent that
        recorded it (the first session may have died before any event came)."""
        unit = self.trace.started_unit
        by_agent = unit is not None and (s.pid, s.boot_id) == (unit.pid, unit.boot_id)
        return s.transaction == self.trace.transaction or by_agent

    def _judge(self, s: Summary) -> Verdict | None:
        """What the host's record of this transaction says."""
        if s.cut_short_by_restart:
            return Verdict(
                ExitCode.ROLLED_BACK,
                "interrupted",
                f"the host restarted while the transaction was {s.phase}: it booted without the "
                "change (its record stays until the next apply marks it interrupted)",
            )
        match s.phase:
            case Phase.CONFIRMING:
                return self._confirm(s)
            case Phase.COMMITTED:
                return Verdict(ExitCode.OK, "migrated", self._said(s))
            case Phase.ROLLED_BACK:
                return Verdict(ExitCode.ROLLED_BACK, "rolled back", self._said(s))
            case Phase.ROLLBACK_INCOMPLETE:
                return Verdict(ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete", self._said(s))
            case Phase.INTERRUPTED:
                return Verdict(ExitCode.ROLLED_BACK, "interrupted", self._said(s))
            case Phase.PLANNED | Phase.APPLYING | Phase.VERIFYING | Phase.ROLLING_BACK:
                return None  # on its way
            case _:
                assert_never(s.phase)

    def _said(self, s: Summary) -> str:
        confirms = [c for c in self.trace.connections if c.purpose == "confirm"]
        failed = [c for c in confirms if not c.reached]
        text = f"host says: {s.phase}: {s.detail}"
        if s.phase is not Phase.COMMITTED and confirms:
            why = failed[-1].saw if failed else confirms[-1].saw
            return f"not confirmed over a new SSH connection in time ({why}); {text}"
        if s.phase is Phase.COMMITTED and confirms and confirms[-1].reached:
            return f"verified, and confirmed over a new SSH connection; {text}"
        return text

    def _confirm(self, s: Summary) -> Verdict | None:
        left = max(0.1, s.seconds_left or 0.0)
        self.out.say(f"verified; confirming over a new SSH connection ({left:.1f} s left)")
        answer = self.ssh.helper(
            "confirm",
            self.o.prefix,
            self.o.state_dir,
            s.transaction,
            fresh=True,
            connect_timeout=min(self.o.connect_timeout, left),
        )
        self._log("confirm", answer, "committed" if answer.ok else "not committed")
        if not answer.ok:
            self.out.say(f"confirm did not get through: {answer.error}")
            return None  # the next outcome says what became of it
        self.trace.summary = replace(s, phase=Phase.COMMITTED, detail="confirmed")  # the agent's
        return Verdict(ExitCode.OK, "migrated", "verified, and confirmed over a new SSH connection")

    def _without_record(self, result: Event) -> Verdict:
        """The agent ended without recording this transaction: its result says why."""
        code = result.exit_code if result.exit_code is not None else ExitCode.INTERNAL
        match code:
            case ExitCode.OK if result.name == ALREADY_MIGRATED:
                return Verdict(code, ALREADY_MIGRATED, result.detail)
            case ExitCode.USAGE:
                return Verdict(code, "usage", result.detail)
            case ExitCode.REFUSED:
                return Verdict(code, "refused", result.detail)
            case ExitCode.INTERNAL:
                return Verdict(code, "error", result.detail)
            case ExitCode.OK | ExitCode.ROLLED_BACK | ExitCode.ROLLBACK_INCOMPLETE:
                return Verdict(
                    ExitCode.INTERNAL,
                    "unknown",
                    f"the agent said {result.name!r} (exit {int(code)}), but the host's record "
                    "is not of this transaction",
                )
            case _:
                assert_never(code)

    def _unknown(self) -> Verdict:
        s = self.trace.summary
        last = self.trace.events[-1] if self.trace.events else None
        known = (
            f"last recorded phase: {s.phase} ({s.detail})"
            if s
            else f"last event: {last.name}: {last.detail}"
            if last
            else "no event of the agent was seen"
        )
        return Verdict(
            ExitCode.INTERNAL,
            "unknown",
            f"{self.o.host} did not answer a new connection until {self.o.reconnect_within:g} s "
            f"after the dead man's deadline: its state is unknown; {known}",
        )

    def first_session_state(self) -> str:
        if self.trace.first_session != "open":
            return self.trace.first_session
        return "survived" if self.ssh.alive() else "dropped"


def report(o: Options, trace: Trace, verdict: Verdict) -> dict[str, Any]:
    s = trace.summary
    return {
        "host": o.host,
        "result": verdict.result,
        "exit_code": int(verdict.code),
        "message": verdict.message,
        "agent_before": trace.agent_before,
        "agent_build": trace.agent_build,
        "installed_now": trace.installed_now,
        "unit": None if trace.started_unit is None else trace.started_unit.unit,
        "transaction": trace.transaction or (None if s is None else s.transaction),
        "phase": None if s is None else str(s.phase),
        "first_session": trace.first_session,
        "connections": [asdict(c) for c in trace.connections],
        "events": [asdict(e) for e in trace.events],
        "seconds": round(trace.seconds(), 2),
    }
