"""The contract between the agent and whatever drives it (the remote driver, the Ansible role,
the tests): exit codes, transaction phases, defaults, and the machine-readable events and status
summary. Defined here once; everything else imports it. Standard library only: the remote driver
imports it on a workstation that has none of the agent's dependencies.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_STATE_DIR = "/var/lib/bridge-migrate"  # survives a reboot: the boot unit reads it
STATE_DIR_ENV = "BRIDGE_MIGRATE_STATE_DIR"
CONFIG_ENV = "BRIDGE_MIGRATE_CONFIG"
DEFAULT_TIMEOUT = 10.0  # seconds for every probe to answer, counted from the batch
GRACE = 2.0  # the dead man fires this long after the deadline: the agent's own rollback is first


class ExitCode(enum.IntEnum):
    OK = 0  # migrated and verified, or already migrated; rollback: host restored
    INTERNAL = 1  # unexpected internal error (remote: the host's state is unknown)
    USAGE = 2  # invalid usage or input; nothing changed
    REFUSED = 3  # refused by a pre-flight check; nothing changed
    ROLLED_BACK = 4  # not verified or a step failed; the host was restored to its snapshot
    ROLLBACK_INCOMPLETE = 5  # the restore left differences; they are printed


class Phase(enum.StrEnum):
    # Snapshot taken, nothing changed yet: written by agents before 0.4 (the record is now
    # written as APPLYING, one write fewer before the first change); a driver may still meet it.
    PLANNED = "planned"
    APPLYING = "applying"  # the bridge exists; the batch is being sent
    VERIFYING = "verifying"  # the batch is in; probes are running
    CONFIRMING = "confirming"  # verified; waiting for `bridge-migrate confirm`
    COMMITTED = "committed"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_INCOMPLETE = "rollback-incomplete"
    INTERRUPTED = "interrupted"  # the machine restarted while the transaction was pending

    @property
    def pending(self) -> bool:
        """The host may be between two states: a new transaction must not start."""
        return self not in (Phase.COMMITTED, Phase.ROLLED_BACK, Phase.INTERRUPTED)


# -- stages: what a run did, measured; `Progress` renders them (text, JSON, events, journal) ----


class StageName(enum.StrEnum):
    SNAPSHOT = "snapshot"  # the host read (and who manages its NIC)
    PLAN = "plan"  # the operations and their inverses decided; nothing changed
    RECORD = "record"  # the dead man armed and the record written: still nothing changed
    PREPARE = "prepare"  # the bridge made, its settings and the additions sent; ready to carry
    BATCH = "batch"  # the disruptive batch (takeover: addresses and routes moved, NIC enslaved)
    CHECK = "check"  # the host read back and compared with the plan
    HANDOVER = "handover"  # the managers' files rewritten and the bridge adopted
    VERIFY = "verify"  # the probes answered (or not) on the new path
    ROLLBACK = "rollback"  # the inverses sent and the host compared with its snapshot
    ATTACH = "attach"  # a guest's veth made and plugged into the bridge
    DETACH = "detach"  # a guest's veth removed


@dataclass(frozen=True)
class Stage:
    """One stage of a run as the engine measured it. The stages of a run follow each other
    without gaps: their times add up to the run's."""

    name: StageName
    ms: float  # since the previous stage ended (the first: since the run started)
    acked: int | None = None  # operations the kernel acknowledged (or found done) ...
    total: int | None = None  # ... of this many sent
    kernel_ms: float | None = None  # the sends alone
    ready_ms: float | None = None  # prepare: until the bridge could carry traffic
    counts: tuple[tuple[str, int], ...] = ()  # what was read or planned, by kind
    problems: tuple[str, ...] = ()  # what was wrong: differences left, probes unanswered
    subject: str = ""  # what the stage worked on: a device, a guest, the bridge's creation

    def to_data(self) -> dict[str, Any]:
        return {**asdict(self), "counts": dict(self.counts)}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Stage:
        """From `to_data`'s output (the JSON document's "phases"; other keys are ignored)."""
        known = {f.name: data[f.name] for f in fields(cls)}
        return cls(
            **{
                **known,
                "name": StageName(data["name"]),
                "counts": tuple(data["counts"].items()),
                "problems": tuple(data["problems"]),
            }
        )


# -- events: the journal fields of the agent's records, and `apply --events` JSON lines ---------


