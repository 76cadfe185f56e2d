"""The takeover as data: each operation beside its inverse. Pure: no I/O here.

Order is make-before-break, in three sends. Prepare: the empty bridge. Make (harmless: the host
still talks through the NIC): the NIC enslaved first (so br0 never resolves a neighbour into a
bridge with no port), then br0 gets the addresses and the neighbour entries beside the NIC's.
The agent then waits until the kernel has br0 ready to send (its queue is attached only when the
link-watch work has seen the carrier, and a moved IPv6 address is usable only once its local
route is in). Batch (the disruptive part, one send): the routes move to br0 (replaced, so a
default route always exists), then the NIC loses its addresses, then its neighbour entries (in
that order, so no traffic still routed through the NIC re-creates an entry that can never
resolve). At no point does the host lack an address or a default route.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .model import (
    AF_INET,
    AF_INET6,
    IFA_F_NODAD,
    NUD_STALE,
    NUD_VALID,
    RT_TABLE_LOCAL,
    RTPROT_KERNEL,
    Address,
    HostState,
    Link,
    Neighbour,
    Route,
)


@dataclass(frozen=True)
class CreateBridge:
    name: str
    mac: str
    mtu: int

    def __str__(self) -> str:
        return f"create bridge {self.name} mac {self.mac} mtu {self.mtu} stp off, up"


@dataclass(frozen=True)
class DeleteBridge:
    name: str

    def __str__(self) -> str:
        return f"delete bridge {self.name}"


@dataclass(frozen=True)
class SetMaster:
    dev: str
    master: str | None

    def __str__(self) -> str:
        return f"set {self.dev} master {self.master}" if self.master else f"set {self.dev} nomaster"


@dataclass(frozen=True)
class AddAddress:
    dev: str
    address: Address

    def __str__(self) -> str:
        return f"add address {self.address} dev {self.dev}"


@dataclass(frozen=True)
class DelAddress:
    dev: str
    address: Address

    def __str__(self) -> str:
        return f"delete address {self.address} dev {self.dev}"


@dataclass(frozen=True)
class AddNeighbour:
    neighbour: Neighbour

    def __str__(self) -> str:
        return f"add neighbour {self.neighbour}"


@dataclass(frozen=True)
class DelNeighbour:
    neighbour: Neighbour

    def __str__(self) -> str:
        return f"delete neighbour {self.neighbour}"


@dataclass(frozen=True)
class ReplaceRoute:
    """Install `new` in place of the route with the same key (table, dst, metric, tos)."""

    old: Route
    new: Route

    def __str__(self) -> str:
        return f"replace route {self.new}"


Op = (
    CreateBridge
    | DeleteBridge
    | SetMaster
    | AddAddress
    | DelAddress
    | AddNeighbour
    | DelNeighbour
    | ReplaceRoute
)
OP_TYPES: tuple[type, ...] = (
    CreateBridge,
    DeleteBridge,
    SetMaster,
    AddAddress,
    DelAddress,
    AddNeighbour,
    DelNeighbour,
    ReplaceRoute,
)


@dataclass(frozen=True)
class Step:
    do: Op
    undo: Op


@dataclass(frozen=True)
class Plan:
    nic: str
    bridge: str
    prepare: Step  # creating the empty bridge, sent on its own: later messages name it
    make: tuple[Step, ...]  # harmless additions, sent as one netlink batch
    batch: tuple[Step, ...]  # every disruptive operation, sent as one netlink batch

    @property
    def steps(self) -> tuple[Step, ...]:
        return (self.prepare, *self.make, *self.batch)


def plan_takeover(state: HostState, bridge: str) -> Plan:
    nic = state.nic.name
    make = (
        Step(SetMaster(nic, bridge), SetMaster(nic, None)),
        *_add_addresses(state, bridge),
        *_carry_neighbours(state, bridge),
    )
    batch = (
        *_move_routes(state, bridge),
        *_drop_addresses(state),
        *_drop_neighbours(state),
    )
    prepare = Step(
        CreateBridge(bridge, state.nic.mac, state.nic.mtu),
        DeleteBridge(bridge),
    )
    return Plan(nic=nic, bridge=bridge, prepare=prepare, make=make, batch=batch)


def moved_addresses(state: HostState) -> tuple[Address, ...]:
    """All IPv4 addresses and the IPv6 ones that are not link-local (br0 makes its own)."""
    return tuple(
        a for a in state.addresses_on(state.nic.name) if a.family == AF_INET or a.is_global
    )


def moved_routes(state: HostState) -> tuple[Route, ...]:
    """Routes that someone configured: the kernel makes prefix and local routes itself."""
    return tuple(
        r
        for r in state.routes_on(state.nic.name)
        if r.table != RT_TABLE_LOCAL and r.protocol != RTPROT_KERNEL
    )


def carried_neighbours(state: HostState) -> tuple[Neighbour, ...]:
    return tuple(n for n in state.neighbours_on(state.nic.name) if n.state & NUD_VALID)


def bridge_label(label: str | None, nic: str, bridge: str) -> str | None:
    """eth0:1 becomes br0:1: the kernel wants a label to start with its device's name."""
    if label is None:
        return None
    return bridge + label[len(nic) :] if label.startswith(nic) else label


