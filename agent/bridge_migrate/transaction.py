"""The pipeline: snapshot -> plan -> apply -> verify -> commit | rollback, with the record on disk
updated at every phase, so that a rollback can always find what the host looked like."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from pyroute2 import IPRoute

from .batch import send_batch
from .compare import differences
from .encode import Resolve
from .errors import ExitCode, Refused
from .model import HostState
from .plan import Plan, Step, is_migrated, plan_takeover
from .preflight import check_root, choose_nic, refusals
from .record import Phase, Store, Transaction
from .report import Report
from .rollback import restore
from .simulate import simulate
from .snapshot import read_host, read_links, unsupported_routes
from .verify import Probe, gateway_probes, run_probes


@dataclass(frozen=True)
class ApplyRequest:
    nic: str | None
    bridge: str
    timeout: float
    probes: tuple[Probe, ...]


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
    state = read_host(ipr, nic, req.bridge)
    report.attach("snapshot", state)
    report.phase("snapshot", started, _summary(state))
    if is_migrated(state, req.bridge):
        return None
    started = time.perf_counter()
    problems = refusals(state, req.bridge, unsupported_routes(ipr, nic))
    if problems:
        raise Refused("; ".join(problems))
    plan = plan_takeover(state, req.bridge)
    probes = (*gateway_probes(state, req.bridge), *req.probes)
    if not probes:
        raise Refused(f"nothing to verify: {nic} has no default route via a gateway", "add --probe")
    report.attach("plan", plan)
    report.phase("plan", started, f"{len(plan.batch)} operations in one batch")
    desired = simulate(state, [s.do for s in plan.steps])
    return Prepared(state, plan, desired, probes)


def apply(req: ApplyRequest, store: Store, report: Report) -> ExitCode:
    check_root()
    with store.lock():
        _refuse_pending(store.load())
        with IPRoute() as ipr:
            prepared = read_plan(ipr, req, report)
            if prepared is None:
                report.finish(ExitCode.OK, "already migrated", "nothing to do")
                return ExitCode.OK
            now = time.time()
            tx = Transaction(
                id=uuid.uuid4().hex[:12],
                phase=Phase.PLANNED,
                pid=os.getpid(),
                started=now,
                updated=now,
                deadline=now + req.timeout,
                snapshot=prepared.snapshot,
                plan=prepared.plan,
                probes=prepared.probes,
                detail="",
            )
            store.save(tx)
            return _Run(ipr, store, report, tx).apply(prepared, req.timeout)


def rollback(store: Store, report: Report) -> ExitCode:
    """Restore the snapshot in the record, whatever phase the transaction reached."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None:
            raise Refused(f"nothing to roll back: no transaction record in {store.directory}")
        if tx.phase is Phase.ROLLED_BACK:
            report.finish(ExitCode.OK, "nothing to do", f"transaction {tx.id} was rolled back")
            return ExitCode.OK
        with IPRoute() as ipr, _signal_guard(armed=False):
            # Where the agent stopped is unknown: undo every step (each inverse tolerates
            # finding its work already done).
            return _Run(ipr, store, report, tx).roll_back(
                tx.plan.steps, "rollback requested", ExitCode.OK
            )


class _Run:
    """One transaction under way: the kernel, the record and the report, kept in step."""

    def __init__(self, ipr: IPRoute, store: Store, report: Report, tx: Transaction) -> None:
        self.ipr, self.store, self.report, self.tx = ipr, store, report, tx

    def mark(self, phase: Phase, detail: str = "") -> None:
        self.tx = self.tx.at(phase, time.time(), detail)
        self.store.save(self.tx)

    def apply(self, p: Prepared, timeout: float) -> ExitCode:
        with _signal_guard() as guard:
            try:
                self.take_over(p)
                self.verify(p, time.monotonic() + timeout, timeout)
            except Exception as e:
                guard.armed = False  # a rollback, once started, runs to its end
                # Interrupted or surprised, we do not know what was done: undo every step.
                done = e.done if isinstance(e, StepFailed) else p.plan.steps
                code = ExitCode.INTERNAL if _is_bug(e) else ExitCode.ROLLED_BACK
                return self.roll_back(done, str(e), code)
            guard.armed = False
            self.mark(Phase.COMMITTED, "verified")
        self.report.finish(ExitCode.OK, "migrated", f"{p.plan.nic} -> {p.plan.bridge}, verified")
        return ExitCode.OK

    def take_over(self, p: Prepared) -> None:
        """Create the bridge, send the batch, check the host against the plan."""
        plan, report = p.plan, self.report
        started = time.perf_counter()
        created = send_batch([plan.prepare.do], _resolver(self.ipr))
        if not created.ok:
            raise StepFailed(created.outcomes[0].describe(), ())
        report.phase("bridge", started, str(plan.prepare.do))
        done: tuple[Step, ...] = (plan.prepare,)
        self.mark(Phase.APPLYING)
        started = time.perf_counter()
        result = send_batch([s.do for s in plan.batch], _resolver(self.ipr))
        done += tuple(s for s, o in zip(plan.batch, result.outcomes, strict=True) if o.ok)
        ms = result.seconds * 1000
        report.phase(
            "batch", started, f"{len(result.done)}/{len(plan.batch)} acknowledged in {ms:.2f} ms"
        )
        if not result.ok:
            raise StepFailed("; ".join(o.describe() for o in result.failures), done)
        started = time.perf_counter()
        diff = differences(p.desired, read_host(self.ipr, plan.nic, plan.bridge))
        report.phase("check", started, "; ".join(diff) or "host matches the plan")
        if diff:
            raise StepFailed("host does not match the plan: " + "; ".join(diff), done)
        self.mark(Phase.VERIFYING)

    def verify(self, p: Prepared, deadline: float, timeout: float) -> None:
        started = time.perf_counter()
        results = run_probes(p.probes, deadline)
        for r in results:
            answer = "answered" if r.ok else "no answer"
            ms = r.seconds * 1000
            self.report.note(f"{r.probe}: {answer} after {r.attempts} attempt(s), {ms:.1f} ms")
        missing = ", ".join(str(r.probe) for r in results if not r.ok)
        self.report.phase(
            "verify", started, f"no answer from {missing}" if missing else "every probe answered"
        )
        if missing:
            raise StepFailed(f"not verified within {timeout:g} s: {missing}", p.plan.steps)

    def roll_back(self, done: tuple[Step, ...], why: str, code: ExitCode) -> ExitCode:
        """Undo `done`, compare with the snapshot, record and report the outcome."""
        self.mark(Phase.ROLLING_BACK, why)
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
            self.mark(Phase.ROLLBACK_INCOMPLETE, "; ".join(lines))
            self.report.finish(ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete", why)
            return ExitCode.ROLLBACK_INCOMPLETE
        self.mark(Phase.ROLLED_BACK, why)
        self.report.finish(code, "rolled back", f"{why}; host restored to its snapshot")
        return code

    @property
    def age(self) -> float:
        """Seconds since the snapshot: finite lifetimes have run down by this much."""
        return time.time() - self.tx.started


def _is_bug(e: Exception) -> bool:
    return not isinstance(e, StepFailed | Interrupted | OSError)


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
    v4 = sum(1 for a in state.addresses_on(nic.name) if a.family == 2)
    v6 = sum(1 for a in state.addresses_on(nic.name) if a.family == 10)
    return (
        f"{nic.name} {nic.mac} mtu {nic.mtu}: {v4} IPv4 + {v6} IPv6 addresses, "
        f"{len(state.routes_on(nic.name))} routes, {len(state.neighbours_on(nic.name))} neighbours"
    )


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