class Field(enum.StrEnum):
    """Journal fields of the agent's records (`journalctl -o json`)."""

    TRANSACTION = "BRIDGE_MIGRATE_TRANSACTION"
    NIC = "BRIDGE_MIGRATE_NIC"
    BRIDGE = "BRIDGE_MIGRATE_BRIDGE"
    PHASE = "BRIDGE_MIGRATE_PHASE"  # a step's name, or RESULT_PHASE for the final record
    DURATION_MS = "BRIDGE_MIGRATE_DURATION_MS"
    DETAIL = "BRIDGE_MIGRATE_DETAIL"
    ACKED = "BRIDGE_MIGRATE_ACKED"  # steps: operations the kernel acknowledged ...
    TOTAL = "BRIDGE_MIGRATE_TOTAL"  # ... of this many
    RESULT = "BRIDGE_MIGRATE_RESULT"
    EXIT_CODE = "BRIDGE_MIGRATE_EXIT_CODE"


RESULT_PHASE = "result"
# The agent's result when the host was on the bridge before this run: nothing was changed.
ALREADY_MIGRATED = "already migrated"


class EventKind(enum.StrEnum):
    STEP = "step"  # a step of the run ended (snapshot, batch, verify, rollback, ...)
    RESULT = "result"  # the run ended; exit_code is what the agent exits with


@dataclass(frozen=True)
class Event:
    kind: EventKind
    name: str  # the step, or the result ("migrated", "rolled back", "already migrated", ...)
    detail: str
    transaction: str | None = None
    nic: str | None = None
    bridge: str | None = None
    ms: float | None = None  # steps: how long it took
    exit_code: ExitCode | None = None  # results
    acked: int | None = None  # steps that send operations: how many the kernel acknowledged
    total: int | None = None  # ... of how many

    def journal_fields(self) -> dict[str, str]:
        """The fields of this event's journal record (MESSAGE is the caller's)."""
        values = {
            Field.TRANSACTION: self.transaction,
            Field.NIC: self.nic,
            Field.BRIDGE: self.bridge,
            Field.PHASE: RESULT_PHASE if self.kind is EventKind.RESULT else self.name,
            Field.DURATION_MS: None if self.ms is None else f"{self.ms:.3f}",
            Field.DETAIL: self.detail,
            Field.RESULT: self.name if self.kind is EventKind.RESULT else None,
            Field.EXIT_CODE: None if self.exit_code is None else str(int(self.exit_code)),
            Field.ACKED: None if self.acked is None else str(self.acked),
            Field.TOTAL: None if self.total is None else str(self.total),
        }
        return {str(k): v for k, v in values.items() if v is not None}

    @classmethod
    def from_journal(cls, entry: Mapping[str, Any]) -> Event | None:
        """The event of a `journalctl -o json` entry; None for a record that is not one."""
        phase = entry.get(Field.PHASE)
        if not isinstance(phase, str):
            return None
        is_result = phase == RESULT_PHASE
        ms, code = entry.get(Field.DURATION_MS), entry.get(Field.EXIT_CODE)
        acked, total = entry.get(Field.ACKED), entry.get(Field.TOTAL)
        return cls(
            kind=EventKind.RESULT if is_result else EventKind.STEP,
            name=str(entry.get(Field.RESULT, "")) if is_result else phase,
            detail=str(entry.get(Field.DETAIL, "")),
            transaction=_text(entry.get(Field.TRANSACTION)),
            nic=_text(entry.get(Field.NIC)),
            bridge=_text(entry.get(Field.BRIDGE)),
            ms=float(ms) if isinstance(ms, str) else None,
            exit_code=ExitCode(int(code)) if isinstance(code, str) else None,
            acked=int(acked) if isinstance(acked, str) else None,
            total=int(total) if isinstance(total, str) else None,
        )

    def to_json(self) -> str:
        """One line of `apply --events`."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Event:
        data = json.loads(line)
        code = data.pop("exit_code")
        return cls(
            **{**data, "kind": EventKind(data["kind"])},
            exit_code=None if code is None else ExitCode(code),
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- the status summary: `status --json` carries it as "summary" --------------------------------


@dataclass(frozen=True)
class Summary:
    """The recorded transaction as a driver needs it."""

    transaction: str
    phase: Phase
    detail: str
    seconds_left: float | None  # pending: until the deadline (negative once passed)
    pid: int  # the agent that started it: with boot_id, which run it is
    boot_id: str  # the boot it was recorded in
    current_boot_id: str  # the host's boot now: a pending record of another boot was cut short

    @property
    def cut_short_by_restart(self) -> bool:
        return self.phase.pending and self.boot_id != self.current_boot_id

    def to_data(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Summary:
        left = data["seconds_left"]
        return cls(
            transaction=str(data["transaction"]),
            phase=Phase(data["phase"]),
            detail=str(data["detail"]),
            seconds_left=None if left is None else float(left),
            pid=int(data["pid"]),
            boot_id=str(data["boot_id"]),
            current_boot_id=str(data["current_boot_id"]),
        )
