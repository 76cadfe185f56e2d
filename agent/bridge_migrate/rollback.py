"""Put the host back: the inverses of what was done, newest first, as one netlink batch; then
read the host back and compare it with the snapshot.

Each inverse tolerates finding its work already done (an address already there, a bridge already
gone), so the same code serves an in-process rollback of the steps that succeeded and a rollback
from the record after the agent died at an unknown point.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute

from .batch import BatchResult, Outcome, send_batch
from .compare import differences
from .model import HostState
from .plan import (
    AddAddress,
    AddNeighbour,
    CreateBridge,
    DelAddress,
    DeleteBridge,
    DelNeighbour,
    Op,
    Plan,
    ReplaceRoute,
    SetMaster,
    Step,
)
from .snapshot import read_host, read_links


@dataclass(frozen=True)
class RestoreResult:
    batch: BatchResult
    failures: tuple[Outcome, ...]  # inverses that failed for a reason other than "already so"
    differences: tuple[str, ...]  # host read back versus snapshot

    @property
    def complete(self) -> bool:
        return not self.failures and not self.differences


def restore(
    ipr: IPRoute, plan: Plan, snapshot: HostState, done: tuple[Step, ...], age: float
) -> RestoreResult:
    links = {name: link.index for name, link in read_links(ipr).items()}
    undo = [s.undo for s in reversed(done)]
    # An inverse on a device that is gone has nothing left to undo.
    ops = [op for op in undo if all(d in links for d in op_devices(op))]
    result = send_batch(ops, links.__getitem__, age)
    failures = tuple(o for o in result.outcomes if not (o.ok or already_so(o.op, o.error)))
    actual = read_host(ipr, plan.nic, plan.bridge)
    return RestoreResult(result, failures, differences(snapshot, actual, age))


def op_devices(op: Op) -> tuple[str, ...]:
    match op:
        case CreateBridge():
            return ()
        case DeleteBridge():
            return (op.name,)
        case SetMaster():
            return (op.dev,) if op.master is None else (op.dev, op.master)
        case AddAddress() | DelAddress():
            return (op.dev,)
        case AddNeighbour() | DelNeighbour():
            return (op.neighbour.dev,)
        case ReplaceRoute():
            return (op.new.dev,)
    raise AssertionError(op)


def already_so(op: Op, error: int) -> bool:
    """The kernel refused because the state this inverse wants is already there."""
    match op:
        case AddAddress():
            return error == errno.EEXIST
        case DelAddress():
            return error in (errno.EADDRNOTAVAIL, errno.ENOENT)
        case DelNeighbour():
            return error == errno.ENOENT
        case DeleteBridge():
            return error == errno.ENODEV
    return False
