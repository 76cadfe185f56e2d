"""One transaction on the host, owned by one object.

`Checkpoint.open` arms the dead man and writes the record before the first change; inside it the
plan's sends, the check and the verification run; ANY exception or signal on the way rolls the
host back, from here alone; `commit` or `hold` (a confirmation window) ends it. A checkpoint
resumed from a record rolls back what another process left (`rollback`, `expire`, the dead man).

Compare nmstate's plugin_context: the rollback lives in one context manager, not at every call.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from types import FrameType

from pyroute2.iproute.linux import IPRoute

from . import deadman
from .batch import BatchResult, Outcome, send_batch
from .compare import differences
from .contract import ExitCode, Phase, StageName
from .encode import Resolve
from .errors import Refused
from .failpoints import boundary
from .handover.files import FileError, write_states
from .model import AF_INET6, HostState
from .plan import AddAddress, Plan, Step
from .prepare import Prepared
from .progress import Progress
from .ready import LIMIT, Readiness
from .record import RecordError, Store, Transaction, current_boot_id, process_start
from .rollback import already_so, restore
from .snapshot import read_host
from .verify import ProbeResult, probing, run_probes, wrong_way


@dataclass(frozen=True)
class Deadline:
    """One deadline, on two clocks: monotonic to wait on, its wall-clock twin for the record
    and the dead man's timer."""

    monotonic: float
    wall: float
    seconds: float  # from when it was set

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, time.time() + seconds, seconds)

    @property
    def left(self) -> float:
        return self.monotonic - time.monotonic()


class Interrupted(Exception):
    pass


class StepFailed(Exception):
    """A step failed, or the host is not what the plan said: roll back what was done."""


