"""What the kernel will hold after a list of operations: the desired state that apply checks the
host against, and the model the planner is property-tested on. Pure.

It follows the kernel's ordering rules that matter for an exact restore: IPv4 secondaries go to the
end of the device's list, a new IPv6 address goes before older ones of the same or narrower scope;
and its rules for the prefix route of an address (net/ipv4/fib_frontend.c, net/ipv6/addrconf.c):
made with the first address of a prefix; IPv4 removes it with the last one; IPv6 removes it only
when a permanent address goes and no other address of the prefix is left, and otherwise leaves
it, expiring, behind.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import replace
from typing import assert_never

from .model import (
    AF_INET,
    IFA_F_SECONDARY,
    KERNEL_METRIC,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_KERNEL,
    Address,
    HostState,
    Neighbour,
    Route,
    Rule,
    Sysctl,
)
from .netfilter import NftChange, NftRule
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
    Readopt,
    Release,
    ReplaceRoute,
    RestoreConfig,
    RestoreFirewall,
    RewriteFirewall,
    SetMaster,
    SetSysctl,
    WriteConfig,
    new_bridge_link,
    prefix_of,
)


class SimulationError(ValueError):
    """The operation could not succeed on this state (the kernel would refuse it too)."""


def simulate(state: HostState, ops: tuple[Op, ...] | list[Op]) -> HostState:
    run: list[RouteOp] = []  # consecutive route operations, simulated together
    for op in ops:
        if isinstance(op, ReplaceRoute | AddRoute | DelRoute):
            run.append(op)
            continue
        state = replace(state, routes=_route_run(state.routes, run)) if run else state
        run = []
        state = simulate_op(state, op)
    return replace(state, routes=_route_run(state.routes, run)) if run else state


RouteOp = ReplaceRoute | AddRoute | DelRoute


def _route_run(routes: tuple[Route, ...], ops: list[RouteOp]) -> tuple[Route, ...]:
    """Route operations one after the other, as `_route_op` does them, in time linear in
    routes + ops (a takeover moves every route): the routes by position, the positions by key."""
    slots: list[Route | None] = list(routes)
    at: dict[tuple[object, ...], list[int]] = {}
    for i, r in enumerate(routes):
        at.setdefault(route_key(r), []).append(i)
    for op in ops:
        match op:
            case ReplaceRoute(new=route) | AddRoute(route=route):
                key = route_key(route)
                if key not in at:
                    at[key] = [len(slots)]
                    slots.append(route)
                for i in at[key]:
                    slots[i] = route
            case DelRoute(route=route):
                key = route_key(route)
                kept = [i for i in at.get(key, ()) if _dev(slots[i]) != route.dev]
                for i in set(at.get(key, ())) - set(kept):
                    slots[i] = None
                if kept:
                    at[key] = kept
                else:
                    at.pop(key, None)
            case _:
                assert_never(op)
    return tuple(r for r in slots if r is not None)


def _dev(route: Route | None) -> str | None:
    return route.dev if route is not None else None


def simulate_op(state: HostState, op: Op) -> HostState:
    match op:
        case CreateBridge():
            if state.bridge is not None:
                raise SimulationError(f"{op.name} exists")
            # A new device starts with the "default" settings.
            fresh = tuple(s.on(op.name) for s in state.sysctls_on("default"))
            return replace(state, bridge=new_bridge_link(op), sysctls=(*state.sysctls, *fresh))
        case DeleteBridge():
            return _delete_bridge(state, op.name)
        case SetMaster():
            if op.dev != state.nic.name:
                return state  # a guest's port, detached or put back: not in the model
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
        case ReplaceRoute() | AddRoute() | DelRoute():
            return replace(state, routes=_route_op(state.routes, op))
        case AddRule():
            if op.rule in state.rules:
                raise SimulationError(f"{op.rule} exists")
            # The kernel lists rules by family and priority, a new one after its equals.
            key = (op.rule.family, op.rule.priority)
            at = sum(1 for r in state.rules if (r.family, r.priority) <= key)
            return replace(state, rules=(*state.rules[:at], op.rule, *state.rules[at:]))
        case DelRule():
            if op.rule not in state.rules:
                raise SimulationError(f"no {op.rule}")
            return replace(state, rules=_without(state.rules, op.rule))
        case SetSysctl():
            return replace(state, sysctls=_set_sysctl(state.sysctls, op.sysctl))
        case RewriteFirewall():
            return replace(state, firewall=_rewritten(state.firewall, op.change))
        case RestoreFirewall():
            return replace(state, firewall=_rewritten(state.firewall, op.change.inverse()))
        case WriteConfig() | RestoreConfig() | Adopt() | Readopt() | Release():
            return state  # files and daemons: not the kernel's state
        case _:
            assert_never(op)


def _rewritten(rules: tuple[NftRule, ...], change: NftChange) -> tuple[NftRule, ...]:
    """Each rule replaced in place (same handle); one already rewritten is left as it is."""
    after = {r.before.key: r.after for r in change.rewrites}
    return tuple(after.get(r.key, r) for r in rules)


def _without(rules: tuple[Rule, ...], gone: Rule) -> tuple[Rule, ...]:
    return tuple(r for r in rules if r != gone)


def _set_sysctl(sysctls: tuple[Sysctl, ...], new: Sysctl) -> tuple[Sysctl, ...]:
    key = (new.family, new.dev, new.key)
    if not any((s.family, s.dev, s.key) == key for s in sysctls):
        raise SimulationError(f"no setting {new.path}")
    return tuple(new if (s.family, s.dev, s.key) == key else s for s in sysctls)


def route_key(r: Route) -> tuple[object, ...]:
    """What the kernel matches on when a route is replaced or deleted."""
    return (r.family, r.table, r.dst, r.dst_len, r.src, r.src_len, r.priority, r.tos)


def _route_op(routes: tuple[Route, ...], op: RouteOp) -> tuple[Route, ...]:
    match op:
        case ReplaceRoute(new=route) | AddRoute(route=route):
            return _replace_route(routes, route)
        case DelRoute(route=route):
            # A route the kernel removed by itself counts as deleted (ESRCH is "already so").
            key = route_key(route)
            return tuple(r for r in routes if not (route_key(r) == key and r.dev == route.dev))
        case _:
            assert_never(op)


def _replace_route(routes: tuple[Route, ...], new: Route) -> tuple[Route, ...]:
    """In place of the route with the same key, else added: the kernel's NLM_F_REPLACE."""
    key = route_key(new)
    if not any(route_key(r) == key for r in routes):
        return (*routes, new)
    return tuple(new if route_key(r) == key else r for r in routes)


