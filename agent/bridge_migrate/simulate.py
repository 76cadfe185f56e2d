"""What the kernel will hold after a list of operations: the desired state that apply checks the
host against, and the model the planner is property-tested on. Pure.

It follows the kernel's ordering rules that matter for an exact restore: IPv4 secondaries go to the
end of the device's list, a new IPv6 address goes before older ones of the same or narrower scope.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from .model import AF_INET, IFA_F_SECONDARY, Address, HostState, Neighbour, Route
from .plan import (
    AddAddress,
    AddNeighbour,
    CreateBridge,
    DelAddress,
    DeleteBridge,
    DelNeighbour,
    Op,
    ReplaceRoute,
    SetMaster,
    new_bridge_link,
)


class SimulationError(ValueError):
    """The operation could not succeed on this state (the kernel would refuse it too)."""


def simulate(state: HostState, ops: tuple[Op, ...] | list[Op]) -> HostState:
    for op in ops:
        state = simulate_op(state, op)
    return state


def simulate_op(state: HostState, op: Op) -> HostState:
    match op:
        case CreateBridge():
            if state.bridge is not None:
                raise SimulationError(f"{op.name} exists")
            return replace(state, bridge=new_bridge_link(op))
        case DeleteBridge():
            return _delete_bridge(state, op.name)
        case SetMaster():
            return replace(state, nic=replace(state.nic, master=op.master))
        case AddAddress():
            return _add_address(state, op.dev, op.address)
        case DelAddress():
            return _del_address(state, op.dev, op.address)
        case AddNeighbour():
            rest = tuple(n for n in state.neighbours if not _same_neighbour(n, op.neighbour))
            return replace(state, neighbours=(*rest, op.neighbour))
        case DelNeighbour():
            if not any(_same_neighbour(n, op.neighbour) for n in state.neighbours):
                raise SimulationError(f"no neighbour {op.neighbour}")
            rest = tuple(n for n in state.neighbours if not _same_neighbour(n, op.neighbour))
            return replace(state, neighbours=rest)
        case ReplaceRoute():
            return replace(state, routes=_replace_route(state.routes, op.new))
    raise AssertionError(op)


def route_key(r: Route) -> tuple[object, ...]:
    """What the kernel matches on when a route is replaced or deleted."""
    return (r.family, r.table, r.dst, r.dst_len, r.priority, r.tos)


def _replace_route(routes: tuple[Route, ...], new: Route) -> tuple[Route, ...]:
    """In place of the route with the same key, else added: the kernel's NLM_F_REPLACE."""
    key = route_key(new)
    if not any(route_key(r) == key for r in routes):
        return (*routes, new)
    return tuple(new if route_key(r) == key else r for r in routes)


def _same_neighbour(a: Neighbour, b: Neighbour) -> bool:
    return (a.dev, a.family, a.dst) == (b.dev, b.family, b.dst)


def _delete_bridge(state: HostState, name: str) -> HostState:
    if state.bridge is None or state.bridge.name != name:
        raise SimulationError(f"no bridge {name}")
    nic = state.nic if state.nic.master != name else replace(state.nic, master=None)
    return HostState(
        nic=nic,
        bridge=None,
        addresses=tuple((d, a) for d, a in state.addresses if d != name),
        routes=tuple(r for r in state.routes if r.dev != name),
        neighbours=tuple(n for n in state.neighbours if n.dev != name),
    )


def _add_address(state: HostState, dev: str, new: Address) -> HostState:
    if dev not in {state.nic.name, state.bridge.name if state.bridge else None}:
        raise SimulationError(f"no device {dev}")
    same_family = [a for d, a in state.addresses if d == dev and a.family == new.family]
    if any(a.address == new.address for a in same_family):
        raise SimulationError(f"{new} exists on {dev}")
    if new.family == AF_INET:
        new = _with_secondary_flag(new, same_family)
    entries = list(state.addresses)
    entries.insert(_insert_at(entries, dev, new), (dev, new))
    return replace(state, addresses=tuple(entries))


def _with_secondary_flag(new: Address, existing: list[Address]) -> Address:
    subnet = ipaddress.ip_interface(f"{new.address}/{new.prefixlen}").network
    shares_subnet = any(
        a.prefixlen == new.prefixlen and ipaddress.ip_address(a.address) in subnet for a in existing
    )
    flags = new.flags | IFA_F_SECONDARY if shares_subnet else new.flags & ~IFA_F_SECONDARY
    return replace(new, flags=flags)


def _insert_at(entries: list[tuple[str, Address]], dev: str, new: Address) -> int:
    mine = [i for i, (d, a) in enumerate(entries) if d == dev and a.family == new.family]
    if new.family == AF_INET:
        if new.secondary:
            return mine[-1] + 1 if mine else len(entries)
        primaries = [i for i in mine if not entries[i][1].secondary]
        return primaries[-1] + 1 if primaries else (mine[0] if mine else len(entries))
    # IPv6: before the first address of the same or a narrower scope (higher rt scope number).
    for i in mine:
        if entries[i][1].scope >= new.scope:
            return i
    return mine[-1] + 1 if mine else len(entries)


def _del_address(state: HostState, dev: str, gone: Address) -> HostState:
    keep = [
        (d, a)
        for d, a in state.addresses
        if not (d == dev and a.family == gone.family and a.address == gone.address)
    ]
    if len(keep) == len(state.addresses):
        raise SimulationError(f"no address {gone} on {dev}")
    return replace(state, addresses=tuple(keep))
