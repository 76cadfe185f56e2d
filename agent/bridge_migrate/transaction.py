"""The pipeline: snapshot -> plan -> apply -> verify -> commit | rollback, with the record on disk
updated at every phase, so that a rollback can always find what the host looked like, and a dead
man armed before the first change, so that one happens even if this process dies."""

from __future__ import annotations

import functools
import gc
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress

from pyroute2.iproute.linux import IPRoute
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from . import deadman, guestbook, handover
from .checkpoint import Checkpoint, Deadline, Interrupted, resume, settle, signal_guard
from .contract import ALREADY_MIGRATED, ExitCode, Phase
from .errors import Refused
from .handover.files import write_states
from .plan import Adopt, RestoreConfig
from .preflight import check_root
from .prepare import ApplyRequest, Prepared, read_giveback, read_plan
from .progress import Progress
from .record import Locked, RecordError, Store, Transaction

# A live agent rolling back is given this long past the deadline (a manager configuring the NIC
# again takes seconds) before the dead man kills it; the dead man waits a little longer.
_ROLLBACK_GRACE = handover.WAIT + 5.0
_EXPIRE_LOCK_WAIT = _ROLLBACK_GRACE + 5.0
_EARLY = 0.5  # seconds: a dead man this much before its deadline was meant for an older one


def apply(
    req: ApplyRequest, store: Store, progress: Progress, *, at_boot: bool = False
) -> ExitCode:
    """Take the host over onto the bridge."""
    return _transact(req, store, progress, read_plan, at_boot=at_boot)


def undo(req: ApplyRequest, store: Store, progress: Progress) -> ExitCode:
    """Move the host back from the bridge onto its one port, planned from the live host."""
    check_root()
    guests = guestbook.on_bridge(store, req.bridge)  # refused by name while attached
    read = functools.partial(read_giveback, guests=guests)
    return _transact(req, store, progress, read, at_boot=False)


Reader = Callable[[ApplyRequest, Progress], Prepared | None]


def _transact(
    req: ApplyRequest, store: Store, progress: Progress, read: Reader, *, at_boot: bool
) -> ExitCode:
    check_root()
    tx_id = uuid.uuid4().hex[:12]
    progress.bind(transaction=tx_id)
    with store.lock(), _without_collector_pauses():
        _check_previous(store, progress, at_boot)
        with IPRoute() as ipr:
            prepared = read(req, progress)
            if prepared is None:
                progress.finish(ExitCode.OK, ALREADY_MIGRATED, "nothing to do")
                return ExitCode.OK
            plan = prepared.plan
            deadline = Deadline.after(req.timeout)
            with Checkpoint.open(ipr, store, progress, tx_id, prepared, deadline) as cp:
                cp.take_over(prepared, deadline)
                if req.confirm_within is None:
                    cp.commit(f"{plan.source} -> {plan.target}, verified")
                else:
                    cp.hold(req.confirm_within)
    if cp.outcome == ExitCode.OK and cp.tx.phase is Phase.CONFIRMING and cp.tx.dead_man is None:
        return _be_the_dead_man(store, progress, cp.tx)
    return cp.outcome


@contextmanager
def _without_collector_pauses() -> Iterator[None]:
    """Python's cyclic garbage collector off for the transaction (seconds; what it would free
    is a few MB for a host of a thousand routes): its passes over the snapshot's and the plan's
    objects, in the middle of the sends and the check, were a third of the time to verified."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def rollback(store: Store, progress: Progress) -> ExitCode:
    """Restore the snapshot in the record, whatever phase the transaction reached."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None:
            raise Refused(f"nothing to roll back: no transaction record in {store.directory}")
        if tx.phase in (Phase.ROLLED_BACK, Phase.INTERRUPTED):
            progress.finish(ExitCode.OK, "nothing to do", f"transaction {tx.id} is {tx.phase}")
            return ExitCode.OK
        return _roll_back_recorded(store, progress, tx, "rollback requested", ExitCode.OK)


def expire(store: Store, progress: Progress, tx_id: str) -> ExitCode:
    """What the dead man runs: roll transaction `tx_id` back if it is still pending."""
    check_root()
    with _lock_for_dead_man(store, tx_id):
        tx = store.load()
        if tx is None or tx.id != tx_id:
            progress.finish(ExitCode.OK, "nothing to do", f"transaction {tx_id} is not recorded")
            return ExitCode.OK
        if not tx.phase.pending:
            progress.finish(ExitCode.OK, "nothing to do", f"transaction {tx_id} is {tx.phase}")
            return ExitCode.OK
        if time.time() < tx.deadline - _EARLY:
            # The timer of a deadline that has moved on (the verification's, once a
            # confirmation window took over): the window's own dead man keeps the new one.
            progress.finish(ExitCode.OK, "nothing to do", f"transaction {tx_id} is within its time")
            return ExitCode.OK
        progress.bind(transaction=tx.id, nic=tx.plan.nic, bridge=tx.plan.bridge)
        why = f"deadline passed while {tx.phase}"
        return _roll_back_recorded(store, progress, tx, why, ExitCode.ROLLED_BACK)