def _add_addresses(state: HostState, bridge: str) -> list[Step]:
    # IPv4 keeps dump order (primary before secondary); the kernel puts a new IPv6 address
    # before the older ones, so adding IPv6 in reverse dump order reproduces the NIC's order.
    moved = moved_addresses(state)
    v4 = [a for a in moved if a.family == AF_INET]
    v6 = [a for a in moved if a.family == AF_INET6]
    steps = []
    for a in [*v4, *reversed(v6)]:
        on_bridge = replace(
            a,
            label=bridge_label(a.label, state.nic.name, bridge),
            # The host owns this address already: DAD on br0 would only take it away for ~1 s.
            flags=a.flags | IFA_F_NODAD if a.family == AF_INET6 else a.flags,
        )
        steps.append(Step(AddAddress(bridge, on_bridge), DelAddress(bridge, on_bridge)))
    return steps


def _drop_addresses(state: HostState) -> list[Step]:
    # Deleting a primary IPv4 address also deletes its secondaries: secondaries go first.
    # The inverse runs in reverse, so the NIC gets primary, then secondaries, in dump order,
    # and IPv6 in reverse dump order, which the kernel turns back into dump order.
    moved = moved_addresses(state)
    v4 = [a for a in moved if a.family == AF_INET]
    v6 = [a for a in moved if a.family == AF_INET6]
    nic = state.nic.name
    order = [*v6, *reversed(v4)]
    return [Step(DelAddress(nic, a), AddAddress(nic, a)) for a in order]


def _carry_neighbours(state: HostState, bridge: str) -> list[Step]:
    steps = []
    for n in carried_neighbours(state):
        copy = replace(n, dev=bridge, state=n.state if n.is_static else NUD_STALE)
        steps.append(Step(AddNeighbour(copy), DelNeighbour(copy)))
    return steps


def _drop_neighbours(state: HostState) -> list[Step]:
    # Explicit, so the inverse restores the NIC's entries. The kernel has flushed the IPv4 ones
    # already when the NIC's last IPv4 address went: "no such entry" counts as done.
    steps = []
    for n in carried_neighbours(state):
        restored = n if n.is_static else replace(n, state=NUD_STALE)
        steps.append(Step(DelNeighbour(n), AddNeighbour(restored)))
    return steps


def _move_routes(state: HostState, bridge: str) -> list[Step]:
    # Replace, not delete-then-add: the default route never disappears.
    steps = []
    for r in moved_routes(state):
        moved = r.on(bridge)
        steps.append(Step(ReplaceRoute(r, moved), ReplaceRoute(moved, r)))
    return steps


def is_migrated(state: HostState, bridge: str) -> bool:
    """The bridge exists with the NIC as port and MAC, and carries the host's global addresses."""
    br = state.bridge
    if br is None or br.name != bridge or br.kind != "bridge":
        return False
    nic_has_global = any(a.is_global for a in state.addresses_on(state.nic.name))
    bridge_has_global = any(a.is_global for a in state.addresses_on(bridge))
    return (
        state.nic.master == bridge
        and br.mac == state.nic.mac
        and bridge_has_global
        and not nic_has_global
    )


def new_bridge_link(op: CreateBridge) -> Link:
    """The planner's model of a freshly created bridge (index unknown until the kernel says)."""
    return Link(
        index=0,
        name=op.name,
        kind="bridge",
        mac=op.mac,
        mtu=op.mtu,
        flags=0x1,
        operstate="UP",
        master=None,
    )
