"""The takeover as data: each operation beside its inverse. Pure: no I/O here.

Order is make-before-break, in four sends. Prepare: the empty bridge. Tune: the NIC's
per-device settings that differ from a new device's, copied to the bridge before any traffic
reaches it. Make (harmless: the host still talks through the NIC): policy rules naming the
bridge beside those naming the NIC, the NIC enslaved (so br0 never resolves a neighbour into a
bridge with no port), then br0 gets the addresses and the neighbour entries (proxy entries too)
beside the NIC's.
The agent then waits until the kernel has br0 ready to send (its queue is attached only when the
link-watch work has seen the carrier, and a moved IPv6 address is usable only once its local
route is in). Batch (the disruptive part, one send): the routes move to br0 (replaced, so a
default route always exists; on-link routes before the routes through a gateway on them), then
the NIC loses its addresses, the prefix routes the kernel keeps for expiring IPv6 addresses,
its neighbour entries (in that order, so no traffic still routed through the NIC re-creates an
entry that can never resolve) and its policy rules. At no point does the host lack an address
or a default route.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Literal

from . import handover, netfilter
from .handover.files import FileChange
from .model import (
    AF_INET,
    AF_INET6,
    IFA_F_NODAD,
    KERNEL_METRIC,
    NUD_STALE,
    NUD_VALID,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTPROT_KERNEL,
    Address,
    HostState,
    Link,
    Neighbour,
    Route,
    Rule,
    Sysctl,
)
from .netfilter import NftChange, NftRule, NftRules


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


@dataclass(frozen=True)
class AddRoute:
    route: Route

    def __str__(self) -> str:
        return f"add route {self.route}"


@dataclass(frozen=True)
class DelRoute:
    route: Route

    def __str__(self) -> str:
        return f"delete route {self.route}"


@dataclass(frozen=True)
class AddRule:
    rule: Rule

    def __str__(self) -> str:
        return f"add {self.rule}"


@dataclass(frozen=True)
class DelRule:
    rule: Rule

    def __str__(self) -> str:
        return f"delete {self.rule}"


@dataclass(frozen=True)
class RewriteFirewall:
    """One nftables transaction: the rules naming the NIC name the bridge instead."""

    change: NftChange

    def __str__(self) -> str:
        return f"rewrite {len(self.change.rewrites)} nftables rule(s) to {self.change.new}"


@dataclass(frozen=True)
class RestoreFirewall:
    """The inverse transaction of `change` (rules already back are left as they are)."""

    change: NftChange

    def __str__(self) -> str:
        return f"restore {len(self.change.rewrites)} nftables rule(s) to {self.change.old}"


@dataclass(frozen=True)
class SetSysctl:
    sysctl: Sysctl

    def __str__(self) -> str:
        return f"set {self.sysctl}"


@dataclass(frozen=True)
class WriteConfig:
    """A manager's files rewritten for the bridge (not netlink: files, after the takeover)."""

    files: tuple[FileChange, ...]

    def __str__(self) -> str:
        return "; ".join(str(f) for f in self.files)


@dataclass(frozen=True)
class RestoreConfig:
    files: tuple[FileChange, ...]  # as WriteConfig made them: restored to `before`

    def __str__(self) -> str:
        return "; ".join(str(f.inverse()) for f in self.files)


@dataclass(frozen=True)
class Adopt:
    """The running manager takes the new state from its rewritten files."""

    adoption: handover.Adoption

    def __str__(self) -> str:
        a = self.adoption
        return f"{handover.manager_of_adoption(a).value} adopts {a.bridge} with {a.nic} as its port"


@dataclass(frozen=True)
class Readopt:
    """The manager configures the NIC again from its restored files."""

    adoption: handover.Adoption

    def __str__(self) -> str:
        a = self.adoption
        return f"{handover.manager_of_adoption(a).value} configures {a.nic} again"


@dataclass(frozen=True)
class Release:
    """The manager lets go of the bridge before the netlink inverses take it away. Not a step
    of the plan: the rollback puts one before the files of every manager it readopts, since a
    manager that holds its profiles in memory (NetworkManager) would make the bridge again."""

    adoption: handover.Adoption

    def __str__(self) -> str:
        a = self.adoption
        return f"{handover.manager_of_adoption(a).value} lets go of {a.bridge}"


