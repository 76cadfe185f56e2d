"""Put the host back: the inverses of what was done, newest first, as one netlink batch; then
read the host back and compare it with the snapshot.

Each inverse tolerates finding its work already done (an address already there, a bridge already
gone), so the same code serves an in-process rollback of the steps that succeeded and a rollback
from the record after the agent died at an unknown point.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, replace
from typing import assert_never

from pyroute2.iproute.linux import IPRoute

from .batch import BatchResult, Outcome, send_batch
from .compare import differences
from .model import FOREVER, HostState
from .plan import (
    AddAddress,
    AddNeighbour,
    AddRoute,
    AddRule,
    Adopt,
    CreateBridge,
    DelAddress,
    DeleteBridge,
    DelNeighbour,
    DelRoute,
    DelRule,
    Op,
    Plan,
    Readopt,
    Release,
    ReplaceRoute,
    RestoreConfig,
    RestoreFirewall,
    RewriteFirewall,
    SetMaster,
    SetSysctl,
    Step,
    WriteConfig,
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
    began = time.monotonic()
    undo = managers_around(on_link_first([s.undo for s in reversed(done)]))
    if any(isinstance(op, Readopt) for op in undo):
        undo = _as_renewed(undo, read_host(plan.nic, plan.bridge), age)
    outcomes: list[Outcome] = []
    seconds = 0.0
    # A bridge that `undo` deleted comes back first, alone: the inverses after it name it.
    for ops in _split_after_creation(undo):
        links = {name: link.index for name, link in read_links(ipr).items()}
        # An inverse on a device that is gone has nothing left to undo.
        kept = [op for op in ops if all(d in links for d in op_devices(op))]
        sent = send_batch(kept, links.__getitem__, age)
        outcomes += sent.outcomes
        seconds += sent.seconds
    result = BatchResult(tuple(outcomes), seconds)
    failures = tuple(o for o in result.outcomes if not (o.ok or already_so(o.op, o.error)))
    told = any(isinstance(op, Readopt) for op in undo)
    return RestoreResult(result, failures, _settled(plan, snapshot, age, began, told))


def _settled(
    plan: Plan, snapshot: HostState, age: float, began: float, told: bool
) -> tuple[str, ...]:
    """The differences left. A manager told to configure the NIC again may drop what it finds
    and acquire it anew (SLAAC and DHCPv6 take a second or two): it is given a while. Lifetimes
    run on meanwhile (a manager may take seconds): the age is the snapshot's at each reading."""
    deadline = time.monotonic() + (_SETTLE if told else 0.0)
    while True:
        actual = read_host(plan.nic, plan.bridge)
        now = age + time.monotonic() - began
        found = differences(snapshot, actual, now, managed=told)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


_SETTLE = 10.0  # seconds


def _as_renewed(ops: list[Op], now: HostState, age: float) -> list[Op]:
    """A leased address goes back with the lifetimes its manager renewed it to since (it may
    have held it for many leases), not with the snapshot's, which may have run out.
    `age` is added back, as the encoder takes it off every lifetime."""
    held = {(a.family, a.address, a.prefixlen): a for _, a in now.addresses if a.finite}

    def renewed(op: Op) -> Op:
        if not isinstance(op, AddAddress) or not op.address.finite:
            return op
        live = held.get((op.address.family, op.address.address, op.address.prefixlen))
        if live is None:
            return op
        valid = min(FOREVER - 1, live.valid_lft + int(age))
        preferred = min(FOREVER - 1, live.preferred_lft + int(age))
        address = replace(op.address, valid_lft=valid, preferred_lft=preferred)
        return replace(op, address=address)

    return [renewed(op) for op in ops]


def managers_around(ops: list[Op]) -> list[Op]:
    """Every manager to be readopted lets go of the bridge first (one that holds its profiles
    in memory would make the bridge again as soon as the inverses delete it); the managers'
    files restored next, so nothing reads the bridge's files once the bridge is gone; the
    managers told last, once the NIC is as it was, to configure it again."""
    files = [op for op in ops if isinstance(op, RestoreConfig)]
    told = [op for op in ops if isinstance(op, Readopt)]
    rest = [op for op in ops if not isinstance(op, RestoreConfig | Readopt)]
    released = [Release(op.adoption) for op in told]
    return [*released, *files, *rest, *told]


def _split_after_creation(ops: list[Op]) -> list[list[Op]]:
    """The operations in runs that end with each bridge creation (its index is known after)."""
    runs: list[list[Op]] = [[]]
    for op in ops:
        runs[-1].append(op)
        if isinstance(op, CreateBridge):
            runs.append([])
    return [run for run in runs if run]


def on_link_first(ops: list[Op]) -> list[Op]:
    """The same operations, but among those that install routes, the ones without a next hop
    first: a route through a gateway needs the route to the gateway's prefix in place (a
    manager's subnet route is an ordinary route here). The others keep their places."""
    slots = [i for i, op in enumerate(ops) if isinstance(op, ReplaceRoute | AddRoute)]
    routes = sorted((ops[i] for i in slots), key=_has_next_hop)
    reordered = list(ops)
    for i, op in zip(slots, routes, strict=True):
        reordered[i] = op
    return reordered


def _has_next_hop(op: Op) -> bool:
    route = (
        op.new if isinstance(op, ReplaceRoute) else op.route if isinstance(op, AddRoute) else None
    )
    return route is not None and route.next_hop is not None


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
        case AddRoute() | DelRoute():
            return (op.route.dev,)
        case AddRule() | DelRule():
            return ()  # a rule may name a device that does not exist
        case SetSysctl():
            return (op.sysctl.dev,)
        case RewriteFirewall() | RestoreFirewall():
            return ()
        case WriteConfig() | RestoreConfig() | Adopt() | Readopt() | Release():
            return ()
        case _:
            assert_never(op)


def already_so(op: Op, error: int) -> bool:
    """The kernel refused because the state this operation wants is already there."""
    match op:
        case AddAddress() | AddRule():
            return error == errno.EEXIST
        case DelAddress():
            return error in (errno.EADDRNOTAVAIL, errno.ENOENT)
        case DelNeighbour() | DelRule():
            return error == errno.ENOENT
        case DelRoute():
            return error == errno.ESRCH
        case DeleteBridge():
            return error == errno.ENODEV
        case CreateBridge() | SetMaster() | AddNeighbour() | ReplaceRoute() | AddRoute():
            return False
        case SetSysctl() | RewriteFirewall() | RestoreFirewall():
            return False
        case WriteConfig() | RestoreConfig() | Adopt() | Readopt() | Release():
            return False  # each brings its files or its daemon to a state, whatever it was
        case _:
            assert_never(op)