def confirm(store: Store, progress: Progress) -> ExitCode:
    """Commit a transaction that waits for confirmation (apply --confirm-within)."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None or tx.phase is not Phase.CONFIRMING:
            what = f"transaction {tx.id} is {tx.phase}" if tx else "no transaction recorded"
            raise Refused(f"nothing to confirm: {what}")
        if tx.from_another_boot:  # the bridge went with the restart: nothing to keep
            raise Refused(f"nothing to confirm: transaction {tx.id} was cut short by a restart")
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
        settle(tx.plan, progress)
    progress.finish(ExitCode.OK, "committed", f"transaction {tx.id} confirmed")
    return ExitCode.OK


def _roll_back_recorded(
    store: Store, progress: Progress, tx: Transaction, why: str, code: ExitCode
) -> ExitCode:
    with IPRoute() as ipr, signal_guard(armed=False):
        # Where the agent stopped is unknown: undo every step (each inverse tolerates
        # finding its work already done).
        return resume(ipr, store, progress, tx).roll_back(tx.plan.steps, why, code)


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
    if not tx.phase.pending:
        return  # over: the agent is on its way out with the lock
    if tx.phase is Phase.ROLLING_BACK and time.time() < tx.deadline + _ROLLBACK_GRACE:
        return  # busy putting the host back, not hung
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


def _be_the_dead_man(store: Store, progress: Progress, tx: Transaction) -> ExitCode:
    """No systemd: this process waits out the confirmation window, then expires the
    transaction unless `bridge-migrate confirm` committed it. A signal ends the wait early."""
    progress.note("no systemd: this process is the dead man; keep it running")
    with signal_guard() as guard:
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
        return _roll_back_recorded(
            store, progress, tx, "not confirmed in time", ExitCode.ROLLED_BACK
        )


def _ended(store: Store, tx: Transaction) -> bool:
    """Confirmed or rolled back by another command. A record that can no longer be read
    (or is gone) ends nothing: `confirm` could not have committed through it."""
    try:
        current = store.load()
    except RecordError:
        return False
    return current is not None and (current.id != tx.id or current.phase is not Phase.CONFIRMING)


def recover(store: Store, progress: Progress) -> ExitCode:
    """What a network manager's unit runs first while a transaction is pending (a drop-in the
    hand-over wrote): after a restart in the middle of it, the manager's files go back before
    the manager reads them, and the transaction is recorded as interrupted."""
    check_root()
    with store.lock():
        tx = store.load()
        if tx is None or not (tx.phase.pending and tx.from_another_boot):
            progress.finish(ExitCode.OK, "nothing to do", "no transaction cut short by a restart")
            return ExitCode.OK
        progress.bind(transaction=tx.id, nic=tx.plan.nic, bridge=tx.plan.bridge)
        _interrupted(store, tx)
    progress.finish(
        ExitCode.OK,
        "recovered",
        f"transaction {tx.id} was cut short by a restart; the managers' files are as before it",
    )
    return ExitCode.OK


def _interrupted(store: Store, tx: Transaction) -> Transaction:
    """A transaction cut short by a restart: the kernel's state went with it; the managers'
    files (which outlive it) go back, and so do the drop-ins that would have done it."""
    for step in tx.plan.handover:
        if isinstance(step.undo, RestoreConfig):
            write_states(f.inverse() for f in step.undo.files)
    tx = tx.at(Phase.INTERRUPTED, time.time(), f"the machine restarted while {tx.phase}")
    store.save(tx)
    until = time.monotonic() + handover.WAIT
    for step in tx.plan.handover:
        if isinstance(step.do, Adopt):
            handover.restored(step.do.adoption, until)  # netplan renders the old files again
    return tx


def _check_previous(store: Store, progress: Progress, at_boot: bool) -> None:
    """Refuse while a transaction is pending; after a restart in the middle of one, say so."""
    tx = store.load()
    if tx is None:
        return
    if tx.phase.pending and tx.from_another_boot:
        tx = _interrupted(store, tx)
        progress.bind(transaction=tx.id, nic=tx.plan.nic, bridge=tx.plan.bridge)
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


def _refuse_pending(tx: Transaction | None) -> None:
    if tx is not None and tx.phase.pending:
        raise Refused(
            f"transaction {tx.id} ({tx.plan.nic} -> {tx.plan.bridge}) is {tx.phase}",
            "see `bridge-migrate status`; `bridge-migrate rollback` restores its snapshot",
        )
