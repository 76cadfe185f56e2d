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
from .rollback import RestoreResult, restore
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
            return _run(ipr, tx, prepared, req.timeout, store, report)


def _run(
    ipr: IPRoute, tx: Transaction, p: Prepared, timeout: float, store: Store, report: Report
) -> ExitCode:
    born = time.monotonic()
    with _signal_guard() as guard:
        try:
            _take_over(ipr, tx, p, store, report)
            _verify(p, born + timeout, timeout, report)
        except Exception as e:
            guard.armed = False  # a rollback, once started, runs to its end
            # Interrupted or surprised, we do not know what was done: undo every step (each
            # inverse tolerates finding its work already done).
            done = e.done if isinstance(e, StepFailed) else p.plan.steps
            code = ExitCode.INTERNAL if _is_bug(e) else ExitCode.ROLLED_BACK
            age = time.monotonic() - born
            return _roll_back(ipr, tx, done, age, store, report, str(e), code)
        guard.armed = False
        store.save(tx.at(Phase.COMMITTED, time.time(), "verified"))
    report.finish(ExitCode.OK, "migrated", f"{p.plan.nic} -> {p.plan.bridge}, verified")
    return ExitCode.OK


def _is_bug(e: Exception) -> bool:
    return not isinstance(e, StepFailed | Interrupted | OSError)


def _verify(p: Prepared, deadline: float, timeout: float, report: Report) -> None:
    started = time.perf_counter()
    results = run_probes(p.probes, deadline)
    for r in results:
        answer = "answered" if r.ok else "no answer"
        report.note(f"{r.probe}: {answer} after {r.attempts} attempt(s), {r.seconds * 1000:.1f} ms")
    missing = [str(r.probe) for r in results if not r.ok]
    if missing:
        report.phase("verify", started, "no answer from " + ", ".join(missing))
        raise StepFailed(f"not verified within {timeout:g} s: {', '.join(missing)}", p.plan.steps)
    report.phase("verify", started, "every probe answered")


def _take_over(ipr: IPRoute, tx: Transaction, p: Prepared, store: Store, report: Report) -> None:
    """Create the bridge, send the batch, check the host against the plan."""
    plan = p.plan
    started = time.perf_counter()
    created = send_batch([plan.prepare.do], _resolver(ipr))
    if not created.ok:
        raise StepFailed(created.outcomes[0].describe(), ())
    report.phase("bridge", started, str(plan.prepare.do))
    done: tuple[Step, ...] = (plan.prepare,)
    store.save(tx.at(Phase.APPLYING, time.time()))
    started = time.perf_counter()
    result = send_batch([s.do for s in plan.batch], _resolver(ipr))
    done += tuple(s for s, o in zip(plan.batch, result.outcomes, strict=True) if o.ok)
    acked = f"{len(result.done)}/{len(plan.batch)} acknowledged in {result.seconds * 1000:.2f} ms"
    report.phase("batch", started, acked)
    if not result.ok:
        raise StepFailed("; ".join(o.describe() for o in result.failures), done)
    started = time.perf_counter()
    diff = differences(p.desired, read_host(ipr, plan.nic, plan.bridge))
    report.phase("check", started, "host matches the plan" if not diff else "; ".join(diff))
    if diff:
        raise StepFailed("host does not match the plan: " + "; ".join(diff), done)
    store.save(tx.at(Phase.VERIFYING, time.time()))


def _roll_back(
    ipr: IPRoute,
    tx: Transaction,
    done: tuple[Step, ...],
    age: float,
    store: Store,
    report: Report,
    why: str,
    code: ExitCode,
) -> ExitCode:
    store.save(tx.at(Phase.ROLLING_BACK, time.time(), why))
    result = _restore_and_record(ipr, tx, done, age, store, report, why)
    if not result.complete:
        report.finish(ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete", why)
        return ExitCode.ROLLBACK_INCOMPLETE
    report.finish(code, "rolled back", f"{why}; host restored to its snapshot")
    return code


def _restore_and_record(
    ipr: IPRoute,
    tx: Transaction,
    done: tuple[Step, ...],
    age: float,
    store: Store,
    report: Report,
    why: str,
) -> RestoreResult:
    started = time.perf_counter()
    result = restore(ipr, tx.plan, tx.snapshot, done, age)
    lines = [*(o.describe() for o in result.failures), *result.differences]
    report.attach("differences", lines)
    for line in lines:
        report.note(line)
    undone = (
        f"{len(result.batch.outcomes)} inverse operations in {result.batch.seconds * 1000:.2f} ms"
    )
    verdict = "host equals snapshot" if result.complete else f"{len(lines)} difference(s) left"
    report.phase("rollback", started, f"{undone}; {verdict}")
    phase = Phase.ROLLED_BACK if result.complete else Phase.ROLLBACK_INCOMPLETE
    store.save(tx.at(phase, time.time(), why if result.complete else "; ".join(lines)))
    return result


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
            store.save(tx.at(Phase.ROLLING_BACK, time.time(), "rollback requested"))
            result = _restore_and_record(
                ipr,
                tx,
                tx.plan.steps,
                time.time() - tx.started,
                store,
                report,
                "rollback requested",
            )
    if not result.complete:
        report.finish(ExitCode.ROLLBACK_INCOMPLETE, "rollback incomplete")
        return ExitCode.ROLLBACK_INCOMPLETE
    report.finish(ExitCode.OK, "rolled back", f"transaction {tx.id}: host restored to its snapshot")
    return ExitCode.OK


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