def _same_neighbour(a: Neighbour, b: Neighbour) -> bool:
    return (a.dev, a.family, a.dst) == (b.dev, b.family, b.dst)


def _delete_bridge(state: HostState, name: str) -> HostState:
    # Rules naming a device outlive it (they match nothing until it comes back): kept.
    if state.bridge is None or state.bridge.name != name:
        raise SimulationError(f"no bridge {name}")
    nic = state.nic if state.nic.master != name else replace(state.nic, master=None)
    return replace(
        state,
        nic=nic,
        bridge=None,
        addresses=tuple((d, a) for d, a in state.addresses if d != name),
        routes=tuple(r for r in state.routes if r.dev != name),
        neighbours=tuple(n for n in state.neighbours if n.dev != name),
        sysctls=tuple(s for s in state.sysctls if s.dev != name),
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
    routes = _prefix_route_added(state.routes, dev, new) if new.makes_prefix_route else state.routes
    return replace(state, addresses=tuple(entries), routes=routes)


def prefix_route(dev: str, a: Address, expires: int | None) -> Route:
    """The route the kernel makes to the prefix of `a` on `dev`."""
    net = prefix_of(a)
    v4 = a.family == AF_INET
    return Route(
        family=a.family,
        table=RT_TABLE_MAIN,
        dst=str(net.network_address),
        dst_len=net.prefixlen,
        dev=dev,
        gateway=None,
        priority=a.rt_priority or KERNEL_METRIC[a.family],
        protocol=RTPROT_KERNEL,
        scope=RT_SCOPE_LINK if v4 else RT_SCOPE_UNIVERSE,
        type=RTN_UNICAST,
        tos=0,
        prefsrc=a.address if v4 else None,
        flags=0,
        metrics=(),
        pref=None if v4 else 0,
        expires=None if v4 else expires,
    )


def _prefix_route_added(routes: tuple[Route, ...], dev: str, a: Address) -> tuple[Route, ...]:
    made = prefix_route(dev, a, a.valid_lft if a.finite else None)
    existing = _find_prefix_route(routes, made)
    if existing is None:
        return (*routes, made)
    if existing.expires is None:  # IPv4, or a permanent route: the kernel leaves it (EEXIST)
        return routes
    # An expiring IPv6 prefix route takes the lifetime of the newest address, or none.
    return tuple(replace(r, expires=made.expires) if r is existing else r for r in routes)


def _find_prefix_route(routes: tuple[Route, ...], made: Route) -> Route | None:
    key = route_key(made)
    return next(
        (r for r in routes if route_key(r) == key and r.dev == made.dev and r.gateway is None),
        None,
    )


def _prefix_route_removed(
    routes: tuple[Route, ...], dev: str, gone: Address, left: list[Address]
) -> tuple[Route, ...]:
    made = prefix_route(dev, gone, None)
    existing = _find_prefix_route(routes, made)
    net = prefix_of(gone)
    same = [a for a in left if a.family == gone.family and prefix_of(a) == net]
    if existing is None:
        return routes
    if gone.family == AF_INET:
        return routes if same else tuple(r for r in routes if r is not existing)
    if gone.finite or any(not a.finite or not a.makes_prefix_route for a in same):
        return routes
    if same:
        lifetime = max(a.valid_lft for a in same)
        expires = existing.expires if existing.expires is not None else lifetime
        return tuple(replace(r, expires=expires) if r is existing else r for r in routes)
    return tuple(r for r in routes if r is not existing)


def _with_secondary_flag(new: Address, existing: list[Address]) -> Address:
    subnet = _network(new.address, new.prefixlen)
    shares_subnet = any(
        a.prefixlen == new.prefixlen and _network(a.address, a.prefixlen) == subnet
        for a in existing
    )
    flags = new.flags | IFA_F_SECONDARY if shares_subnet else new.flags & ~IFA_F_SECONDARY
    return replace(new, flags=flags)


@functools.cache
def _network(address: str, prefixlen: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parsed once: the secondary flag compares each new address with every one before it."""
    return ipaddress.ip_interface(f"{address}/{prefixlen}").network


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
    routes = state.routes
    if gone.makes_prefix_route:
        left = [a for d, a in keep if d == dev]
        routes = _prefix_route_removed(routes, dev, gone, left)
    return replace(state, addresses=tuple(keep), routes=routes)