# Not sent over netlink: files and the daemons that read them.
NOT_NETLINK = (
    RewriteFirewall,
    RestoreFirewall,
    WriteConfig,
    RestoreConfig,
    Adopt,
    Readopt,
    Release,
)

Op = (
    CreateBridge
    | DeleteBridge
    | SetMaster
    | AddAddress
    | DelAddress
    | AddNeighbour
    | DelNeighbour
    | ReplaceRoute
    | AddRoute
    | DelRoute
    | AddRule
    | DelRule
    | SetSysctl
    | RewriteFirewall
    | RestoreFirewall
    | WriteConfig
    | RestoreConfig
    | Adopt
    | Readopt
    | Release
)


@dataclass(frozen=True)
class Step:
    do: Op
    undo: Op


Direction = Literal["takeover", "giveback"]


@dataclass(frozen=True)
class Plan:
    nic: str
    bridge: str
    prepare: Step  # creating the empty bridge, sent on its own: later messages name it
    make: tuple[Step, ...]  # harmless additions, sent as one netlink batch
    batch: tuple[Step, ...]  # every disruptive operation, sent as one netlink batch
    tune: tuple[Step, ...] = ()  # the NIC's settings copied to the bridge, right after prepare
    # "giveback": `undo`, from the bridge back onto the NIC, releasing the `detached` ports.
    direction: Direction = "takeover"
    detached: tuple[str, ...] = ()
    # What the NIC's managers had (read before the snapshot), and, after the netlink sends, their
    # files rewritten, then the managers adopting the bridge.
    views: tuple[handover.View, ...] = ()
    handover: tuple[Step, ...] = ()
    # Once committed: the drop-ins that restore the managers' files after a restart, removed.
    settle: tuple[FileChange, ...] = ()

    @property
    def source(self) -> str:
        """The device the host's identity leaves."""
        return self.nic if self.direction == "takeover" else self.bridge

    @property
    def target(self) -> str:
        """The device that takes it."""
        return self.bridge if self.direction == "takeover" else self.nic

    @property
    def steps(self) -> tuple[Step, ...]:
        return (self.prepare, *self.tune, *self.make, *self.batch, *self.handover)


def plan_takeover(state: HostState, bridge: str, views: tuple[handover.View, ...] = ()) -> Plan:
    nic = state.nic.name
    make = (
        *_add_rules(state, bridge),
        Step(SetMaster(nic, bridge), SetMaster(nic, None)),
        *_add_addresses(state, bridge),
        *_carry_neighbours(state, bridge),
        # Last: its transaction takes ~15 ms, which must not sit between the NIC becoming a
        # port and the bridge holding the addresses.
        *_rewrite_firewall(state, bridge),
    )
    batch = (
        *_move_routes(state, bridge),
        *_drop_addresses(state),
        *_drop_kept_prefix_routes(state),
        *_drop_neighbours(state),
        *_drop_rules(state),
    )
    prepare = Step(
        CreateBridge(bridge, state.nic.mac, state.nic.mtu),
        DeleteBridge(bridge),
    )
    tune = _copy_sysctls(state, bridge)
    return Plan(
        nic=nic,
        bridge=bridge,
        prepare=prepare,
        tune=tune,
        make=make,
        batch=batch,
        views=views,
        handover=_hand_over(state, bridge, views),
        settle=tuple(f.inverse() for f in _recover_drop_ins(views)),
    )


def _recover_drop_ins(views: tuple[handover.View, ...]) -> tuple[FileChange, ...]:
    return handover.recover_drop_ins({handover.manager_of(v) for v in views})


def _hand_over(state: HostState, bridge: str, views: tuple[handover.View, ...]) -> tuple[Step, ...]:
    """Every manager's files first, then every manager adopts: one manager's adoption may rest
    on another's files (cloud-init told to keep away from what netplan renders)."""
    planned = [handover.plan(v, state, bridge) for v in views]
    refused = [p for p in planned if isinstance(p, str)]
    if refused:
        raise ValueError("; ".join(refused))  # transaction.read_plan refuses these before
    made = [p for p in planned if not isinstance(p, str)]
    files = (*_recover_drop_ins(views), *(f for h in made for f in h.files))
    writes = [Step(WriteConfig(files), RestoreConfig(files))] if files else []
    adopts = [Step(Adopt(h.adoption), Readopt(h.adoption)) for h in made]
    return (*writes, *adopts)