class Checkpoint:
    def __init__(self, ipr: IPRoute, store: Store, progress: Progress, tx: Transaction) -> None:
        self.ipr, self.store, self.progress, self.tx = ipr, store, progress, tx
        self.done: tuple[Step, ...] = ()  # the steps the kernel acknowledged, in order
        self.outcome = ExitCode.INTERNAL  # until the transaction ends one way or the other
        self._guard = _Guard(armed=False)

    # -- the life cycle -------------------------------------------------------------------

    @classmethod
    @contextmanager
    def open(
        cls,
        ipr: IPRoute,
        store: Store,
        progress: Progress,
        tx_id: str,
        prepared: Prepared,
        deadline: Deadline,
    ) -> Iterator[Checkpoint]:
        """Arm, record, then run the body; on any exception or signal, roll back."""
        cp = cls(ipr, store, progress, _arm_and_record(tx_id, store, progress, prepared, deadline))
        progress.stage(StageName.RECORD, subject=cp.tx.dead_man or "")
        with signal_guard() as cp._guard:
            try:
                boundary("applying")
                yield cp
            except Exception as e:
                cp._guard.armed = False  # a rollback, once started, runs to its end
                # What a failed step left is known; after anything else, undo every step
                # (each inverse tolerates finding its work already done).
                done = cp.done if isinstance(e, StepFailed) else cp.tx.plan.steps
                code = ExitCode.INTERNAL if _is_bug(e) else ExitCode.ROLLED_BACK
                cp.outcome = cp.roll_back(done, str(e), code)

    def commit(self, what: str) -> None:
        self.mark(Phase.COMMITTED, "verified")  # a failure here rolls back: else a dead man would
        self._guard.armed = False
        boundary("committed")
        self.disarm()
        settle(self.tx.plan, self.progress)
        result = "migrated" if self.tx.plan.direction == "takeover" else "migrated back"
        self.progress.finish(ExitCode.OK, result, what)
        self.outcome = ExitCode.OK

    def hold(self, seconds: float) -> None:
        """Verified: hand the deadline to a dead man for the confirmation window (make before
        break), and return; `bridge-migrate confirm` commits."""
        old, unit = self.tx.dead_man, None
        # Before arming: the timer then fires at or after the recorded deadline, never before
        # (`expire` ignores a timer that comes early).
        deadline = time.time() + seconds
        if old is not None:
            where = deadman.locate()
            unit = deadman.arm(where, self.tx.id, "confirm", seconds, self.store.directory)
        try:
            self.mark(Phase.CONFIRMING, "verified", deadline=deadline, dead_man=unit)
        except RecordError:  # `confirm` could not find the window: close it now
            if unit is not None:
                with suppress(deadman.DeadManError):
                    deadman.disarm(unit)
            raise
        self._guard.armed = False
        if old is not None:
            deadman.disarm(old)
        self.progress.finish(
            ExitCode.OK,
            "verified, waiting for confirmation",
            f"run `bridge-migrate confirm` within {seconds:g} s, or the host is rolled back",
        )
        self.outcome = ExitCode.OK

    # -- the work -------------------------------------------------------------------------

    def send(
        self, steps: tuple[Step, ...], resolve: Resolve, until: float | None = None
    ) -> BatchResult:
        """One send of the plan; every acknowledged step is remembered for the rollback."""
        result = send_batch([s.do for s in steps], resolve, until=until)
        self.done += _succeeded(steps, result)
        return result

    def sent(self, name: StageName, steps: tuple[Step, ...], result: BatchResult) -> None:
        """A stage that sent `steps` ended."""
        self.progress.stage(
            name,
            acked=len(_succeeded(steps, result)),
            total=len(steps),
            kernel_ms=result.seconds * 1000,
        )

    def take_over(self, p: Prepared, deadline: Deadline) -> None:
        """The plan's sends (for a takeover: create the bridge, copy the settings, make the
        additions), a wait until the kernel has the device that takes the addresses ready to
        send, the disruptive batch, the check of the host against the plan, the hand-over to
        the managers, and the probes."""
        plan, progress = p.plan, self.progress
        added = [s.do for s in plan.steps if isinstance(s.do, AddAddress)]
        ipv6 = tuple(
            op.address.address
            for op in added
            if op.dev == plan.target and op.address.family == AF_INET6
        )
        resolve = _Indices(self.ipr, p.snapshot)
        exists = plan.target in resolve.known
        # Listening before the first send: every event on the way to ready is seen.
        with Readiness(self.ipr, plan.target, ipv6, exists=exists) as readiness:
            made = self.send((plan.prepare,), resolve)
            _require(made)
            boundary("bridge")
            sent: tuple[Step, ...] = (plan.prepare,)
            for steps in (plan.tune, plan.make):
                made = _joined(made, self.send(steps, resolve))
                sent += steps
                if _failures(made):
                    self.sent(StageName.PREPARE, sent, made)
                    _require(made)
            waited = readiness.wait()
        progress.stage(
            StageName.PREPARE,
            subject=str(plan.prepare.do),
            acked=len(_succeeded(sent, made)),
            total=len(sent),
            kernel_ms=made.seconds * 1000,
            ready_ms=None if waited is None else waited * 1000,
            problems=() if waited is not None else (f"not ready within {LIMIT:g} s",),
        )
        result = self.send(plan.batch, resolve)
        self.sent(StageName.BATCH, plan.batch, result)
        boundary("batch")
        _require(result)
        if plan.handover:  # the managers change the host again: the probes test what they leave
            self.check(p)
            self.hand_over(plan.handover, resolve, deadline)
            self.verify(run_probes(p.probes, deadline.monotonic, progress.ping), deadline)
            return
        # The probes ask the LAN, the check reads the kernel: both at once.
        with probing(p.probes, deadline.monotonic, progress.ping) as results:
            self.check(p)
            self.verify(results(), deadline)

    def hand_over(self, steps: tuple[Step, ...], resolve: Resolve, deadline: Deadline) -> None:
        """The managers' files rewritten, then each manager adopts the bridge (within the
        deadline the probes share)."""
        result = BatchResult((), 0.0)
        for step in steps:  # one by one: no manager adopts files that could not be written
            result = _joined(result, self.send((step,), resolve, deadline.monotonic))
            if _failures(result):
                break
        self.sent(StageName.HANDOVER, steps[: len(result.outcomes)], result)
        boundary("handover")
        if _failures(result):
            # A manager that failed to adopt may have taken part of the new state: every
            # inverse runs (each tolerates finding its work not done).
            self.done = self.tx.plan.steps
        _require(result)

    def check(self, p: Prepared) -> None:
        plan = p.plan
        current = read_host(plan.nic, plan.bridge)
        diff = differences(p.desired, current)
        diff += wrong_way(current, p.snapshot, plan.source, plan.target)
        self.progress.stage(StageName.CHECK, problems=diff)
        if diff:
            raise StepFailed("host does not match the plan: " + "; ".join(diff))
        # Not synced: after a crash, `applying` (the slot before) leads to the same rollback.
        self.mark(Phase.VERIFYING, sync=False)
        boundary("verifying")

    def verify(self, results: tuple[ProbeResult, ...], deadline: Deadline) -> None:
        for r in results:
            answer = "answered" if r.ok else "no answer"
            ms = r.seconds * 1000
            self.progress.note(f"{r.probe}: {answer} after {r.attempts} attempt(s), {ms:.1f} ms")
        silent = tuple(str(r.probe) for r in results if not r.ok)
        self.progress.stage(
            StageName.VERIFY, acked=len(results) - len(silent), total=len(results), problems=silent
        )
        if silent:
            missing = ", ".join(silent)
            self.done = self.tx.plan.steps
            raise StepFailed(f"not verified within {deadline.seconds:g} s: {missing}")
        boundary("verified")

    # -- the way back ---------------------------------------------------------------------

    def roll_back(self, done: tuple[Step, ...], why: str, code: ExitCode) -> ExitCode:
        """Undo `done`, compare with the snapshot, then record (as far as the record can take
        it: the host comes first) and report the outcome."""
        self.record_if_possible(Phase.ROLLING_BACK, why)
        result = restore(self.ipr, self.tx.plan, self.tx.snapshot, done, self.age)
        lines = (*(o.describe() for o in result.failures), *result.differences)
        self.progress.attach("differences", lines)
        for line in lines:
            self.progress.note(line)
        batch = result.batch
        self.progress.stage(
            StageName.ROLLBACK,
            acked=sum(o.ok for o in batch.outcomes),
            total=len(batch.outcomes),
            kernel_ms=batch.seconds * 1000,
            problems=lines,
        )
        if not result.complete:
            unrecorded = self.record_if_possible(Phase.ROLLBACK_INCOMPLETE, "; ".join(lines))
            self.progress.finish(
                ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete", why + unrecorded
            )
            return ExitCode.ROLLBACK_INCOMPLETE
        unrecorded = self.record_if_possible(Phase.ROLLED_BACK, why)
        self.disarm()
        self.progress.finish(
            code, "rolled back", f"{why}; host restored to its snapshot{unrecorded}"
        )
        return code

    # -- the record and the dead man ------------------------------------------------------

    def mark(self, phase: Phase, detail: str = "", *, sync: bool = True, **changes: object) -> None:
        tx = replace(self.tx.at(phase, time.time(), detail), **changes)  # type: ignore[arg-type]
        self.store.save(tx, sync=sync)
        self.tx = tx

    def record_if_possible(self, phase: Phase, detail: str) -> str:
        """Record `phase`; if the record cannot take it, say so (returned, to add to the
        result) and go on."""
        try:
            self.mark(phase, detail)
        except RecordError as e:
            self.progress.note(f"{phase} not recorded: {e.message}")
            return f"; NOT recorded ({e.message}): `bridge-migrate status` shows an older phase"
        return ""

    def disarm(self) -> None:
        if self.tx.dead_man is not None:
            try:
                deadman.disarm(self.tx.dead_man)
            except deadman.DeadManError as e:  # it will fire, find the transaction over, and stop
                self.progress.note(str(e))

    @property
    def age(self) -> float:
        """Seconds since the snapshot: finite lifetimes have run down by this much."""
        return time.time() - self.tx.started


