"""The pipeline: snapshot -> plan -> apply -> verify -> commit | rollback, with the record on disk
updated at every phase, so that a rollback can always find what the host looked like, and a dead
man armed before the first change, so that one happens even if this process dies."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from types import FrameType

from pyroute2 import IPRoute
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from . import deadman
from .batch import BatchResult, Outcome, send_batch
from .compare import differences
from .contract import ALREADY_MIGRATED, ExitCode, Phase
from .encode import Resolve
from .errors import Refused
from .model import AF_INET6, HostState
from .owner import ask_owners, ownership
from .owner import describe as describe_ownership
from .owner import refusals as handover_refusals
from .plan import AddAddress, Plan, Step, carried_counts, is_migrated, plan_takeover
from .preflight import check_root, choose_nic, refusals
from .ready import wait_until_ready
from .record import Locked, RecordError, Store, Transaction, current_boot_id, process_start
from .report import Report
from .rollback import already_so, restore
from .simulate import simulate
from .snapshot import read_host, read_links
from .verify import Probe, gateway_probes, run_probes, wrong_way


@dataclass(frozen=True)
class ApplyRequest:
    nic: str | None
    bridge: str
    timeout: float
    probes: tuple[Probe, ...]
    confirm_within: float | None  # keep the change pending this long, until `confirm`


# Test-only: the agent SIGKILLs itself at the step boundary this variable names.
KILL_AT_ENV = "BRIDGE_MIGRATE_TEST_KILL_AT"
_EXPIRE_LOCK_WAIT = 10.0  # the dead man waits this long for a live agent to let go


@dataclass(frozen=True)
class Prepared:
    """Everything decided before the first change."""

    snapshot: HostState
    plan: Plan
    desired: HostState
    probes: tuple[Probe, ...]


class Interrupted(Exception):
    pass


class StepFailed(Exception):
    def __init__(self, message: str, done: tuple[Step, ...]) -> None:
        super().__init__(message)
        self.done = done


def read_plan(ipr: IPRoute, req: ApplyRequest, report: Report) -> Prepared | None:
    """Snapshot and plan; None when the host is already migrated. Raises Refused."""
    started = time.perf_counter()
    nic = choose_nic(ipr, req.nic, req.bridge)
    report.bind(nic=nic, bridge=req.bridge)
    asked = ask_owners(nic)
    state = read_host(ipr, nic, req.bridge)
    report.attach("snapshot", state)
    report.phase("snapshot", started, _summary(state))
    if is_migrated(state, req.bridge):
        return None
    started = time.perf_counter()
    owned = ownership(asked, state)
    report.attach("owner", owned)
    for line in describe_ownership(owned):
        report.note(line)
    problems = [*refusals(state, req.bridge), *handover_refusals(owned, req.bridge)]
    if problems:
        raise Refused("; ".join(problems))
    plan = plan_takeover(state, req.bridge)
    probes = (*gateway_probes(state, req.bridge), *req.probes)
    if not probes:
        raise Refused(f"nothing to verify: {nic} has no default route via a gateway", "add --probe")
    report.attach("plan", plan)
    report.attach("carried", carried_counts(state))
    report.phase(
        "plan",
        started,
        f"{len(plan.tune)} settings, {len(plan.make)} additions, "
        f"then {len(plan.batch)} in one batch",
    )
    desired = simulate(state, [s.do for s in plan.steps])
    return Prepared(state, plan, desired, probes)


def apply(req: ApplyRequest, store: Store, report: Report, *, at_boot: bool = False) -> ExitCode:
    check_root()
    tx_id = uuid.uuid4().hex[:12]
    report.bind(transaction=tx_id)
    with store.lock():
        _check_previous(store, report, at_boot)
        with IPRoute() as ipr:
            prepared = read_plan(ipr, req, report)
            if prepared is None:
                report.finish(ExitCode.OK, ALREADY_MIGRATED, "nothing to do")
                return ExitCode.OK
            tx = _arm_and_record(tx_id, req, store, report, prepared)
            run = _Run(ipr, store, report, tx)
            code = run.apply(prepared, req.timeout, req.confirm_within)
    if code == ExitCode.OK and run.tx.phase is Phase.CONFIRMING and run.tx.dead_man is None:
        return _be_the_dead_man(store, report, run.tx)
    return code


def _arm_and_record(
    tx_id: str, req: ApplyRequest, store: Store, report: Report, p: Prepared
) -> Transaction:
    """Arm the dead man, then write the record: if we die in between, it finds no transaction
    of its id and does nothing; if arming fails, nothing has changed."""
    where = deadman.locate()
    unit = None
    if where.available:
        try:
            unit = deadman.arm(
                where, tx_id, "deadline", req.timeout + deadman.GRACE, store.directory
            )
        except deadman.DeadManError as e:
            raise Refused(str(e)) from None
        report.note(f"dead man armed: {unit}.timer rolls back unless the transaction ends")
    else:
        report.note(f"no independent dead man ({where.why_not}): this process keeps the deadline")
    now = time.time()
    pid = os.getpid()
    tx = Transaction(
        id=tx_id,
        phase=Phase.PLANNED,
        pid=pid,
        pid_start=process_start(pid) or 0,
        started=now,
        updated=now,
        boot_id=current_boot_id(),
        deadline=now + req.timeout,
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
    _boundary("planned")
    return tx


def rollback(store: Store, report: Report) -> ExitCode:
    """Restore the snapshot in the record, whatever phase the transaction reached."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None:
            raise Refused(f"nothing to roll back: no transaction record in {store.directory}")
        if tx.phase in (Phase.ROLLED_BACK, Phase.INTERRUPTED):
            report.finish(ExitCode.OK, "nothing to do", f"transaction {tx.id} is {tx.phase}")
            return ExitCode.OK
        return _roll_back_recorded(store, report, tx, "rollback requested", ExitCode.OK)


