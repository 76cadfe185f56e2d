"""The way back, as data: a host on a bridge whose one port is the NIC, moved back onto the bare
NIC, planned from the live host alone (no record). Pure: no I/O here.

`state` is the host read with the NIC as the bridge's port (`snapshot.read_host(nic,
bridge)`). The planner swaps the two roles and carries what is on the bridge with `plan.carry`,
so every kind of object moves back by the takeover's own rules, beside the same inverses.

Make-before-break, in the takeover's four sends. A port's own IP stack receives nothing (frames
arriving on a port go to the bridge), so until the NIC leaves the bridge nothing put on it is
seen by the host's traffic:
- tune: the bridge's per-device settings that differ from the NIC's, copied to the NIC (inverse:
  the NIC's own values).
- make, harmless: policy rules naming the NIC beside those naming the bridge; the kernel prefix
  routes of expiring IPv6 addresses made sure absent from the NIC (see `_clear_kept_routes`); the
  bridge's addresses on the NIC too (IPv6 without DAD, as the takeover adds them: a port cannot
  hear a duplicate, and DAD would leave the address unusable for a second after the NIC leaves);
  the bridge's neighbour entries copied, so nothing has to be resolved on the NIC (a port's
  answers go to the bridge).
- prepare: nothing has to exist before the rest (the NIC does), so the first of those steps is
  the one sent alone.
- batch, the disruptive part, one send: first the nftables rules naming the bridge are renamed to
  the NIC (the ~15 ms transaction ends just before the NIC leaves, so they name the device the
  traffic arrives on for all but a moment); the NIC leaves the bridge, which is when the host's
  traffic moves; the routes are replaced onto the NIC (a default route always exists); the bridge
  loses its addresses, neighbour entries and rules, its per-device settings go back to a new
  device's and the guests named to be detached leave it, each explicitly so that a rollback puts
  it back; the bridge is deleted last. Its inverse, CreateBridge, makes an empty bridge with the
  same MAC and MTU (STP off, forward delay 0), and the inverses before it refill it.

The NIC keeps its own MAC. On a bridge the agent made it is the bridge's already; a bridge made
otherwise may have another (udev gives new bridges a MAC of their own): LAN neighbours that cached
the bridge's MAC reach the host again once they re-resolve it (`giveback_notes` says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .model import BridgeSide, HostState, Link
from .plan import (
    CreateBridge,
    DeleteBridge,
    DelRoute,
    Plan,
    SetMaster,
    SetSysctl,
    Step,
    bridge_label,
    carry,
    copied_sysctls,
    kept_prefix_routes,
    moved_addresses,
)
from .preflight import IFNAMSIZ

# Devices a host's identity lives on, the kinds the takeover takes (veth: labs and containers).
NIC_KINDS = ("", "veth", "bond", "team", "vlan")


def plan_giveback(state: HostState, bridge: str, detach: tuple[str, ...] = ()) -> Plan:
    """The NIC (`state.nic`, the bridge's port) takes the host back; `detach` are the bridge's
    other ports, released just before it goes. Refuse with `giveback_refusals` first."""
    br = _bridge(state, bridge)
    nic = state.nic.name
    swapped = replace(state, nic=br, bridge=state.nic)  # the bridge is what things leave now
    carried = carry(swapped, nic)
    tune = _copy_sysctls(state, br)
    make = (
        *carried.rules,
        *_clear_kept_routes(swapped, nic),
        *carried.addresses,
        *carried.neighbours,
    )
    batch = (
        *carried.firewall,
        Step(SetMaster(nic, None), SetMaster(nic, bridge)),
        *carried.routes,
        *carried.dropped,
        *_reset_sysctls(swapped),
        *(Step(SetMaster(port, None), SetMaster(port, bridge)) for port in detach),
        Step(DeleteBridge(bridge), CreateBridge(bridge, br.mac, br.mtu)),
    )
    # Nothing has to exist before the rest (the NIC does): the first change goes alone.
    prepare, *rest = (*tune, *make)
    tuned = max(len(tune) - 1, 0)
    return Plan(
        nic=nic,
        bridge=bridge,
        prepare=prepare,
        tune=tuple(rest[:tuned]),
        make=tuple(rest[tuned:]),
        batch=batch,
        direction="giveback",
        detached=detach,
    )


def _bridge(state: HostState, bridge: str) -> Link:
    if state.bridge is None or state.bridge.name != bridge:
        raise ValueError(f"no bridge {bridge} in this state")
    return state.bridge


def _copy_sysctls(state: HostState, br: Link) -> tuple[Step, ...]:
    """The bridge's settings that differ from the NIC's, set on the NIC; back to its own."""
    nic = {(s.family, s.key): s for s in state.sysctls_on(state.nic.name)}
    steps = []
    for s in state.sysctls_on(br.name):
        own = nic.get((s.family, s.key))
        if own is not None and own.value != s.value:
            steps.append(Step(SetSysctl(s.on(own.dev)), SetSysctl(own)))
    return tuple(steps)


def _clear_kept_routes(swapped: HostState, nic: str) -> tuple[Step, ...]:
    """For each expiring IPv6 address's prefix, no kernel route to it on the NIC, before and
    after: deleting such an address leaves its prefix route behind (the kernel keeps it for
    expiring addresses), so a rollback that takes the address off the NIC again deletes the
    route too. One the NIC holds already (left by hand) is left as it is."""
    have = {(r.family, r.table, r.dst, r.dst_len, r.priority) for r in swapped.routes_on(nic)}
    steps = []
    for r in kept_prefix_routes(swapped):
        if (r.family, r.table, r.dst, r.dst_len, r.priority) not in have:
            gone = DelRoute(r.on(nic))
            steps.append(Step(gone, gone))
    return tuple(steps)


def _reset_sysctls(swapped: HostState) -> tuple[Step, ...]:
    """The bridge's settings that differ from a new device's, set to those just before it goes:
    the inverse, after CreateBridge, sets them again."""
    return tuple(
        Step(SetSysctl(default.on(own.dev)), SetSysctl(own))
        for own, default in copied_sysctls(swapped)
    )


def port_refusals(
    side: BridgeSide, detach: tuple[str, ...], guests: Mapping[str, str] | None = None
) -> list[str]:
    """Why there is no one NIC to give the host back to (empty: `side.kept_port(detach)`).
    `guests`: the ports `bridge-migrate attach` made (port -> guest), from its record."""
    name, device = side.name, side.device
    if device is None:
        return [f"no such device {name}: nothing to undo"]
    if device.kind != "bridge":
        return [f"{name} is a {device.kind or 'plain'} device, not a bridge"]
    ports = [p.name for p in side.ports]
    attached = [f"{guests[p]} (port {p})" for p in ports if guests and p in guests]
    if attached:
        # Even if named with --detach: released, the guest would keep a dead interface and
        # the record a stale entry.
        return [
            f"guests attached to {name} by `bridge-migrate attach`: {', '.join(attached)}; "
            "remove them first with `bridge-migrate detach GUEST --ifname IFNAME`"
        ]
    strangers = [d for d in detach if d not in ports]
    if strangers:
        listed = ", ".join(ports) or "none"
        return [f"--detach {', '.join(strangers)}: not a port of {name} (its ports: {listed})"]
    if not ports:
        return [f"{name} has no port: there is no NIC to give the host back to"]
    kept = [p for p in side.ports if p.name not in detach]
    if not kept:
        return [f"every port of {name} is named with --detach: no NIC is left to take the host"]
    if len(kept) > 1:
        return [_guests(side, device, kept)]
    nic = kept[0]
    if nic.kind not in NIC_KINDS:
        return [
            f"{nic.name}, the port of {name} left, is a {nic.kind} device, not a NIC: "
            f"undo gives the host back to a plain, bond, team, VLAN or veth device"
        ]
    return []


def _guests(side: BridgeSide, device: Link, kept: list[Link]) -> str:
    # The bridge the agent made has the NIC's MAC: that port is the NIC, the others are guests.
    nic = [p for p in kept if p.mac == device.mac]
    if len(nic) == 1:
        guests = [p.name for p in kept if p is not nic[0]]
        return (
            f"guests attached to {side.name}: {', '.join(guests)}; name them with --detach to "
            "remove them first, or detach them with `bridge-migrate detach`"
        )
    return (
        f"{side.name} has ports {', '.join(p.name for p in kept)}: name every one but the NIC "
        "with --detach to remove them first, or detach them with `bridge-migrate detach`"
    )


def giveback_refusals(state: HostState, side: BridgeSide, detach: tuple[str, ...]) -> list[str]:
    """Why this host cannot be given back to its NIC as it is (empty: it can). `state` is read
    with `side.kept_port(detach)` as the NIC."""
    found = port_refusals(side, detach)
    if found:
        return found
    nic, br = state.nic, state.bridge
    if br is None or nic.master != side.name:
        return [f"{nic.name} is not a port of {side.name} (any more)"]
    if not nic.is_up or nic.operstate not in ("UP", "UNKNOWN"):
        found.append(f"{nic.name} is down (operstate {nic.operstate})")
    if not any(a.is_global for a in state.addresses_on(br.name)):
        found.append(f"{br.name} has no global address to give back to {nic.name}")
    own = [str(a) for a in state.addresses_on(nic.name) if a.is_global]
    if own:
        found.append(
            f"{nic.name} has global addresses of its own while a port of {br.name} "
            f"({', '.join(own)}): remove them first (`ip addr del ADDRESS dev {nic.name}`)"
        )
    if br.mtu != nic.mtu:
        found.append(
            f"{br.name} has MTU {br.mtu} and {nic.name} {nic.mtu}: the host's MTU would change; "
            f"set {nic.name}'s first (`ip link set {nic.name} mtu {br.mtu}`)"
        )
    swapped = replace(state, nic=br, bridge=nic)
    for a in moved_addresses(swapped):
        label = bridge_label(a.label, br.name, nic.name)
        if label is not None and len(label) >= IFNAMSIZ:
            found.append(f"label {a.label!r} of {a} would become {label!r}: too long")
    found.extend(side.blockers)
    return found


def giveback_notes(state: HostState) -> list[str]:
    """What the giveback changes that the host's neighbours notice (not a refusal)."""
    br = state.bridge
    if br is None or br.mac == state.nic.mac:
        return []
    return [
        f"{state.nic.name} keeps its own MAC {state.nic.mac}, not {br.name}'s {br.mac}: LAN "
        f"neighbours that cached {br.mac} reach the host again once they re-resolve its "
        "addresses (the gateway does at verification, when the host asks for it)"
    ]