def settle(plan: Plan, progress: Progress) -> None:
    """Committed: the drop-ins that would restore the managers' files after a restart go. One
    left behind does no harm (it finds the transaction committed and does nothing)."""
    try:
        write_states(plan.settle)
    except (OSError, FileError) as e:
        progress.note(f"left in place (harmless once committed): {e}")


def resume(ipr: IPRoute, store: Store, progress: Progress, tx: Transaction) -> Checkpoint:
    """A recorded transaction, to roll back from another process."""
    return Checkpoint(ipr, store, progress, tx)


def _arm_and_record(
    tx_id: str, store: Store, progress: Progress, p: Prepared, deadline: Deadline
) -> Transaction:
    """Arm the dead man, then write the record: if we die in between, it finds no transaction
    of its id and does nothing; if arming or recording fails, nothing has changed."""
    where = deadman.locate()
    unit = None
    if where.available:
        try:
            seconds = deadline.left + deadman.GRACE
            unit = deadman.arm(where, tx_id, "deadline", seconds, store.directory)
        except deadman.DeadManError as e:
            raise Refused(str(e)) from None
        progress.note(f"dead man armed: {unit}.timer rolls back unless the transaction ends")
    else:
        progress.note(f"no independent dead man ({where.why_not}): this process keeps the deadline")
    now, pid = time.time(), os.getpid()
    tx = Transaction(
        id=tx_id,
        phase=Phase.APPLYING,  # from here on, a rollback is what a failure needs
        pid=pid,
        pid_start=process_start(pid) or 0,
        started=now,
        updated=now,
        boot_id=current_boot_id(),
        deadline=deadline.wall,
        dead_man=unit,
        snapshot=p.snapshot,
        plan=p.plan,
        probes=p.probes,
        detail="",
    )
    try:
        store.create(tx)
    except RecordError:
        if unit is not None:  # it would find no transaction of its id, but leave no timer
            with suppress(deadman.DeadManError):
                deadman.disarm(unit)
        raise
    boundary("planned")
    return tx