@dataclass(frozen=True)
class Carried:
    """The steps that carry what is configured on `state.nic` to another device, each beside its
    inverse, for a planner to place: additions on the other device, then what leaves the first."""

    rules: tuple[Step, ...]  # rules naming the other device, beside those naming the first
    addresses: tuple[Step, ...]  # the first device's addresses added to the other
    neighbours: tuple[Step, ...]  # its neighbour and proxy entries copied to the other
    firewall: tuple[Step, ...]  # its nftables rules renamed, one transaction (or none)
    routes: tuple[Step, ...]  # its routes replaced onto the other, on-link ones first
    dropped: tuple[Step, ...]  # then its addresses, neighbour entries and rules deleted


def carry(state: HostState, dev: str) -> Carried:
    """What `plan_takeover` carries from the NIC to the bridge, from `state.nic` to `dev`: the
    giveback reads the host with the two roles swapped and carries the bridge back."""
    return Carried(
        rules=tuple(_add_rules(state, dev)),
        addresses=tuple(_add_addresses(state, dev)),
        neighbours=tuple(_carry_neighbours(state, dev)),
        firewall=tuple(_rewrite_firewall(state, dev)),
        routes=tuple(_move_routes(state, dev)),
        dropped=(*_drop_addresses(state), *_drop_neighbours(state), *_drop_rules(state)),
    )


def moved_addresses(state: HostState) -> tuple[Address, ...]:
    """All IPv4 addresses and the IPv6 ones that are not link-local (br0 makes its own)."""
    return tuple(
        a for a in state.addresses_on(state.nic.name) if a.family == AF_INET or a.is_global
    )


def is_kernel_route(r: Route, addresses: tuple[Address, ...]) -> bool:
    """Made (and removed) by the kernel with an address or a device: local-table routes, the
    IPv6 link-local prefix, and the prefix route of an address. A manager's route to the
    prefix of a `noprefixroute` address, or with another metric, is not."""
    if r.protocol != RTPROT_KERNEL:
        return False
    if r.table == RT_TABLE_LOCAL:
        return True
    if r.table != RT_TABLE_MAIN or r.next_hop is not None:
        return False
    if r.family == AF_INET6 and (r.dst, r.dst_len, r.priority) == ("fe80::", 64, 256):
        return True
    return any(_is_prefix_route_of(r, a) for a in addresses)


def _is_prefix_route_of(r: Route, a: Address) -> bool:
    if a.family != r.family or not a.makes_prefix_route:
        return False
    net = prefix_of(a)
    metric = a.rt_priority or KERNEL_METRIC[a.family]
    return (r.dst, r.dst_len, r.priority) == (str(net.network_address), net.prefixlen, metric)


def prefix_of(a: Address) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_interface(f"{a.address}/{a.prefixlen}").network


def moved_routes(state: HostState) -> tuple[Route, ...]:
    """Every route through the NIC that the kernel did not make, on-link ones first: a route
    through a gateway needs the route to the gateway's prefix on the same device."""
    addresses = state.addresses_on(state.nic.name)
    routes = [r for r in state.routes_on(state.nic.name) if not is_kernel_route(r, addresses)]
    return tuple(sorted(routes, key=lambda r: r.next_hop is not None))


def kept_prefix_routes(state: HostState) -> tuple[Route, ...]:
    """Prefix routes the kernel may leave on the NIC when its IPv6 addresses go (it keeps them
    for expiring addresses): the host would go on sending on-link traffic out of the port.
    Deleted explicitly; "no such route" counts as done."""
    moved = [a for a in moved_addresses(state) if a.family == AF_INET6 and a.finite]
    return tuple(
        r
        for r in state.routes_on(state.nic.name)
        if r.protocol == RTPROT_KERNEL and any(_is_prefix_route_of(r, a) for a in moved)
    )