def expire(store: Store, report: Report, tx_id: str) -> ExitCode:
    """What the dead man runs: roll transaction `tx_id` back if it is still pending."""
    check_root()
    with _lock_for_dead_man(store, tx_id):
        tx = store.load()
        if tx is None or tx.id != tx_id:
            report.finish(ExitCode.OK, "nothing to do", f"transaction {tx_id} is not recorded")
            return ExitCode.OK
        if not tx.phase.pending:
            report.finish(ExitCode.OK, "nothing to do", f"transaction {tx_id} is {tx.phase}")
            return ExitCode.OK
        report.bind(transaction=tx.id, nic=tx.plan.nic, bridge=tx.plan.bridge)
        why = f"deadline passed while {tx.phase}"
        return _roll_back_recorded(store, report, tx, why, ExitCode.ROLLED_BACK)


def confirm(store: Store, report: Report) -> ExitCode:
    """Commit a transaction that waits for confirmation (apply --confirm-within)."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None or tx.phase is not Phase.CONFIRMING:
            what = f"transaction {tx.id} is {tx.phase}" if tx else "no transaction recorded"
            raise Refused(f"nothing to confirm: {what}")
        if time.time() > tx.deadline:
            raise Refused(
                f"too late: the window for transaction {tx.id} has closed", "it is rolling back"
            )
        tx = tx.at(Phase.COMMITTED, time.time(), "confirmed")
        try:
            store.save(tx)
        except RecordError as e:
            raise Refused(
                f"{e.message}; transaction {tx.id} is still waiting for confirmation, and its "
                "dead man rolls it back at the deadline",
                e.hint,
            ) from None
        if tx.dead_man:
            deadman.disarm(tx.dead_man)
    report.finish(ExitCode.OK, "committed", f"transaction {tx.id} confirmed")
    return ExitCode.OK


def _roll_back_recorded(
    store: Store, report: Report, tx: Transaction, why: str, code: ExitCode
) -> ExitCode:
    with IPRoute() as ipr, _signal_guard(armed=False):
        # Where the agent stopped is unknown: undo every step (each inverse tolerates
        # finding its work already done).
        return _Run(ipr, store, report, tx).roll_back(tx.plan.steps, why, code)


@contextmanager
def _lock_for_dead_man(store: Store, tx_id: str) -> Iterator[None]:
    """The lock, even from an agent that hangs past its deadline: that one is killed."""
    with ExitStack() as stack:
        for attempt in Retrying(
            stop=stop_after_delay(_EXPIRE_LOCK_WAIT),
            wait=wait_fixed(0.1),
            retry=retry_if_exception_type(Locked),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 5:
                    _kill_hung_agent(store, tx_id)
                stack.enter_context(store.lock())
        yield


def _kill_hung_agent(store: Store, tx_id: str) -> None:
    tx = store.load()
    if tx is None or tx.id != tx_id or time.time() < tx.deadline or tx.pid <= 1:
        return
    try:
        pidfd = os.pidfd_open(tx.pid)
    except ProcessLookupError:
        return
    try:
        # Checked while the pidfd holds the process: a PID reused since then fails the check,
        # and one reused after it is not the process the pidfd names.
        if tx.agent_running:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _be_the_dead_man(store: Store, report: Report, tx: Transaction) -> ExitCode:
    """No systemd: this process waits out the confirmation window, then expires the
    transaction unless `bridge-migrate confirm` committed it. A signal ends the wait early."""
    report.note("no systemd: this process is the dead man; keep it running")
    with _signal_guard() as guard:
        try:
            while time.time() < tx.deadline:
                if _ended(store, tx):
                    return ExitCode.OK
                time.sleep(min(0.1, max(0.0, tx.deadline - time.time())))
        except Interrupted:
            pass
        guard.armed = False
    with _lock_for_dead_man(store, tx.id):
        if _ended(store, tx):
            return ExitCode.OK
        # From what this process holds: the record may have become unreadable meanwhile.
        return _roll_back_recorded(store, report, tx, "not confirmed in time", ExitCode.ROLLED_BACK)


def _ended(store: Store, tx: Transaction) -> bool:
    """Confirmed or rolled back by another command. A record that can no longer be read
    (or is gone) ends nothing: `confirm` could not have committed through it."""
    try:
        current = store.load()
    except RecordError:
        return False
    return current is not None and (current.id != tx.id or current.phase is not Phase.CONFIRMING)


def _check_previous(store: Store, report: Report, at_boot: bool) -> None:
    """Refuse while a transaction is pending; after a restart in the middle of one, say so."""
    tx = store.load()
    if tx is None:
        return
    if tx.phase.pending and tx.from_another_boot:
        tx = tx.at(Phase.INTERRUPTED, time.time(), f"the machine restarted while {tx.phase}")
        store.save(tx)
        report.bind(transaction=tx.id, nic=tx.plan.nic, bridge=tx.plan.bridge)
        raise Refused(
            f"the machine restarted during transaction {tx.id} ({tx.detail}); "
            f"the host is on its NIC configuration",
            "find out why, then run `bridge-migrate apply` to try again",
        )
    if at_boot and tx.phase is Phase.INTERRUPTED:
        raise Refused(
            f"transaction {tx.id} was interrupted by a restart ({tx.detail}); not retrying at boot",
            "run `bridge-migrate apply` by hand to try again",
        )
    _refuse_pending(tx)


class _Run:
    """One transaction under way: the kernel, the record and the report, kept in step."""

    def __init__(self, ipr: IPRoute, store: Store, report: Report, tx: Transaction) -> None:
        self.ipr, self.store, self.report, self.tx = ipr, store, report, tx

    def mark(self, phase: Phase, detail: str = "", **changes: object) -> None:
        self.tx = replace(self.tx.at(phase, time.time(), detail), **changes)  # type: ignore[arg-type]
        self.store.save(self.tx)

    def apply(self, p: Prepared, timeout: float, confirm_within: float | None) -> ExitCode:
        with _signal_guard() as guard:
            try:
                self.mark(Phase.APPLYING)
                _boundary("applying")
                self.take_over(p)
                self.verify(p, time.monotonic() + timeout, timeout)
            except Exception as e:
                guard.armed = False  # a rollback, once started, runs to its end
                # Interrupted or surprised, we do not know what was done: undo every step.
                done = e.done if isinstance(e, StepFailed) else p.plan.steps
                code = ExitCode.INTERNAL if _is_bug(e) else ExitCode.ROLLED_BACK
                return self.roll_back(done, str(e), code)
            guard.armed = False
            if confirm_within is not None:
                return self.await_confirmation(confirm_within)
            try:
                self.mark(Phase.COMMITTED, "verified")
            except RecordError as e:  # else the record says pending: a dead man would undo it
                return self.roll_back(p.plan.steps, e.message, ExitCode.ROLLED_BACK)
            _boundary("committed")
            self.disarm()
        self.report.finish(ExitCode.OK, "migrated", f"{p.plan.nic} -> {p.plan.bridge}, verified")
        return ExitCode.OK

    def await_confirmation(self, seconds: float) -> ExitCode:
        """Hand the deadline to a dead man for the window (make before break), then return."""
        old, unit = self.tx.dead_man, None
        if old is not None:
            try:
                where = deadman.locate()
                unit = deadman.arm(where, self.tx.id, "confirm", seconds, self.store.directory)
            except deadman.DeadManError as e:
                return self.roll_back(self.tx.plan.steps, str(e), ExitCode.ROLLED_BACK)
        try:
            self.mark(Phase.CONFIRMING, "verified", deadline=time.time() + seconds, dead_man=unit)
        except RecordError as e:  # `confirm` could not find the window: close it now
            if old is not None:
                with suppress(deadman.DeadManError):
                    deadman.disarm(old)
            return self.roll_back(self.tx.plan.steps, e.message, ExitCode.ROLLED_BACK)
        if old is not None:
            deadman.disarm(old)
        self.report.finish(
            ExitCode.OK,
            "verified, waiting for confirmation",
            f"run `bridge-migrate confirm` within {seconds:g} s, or the host is rolled back",
        )
        return ExitCode.OK

    def disarm(self) -> None:
        if self.tx.dead_man is not None:
            try:
                deadman.disarm(self.tx.dead_man)
            except deadman.DeadManError as e:  # it will fire, find the transaction over, and stop
                self.report.note(str(e))

    def take_over(self, p: Prepared) -> None:
        """Create the bridge, make the additions, wait until the kernel has the bridge ready,
        send the batch, check the host against the plan."""
        plan, report = p.plan, self.report
        started = time.perf_counter()
        created = send_batch([plan.prepare.do], _resolver(self.ipr))
        if not created.ok:
            raise StepFailed(created.outcomes[0].describe(), ())
        _boundary("bridge")
        done: tuple[Step, ...] = (plan.prepare,)
        resolve = _resolver(self.ipr)
        for steps in (plan.tune, plan.make):
            sent = send_batch([s.do for s in steps], resolve)
            done += _succeeded(steps, sent)
            if _failures(sent):
                report.phase("prepare", started, _acked(steps, sent))
                raise StepFailed("; ".join(o.describe() for o in _failures(sent)), done)
        made = sent
        ipv6 = tuple(
            s.do.address.address
            for s in plan.make
            if isinstance(s.do, AddAddress) and s.do.address.family == AF_INET6
        )
        waited = wait_until_ready(self.ipr, plan.bridge, ipv6)
        ready = f"ready after {waited * 1000:.2f} ms" if waited is not None else "NOT ready"
        report.phase("prepare", started, f"{plan.prepare.do}; {_acked(plan.make, made)}; {ready}")
        started = time.perf_counter()
        result = send_batch([s.do for s in plan.batch], _resolver(self.ipr))
        done += _succeeded(plan.batch, result)
        report.phase("batch", started, _acked(plan.batch, result))
        _boundary("batch")
        if _failures(result):
            raise StepFailed("; ".join(o.describe() for o in _failures(result)), done)
        started = time.perf_counter()
        diff = differences(p.desired, read_host(self.ipr, plan.nic, plan.bridge))
        diff += wrong_way(self.ipr, p.snapshot, plan.bridge)
        report.phase("check", started, "; ".join(diff) or "host matches the plan")
        if diff:
            raise StepFailed("host does not match the plan: " + "; ".join(diff), done)
        self.mark(Phase.VERIFYING)
        _boundary("verifying")

    def verify(self, p: Prepared, deadline: float, timeout: float) -> None:
        started = time.perf_counter()
        results = run_probes(p.probes, deadline, self.report.ping)
        for r in results:
            answer = "answered" if r.ok else "no answer"
            ms = r.seconds * 1000
            self.report.note(f"{r.probe}: {answer} after {r.attempts} attempt(s), {ms:.1f} ms")
        missing = ", ".join(str(r.probe) for r in results if not r.ok)
        summary = f"no answer from {missing}" if missing else "every probe answered"
        self.report.phase("verify", started, summary)
        if missing:
            raise StepFailed(f"not verified within {timeout:g} s: {missing}", p.plan.steps)
        _boundary("verified")

    def roll_back(self, done: tuple[Step, ...], why: str, code: ExitCode) -> ExitCode:
        """Undo `done`, compare with the snapshot, then record (as far as the record can take
        it: the host comes first) and report the outcome."""
        self.record_if_possible(Phase.ROLLING_BACK, why)
        started = time.perf_counter()
        result = restore(self.ipr, self.tx.plan, self.tx.snapshot, done, self.age)
        lines = [*(o.describe() for o in result.failures), *result.differences]
        self.report.attach("differences", lines)
        for line in lines:
            self.report.note(line)
        batch = result.batch
        undone = f"{len(batch.outcomes)} inverse operations in {batch.seconds * 1000:.2f} ms"
        verdict = "host equals snapshot" if result.complete else f"{len(lines)} difference(s) left"
        self.report.phase("rollback", started, f"{undone}; {verdict}")
        if not result.complete:
            unrecorded = self.record_if_possible(Phase.ROLLBACK_INCOMPLETE, "; ".join(lines))
            self.report.finish(
                ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete", why + unrecorded
            )
            return ExitCode.ROLLBACK_INCOMPLETE
        unrecorded = self.record_if_possible(Phase.ROLLED_BACK, why)
        self.disarm()
        self.report.finish(code, "rolled back", f"{why}; host restored to its snapshot{unrecorded}")
        return code

    def record_if_possible(self, phase: Phase, detail: str) -> str:
        """Record `phase`; if the record cannot take it, say so (returned, to add to the
        result) and go on."""
        try:
            self.mark(phase, detail)
        except RecordError as e:
            self.report.note(f"{phase} not recorded: {e.message}")
            return f"; NOT recorded ({e.message}): `bridge-migrate status` shows an older phase"
        return ""

    @property
    def age(self) -> float:
        """Seconds since the snapshot: finite lifetimes have run down by this much."""
        return time.time() - self.tx.started


def _succeeded(steps: tuple[Step, ...], result: BatchResult) -> tuple[Step, ...]:
    """Steps whose operation the kernel did, or found done (a flushed neighbour entry)."""
    return tuple(
        s for s, o in zip(steps, result.outcomes, strict=True) if o.ok or already_so(o.op, o.error)
    )


def _failures(result: BatchResult) -> tuple[Outcome, ...]:
    return tuple(o for o in result.outcomes if not (o.ok or already_so(o.op, o.error)))


def _acked(steps: tuple[Step, ...], result: BatchResult) -> str:
    done = len(_succeeded(steps, result))
    return f"{done}/{len(steps)} acknowledged in {result.seconds * 1000:.2f} ms"


def _is_bug(e: Exception) -> bool:
    return not isinstance(e, StepFailed | Interrupted | OSError | RecordError)


def _boundary(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _refuse_pending(tx: Transaction | None) -> None:
    if tx is not None and tx.phase.pending:
        raise Refused(
            f"transaction {tx.id} ({tx.plan.nic} -> {tx.plan.bridge}) is {tx.phase}",
            "see `bridge-migrate status`; `bridge-migrate rollback` restores its snapshot",
        )


def _resolver(ipr: IPRoute) -> Resolve:
    return {name: link.index for name, link in read_links(ipr).items()}.__getitem__


def _summary(state: HostState) -> str:
    nic = state.nic
    counts = ", ".join(f"{n} {kind}" for kind, n in carried_counts(state).items() if n)
    return f"{nic.name} {nic.mac} mtu {nic.mtu}: carries {counts or 'nothing'}"


@dataclass
class _Guard:
    armed: bool = True


@contextmanager
def _signal_guard(armed: bool = True) -> Iterator[_Guard]:
    """While armed, SIGTERM, SIGHUP and SIGINT roll the transaction back instead of killing
    the agent; disarmed (a rollback is running), they are ignored."""
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