def _succeeded(steps: tuple[Step, ...], result: BatchResult) -> tuple[Step, ...]:
    """Steps whose operation the kernel did, or found done (a flushed neighbour entry)."""
    return tuple(
        s for s, o in zip(steps, result.outcomes, strict=True) if o.ok or already_so(o.op, o.error)
    )


def _require(result: BatchResult) -> None:
    failed = _failures(result)
    if failed:
        raise StepFailed("; ".join(o.describe() for o in failed))


def _failures(result: BatchResult) -> tuple[Outcome, ...]:
    return tuple(o for o in result.outcomes if not (o.ok or already_so(o.op, o.error)))


def _joined(a: BatchResult, b: BatchResult) -> BatchResult:
    return BatchResult(a.outcomes + b.outcomes, a.seconds + b.seconds)


def _is_bug(e: Exception) -> bool:
    return not isinstance(e, StepFailed | Interrupted | OSError | RecordError)


class _Indices:
    """Device indices by name for the sends: the snapshot's devices, and any other (the bridge
    the plan made) asked for by name once, one request each: no dump of every link."""

    def __init__(self, ipr: IPRoute, snapshot: HostState) -> None:
        self.ipr = ipr
        self.known = {
            link.name: link.index for link in (snapshot.nic, snapshot.bridge) if link is not None
        }

    def __call__(self, name: str) -> int:
        index = self.known.get(name)
        if index is None:
            found = self.ipr.link_lookup(ifname=name)
            if not found:
                raise KeyError(name)
            index = self.known[name] = found[0]
        return index


@dataclass
class _Guard:
    armed: bool = True


@contextmanager
def signal_guard(armed: bool = True) -> Iterator[_Guard]:
    """While armed, SIGTERM, SIGHUP and SIGINT roll the transaction back instead of killing
    the agent; disarmed (a rollback is running, or the transaction is over), they are ignored."""
    guard = _Guard(armed)

    def handler(signum: int, _frame: FrameType | None) -> None:
        if guard.armed:
            guard.armed = False
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    signums = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield guard
    finally:
        for s, h in old.items():
            signal.signal(s, h)