def carried_neighbours(state: HostState) -> tuple[Neighbour, ...]:
    return tuple(
        n for n in state.neighbours_on(state.nic.name) if n.is_proxy or n.state & NUD_VALID
    )


def carried_counts(state: HostState) -> dict[str, int]:
    """How many objects of each kind the takeover carries to the bridge."""
    return {
        "addresses": len(moved_addresses(state)),
        "routes": len(moved_routes(state)),
        "kernel prefix routes removed": len(kept_prefix_routes(state)),
        "neighbours": sum(1 for n in carried_neighbours(state) if not n.is_proxy),
        "proxy entries": sum(1 for n in carried_neighbours(state) if n.is_proxy),
        "policy rules": len(carried_rules(state)),
        "settings": len(copied_sysctls(state)),
        "nftables rules": len(firewall_rules(state)),
    }


def carried_rules(state: HostState) -> tuple[Rule, ...]:
    return tuple(r for r in state.rules if r.names(state.nic.name))


def copied_sysctls(state: HostState) -> tuple[tuple[Sysctl, Sysctl], ...]:
    """(the NIC's value, a new device's value) of each setting in which they differ."""
    defaults = {(s.family, s.key): s for s in state.sysctls_on("default")}
    pairs = []
    for s in state.sysctls_on(state.nic.name):
        default = defaults.get((s.family, s.key))
        if default is not None and default.value != s.value:
            pairs.append((s, default))
    return tuple(pairs)


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
        copy = replace(n, dev=bridge, state=_kept_state(n))
        steps.append(Step(AddNeighbour(copy), DelNeighbour(copy)))
    return steps


def _kept_state(n: Neighbour) -> int:
    """Learned entries are written as STALE: the kernel confirms them on first use."""
    return n.state if n.is_static or n.is_proxy else NUD_STALE


def _drop_neighbours(state: HostState) -> list[Step]:
    # Explicit, so the inverse restores the NIC's entries. The kernel has flushed the IPv4 ones
    # (proxy entries too) already when the NIC's last IPv4 address went: "no such entry"
    # counts as done.
    steps = []
    for n in carried_neighbours(state):
        restored = replace(n, state=_kept_state(n))
        steps.append(Step(DelNeighbour(n), AddNeighbour(restored)))
    return steps


def _move_routes(state: HostState, bridge: str) -> list[Step]:
    # Replace, not delete-then-add: the default route never disappears.
    steps = []
    for r in moved_routes(state):
        moved = r.on(bridge)
        steps.append(Step(ReplaceRoute(r, moved), ReplaceRoute(moved, r)))
    return steps


def _drop_kept_prefix_routes(state: HostState) -> list[Step]:
    return [Step(DelRoute(r), AddRoute(r)) for r in kept_prefix_routes(state)]


def _add_rules(state: HostState, bridge: str) -> list[Step]:
    # Rules naming the bridge match nothing until the NIC is its port: harmless beforehand.
    steps = []
    for r in carried_rules(state):
        moved = r.on(state.nic.name, bridge)
        steps.append(Step(AddRule(moved), DelRule(moved)))
    return steps


def _drop_rules(state: HostState) -> list[Step]:
    return [Step(DelRule(r), AddRule(r)) for r in carried_rules(state)]


def firewall_rules(state: HostState) -> tuple[NftRule, ...]:
    nic = state.nic.name
    return tuple(r for r in state.firewall if netfilter.names_device(r.statements, nic))


def firewall_change(state: HostState, bridge: str) -> NftChange:
    return netfilter.plan_rewrite(NftRules(firewall_rules(state), ()), state.nic.name, bridge)


def _rewrite_firewall(state: HostState, bridge: str) -> list[Step]:
    change = firewall_change(state, bridge)
    return [Step(RewriteFirewall(change), RestoreFirewall(change))] if change.rewrites else []


def _copy_sysctls(state: HostState, bridge: str) -> tuple[Step, ...]:
    return tuple(
        Step(SetSysctl(nic.on(bridge)), SetSysctl(default.on(bridge)))
        for nic, default in copied_sysctls(state)
    )


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
