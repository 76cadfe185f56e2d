"""The pure giveback planner, on the state model: no root, no kernel. Hosts are migrated with the
takeover's own plan, then given back."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_migrate.giveback import (
    giveback_notes,
    giveback_refusals,
    plan_giveback,
    port_refusals,
)
from bridge_migrate.model import (
    AF_INET,
    AF_INET6,
    IFA_F_NODAD,
    BridgeSide,
    HostState,
    Link,
    Sysctl,
)
from bridge_migrate.plan import (
    AddAddress,
    CreateBridge,
    DeleteBridge,
    DelRoute,
    ReplaceRoute,
    SetMaster,
    SetSysctl,
    plan_takeover,
)
from bridge_migrate.simulate import simulate
from shapes import NIC, addr, as_restored, host_with, hosts, route

TAP = Link(7, "vnet0", "tun", "fe:54:00:00:00:07", 1500, 0x1043, "UP", "br0")


def migrated(state: HostState) -> HostState:
    return simulate(state, [s.do for s in plan_takeover(state, "br0").steps])


def side_of(state: HostState, *guests: Link) -> BridgeSide:
    return BridgeSide("br0", state.bridge, (state.nic, *guests))


def as_given_back(state: HostState) -> HostState:
    """The giveback adds IPv6 addresses without DAD, as the takeover does: whether the NIC had
    the flag before cannot be read from a bridge."""
    addresses = tuple((d, replace(a, flags=a.flags & ~IFA_F_NODAD)) for d, a in state.addresses)
    return as_restored(replace(state, addresses=addresses))


LAB = host_with(
    [
        addr("198.18.0.10/24"),
        addr("198.18.0.11/24", label="eth0:1"),
        addr("2001:db8:0:1::10/64", lft=600),
        addr("fe80::1/64"),
    ],
    [
        route(None, "198.18.0.1"),
        route("198.19.5.0/24", "198.18.0.2"),
        route(None, "2001:db8:0:1::1", family=AF_INET6),
    ],
    [],
)
MIGRATED = migrated(LAB)


def kinds(steps: tuple[object, ...]) -> list[str]:
    return [type(s.do).__name__ for s in steps]  # type: ignore[attr-defined]


def test_order_make_before_break_bridge_last() -> None:
    plan = plan_giveback(MIGRATED, "br0")
    make = kinds((plan.prepare, *plan.tune, *plan.make))
    assert set(make) == {"DelRoute", "AddAddress"}  # the kept-route guard, then the addresses
    assert plan.batch[0].do == SetMaster("eth0", None)
    assert isinstance(plan.batch[1].do, ReplaceRoute)
    assert plan.batch[-1].do == DeleteBridge("br0")
    assert plan.batch[-1].undo == CreateBridge("br0", NIC.mac, NIC.mtu)
    added = [s.do.address for s in plan.steps if isinstance(s.do, AddAddress)]
    assert [a.label for a in added if a.family == AF_INET] == ["eth0", "eth0:1"]
    assert all(a.flags & IFA_F_NODAD for a in added if a.family == AF_INET6)


def test_expiring_ipv6_prefix_route_is_guarded_on_the_nic() -> None:
    plan = plan_giveback(MIGRATED, "br0")
    (guard,) = [s for s in plan.steps if isinstance(s.do, DelRoute)]
    assert guard.do == guard.undo and guard.do.route.dev == "eth0"
    assert guard.do.route.dst == "2001:db8:0:1::"
    # Without it, a rollback that takes the address off the NIC would leave the route there.
    done = plan.steps[: plan.steps.index(guard) + 2]
    partial = simulate(MIGRATED, [s.do for s in done])
    assert as_restored(simulate(partial, [s.undo for s in reversed(done)])) == as_restored(MIGRATED)


def test_bridge_settings_copied_to_the_nic_and_reset_before_it_goes() -> None:
    hand_made = replace(
        MIGRATED,
        sysctls=(
            Sysctl(AF_INET, "default", "rp_filter", "0"),
            Sysctl(AF_INET, "eth0", "rp_filter", "1"),
            Sysctl(AF_INET, "br0", "rp_filter", "2"),
        ),
    )
    plan = plan_giveback(hand_made, "br0")
    assert plan.prepare.do == SetSysctl(Sysctl(AF_INET, "eth0", "rp_filter", "2"))
    assert plan.prepare.undo == SetSysctl(Sysctl(AF_INET, "eth0", "rp_filter", "1"))
    (reset,) = [s for s in plan.batch if isinstance(s.do, SetSysctl)]
    assert reset.do == SetSysctl(Sysctl(AF_INET, "br0", "rp_filter", "0"))
    assert reset.undo == SetSysctl(Sysctl(AF_INET, "br0", "rp_filter", "2"))
    after = simulate(hand_made, [s.do for s in plan.steps])
    assert after.sysctls_on("eth0") == (Sysctl(AF_INET, "eth0", "rp_filter", "2"),)


def test_guests_named_are_detached_before_the_bridge_goes() -> None:
    plan = plan_giveback(MIGRATED, "br0", ("vnet0",))
    assert plan.batch[-2].do == SetMaster("vnet0", None)
    assert plan.batch[-2].undo == SetMaster("vnet0", "br0")


# Property tests on random hosts ------------------------------------------------------------


@given(hosts())
@settings(max_examples=300, deadline=None)
def test_giveback_of_a_takeover_gives_back_the_host(state: HostState) -> None:
    there = migrated(state)
    back = simulate(there, [s.do for s in plan_giveback(there, "br0").steps])
    assert as_given_back(back) == as_given_back(state)


@given(hosts())
@settings(max_examples=300, deadline=None)
def test_giveback_then_inverse_gives_back_the_bridge(state: HostState) -> None:
    there = migrated(state)
    plan = plan_giveback(there, "br0")
    back = simulate(there, [s.do for s in plan.steps])
    assert as_restored(simulate(back, [s.undo for s in reversed(plan.steps)])) == as_restored(there)


@given(hosts(), st.data())
@settings(max_examples=300, deadline=None)
def test_any_prefix_of_the_giveback_rolls_back_to_the_bridge(
    state: HostState, data: st.DataObject
) -> None:
    there = migrated(state)
    plan = plan_giveback(there, "br0")
    k = data.draw(st.integers(1, len(plan.steps)))
    done = plan.steps[:k]
    partial = simulate(there, [s.do for s in done])
    assert as_restored(simulate(partial, [s.undo for s in reversed(done)])) == as_restored(there)


@given(hosts())
@settings(max_examples=100, deadline=None)
def test_a_migrated_host_is_refused_nothing(state: HostState) -> None:
    there = migrated(state)
    assert giveback_refusals(there, side_of(there), ()) == []
    assert giveback_notes(there) == []


# Refusals -------------------------------------------------------------------------------------


def refused(state: HostState, side: BridgeSide, detach: tuple[str, ...] = ()) -> str:
    found = giveback_refusals(state, side, detach)
    assert len(found) == 1, found
    return found[0]


def test_no_such_bridge() -> None:
    assert port_refusals(BridgeSide("br0", None, ()), ()) == ["no such device br0: nothing to undo"]


def test_not_a_bridge() -> None:
    side = BridgeSide("br0", replace(NIC, name="br0", kind="dummy"), ())
    assert "br0 is a dummy device, not a bridge" in refused(MIGRATED, side)


def test_bridge_without_a_port() -> None:
    assert "br0 has no port" in refused(MIGRATED, BridgeSide("br0", MIGRATED.bridge, ()))


def test_guests_attached_are_named() -> None:
    veth = replace(TAP, name="veth1a2b", kind="veth", mac="02:00:00:00:00:99")
    text = refused(MIGRATED, side_of(MIGRATED, TAP, veth))
    assert text.startswith("guests attached to br0: vnet0, veth1a2b; name them with --detach")
    assert "`bridge-migrate detach`" in text
    assert "veth1a2b" in refused(MIGRATED, side_of(MIGRATED, TAP, veth), ("vnet0",))
    assert giveback_refusals(MIGRATED, side_of(MIGRATED, TAP, veth), ("vnet0", "veth1a2b")) == []


def test_ports_without_the_bridge_mac_are_all_named() -> None:
    bridge = replace(MIGRATED.bridge, mac="02:aa:00:00:00:01")  # type: ignore[arg-type]
    side = BridgeSide("br0", bridge, (MIGRATED.nic, TAP))
    assert "br0 has ports eth0, vnet0: name every one but the NIC" in refused(MIGRATED, side)


def test_detach_must_name_ports() -> None:
    text = refused(MIGRATED, side_of(MIGRATED), ("vnet9",))
    assert text == "--detach vnet9: not a port of br0 (its ports: eth0)"
    assert "no NIC is left" in refused(MIGRATED, side_of(MIGRATED), ("eth0",))


def test_the_port_left_must_be_a_nic() -> None:
    side = BridgeSide("br0", MIGRATED.bridge, (TAP,))
    assert "vnet0, the port of br0 left, is a tun device, not a NIC" in refused(MIGRATED, side)
    for kind in ("", "veth", "bond", "vlan"):
        state = replace(MIGRATED, nic=replace(MIGRATED.nic, kind=kind))
        assert giveback_refusals(state, side_of(state), ()) == []


def test_bridge_without_a_global_address() -> None:
    bare = replace(MIGRATED, addresses=tuple(e for e in MIGRATED.addresses if e[0] != "br0"))
    assert refused(bare, side_of(bare)) == "br0 has no global address to give back to eth0"


def test_nic_with_addresses_of_its_own() -> None:
    own = simulate(MIGRATED, [AddAddress("eth0", addr("198.18.0.99/24"))])
    assert "eth0 has global addresses of its own" in refused(own, side_of(own))


def test_mtu_mismatch() -> None:
    small = replace(MIGRATED, bridge=replace(MIGRATED.bridge, mtu=1400))  # type: ignore[arg-type]
    assert "br0 has MTU 1400 and eth0 1500" in refused(small, side_of(small))


def test_nic_down() -> None:
    down = replace(MIGRATED, nic=replace(MIGRATED.nic, flags=0, operstate="DOWN"))
    assert "eth0 is down" in refused(down, side_of(down))


def test_nic_not_a_port_any_more() -> None:
    left = replace(MIGRATED, nic=replace(MIGRATED.nic, master=None))
    assert refused(left, side_of(left)) == "eth0 is not a port of br0 (any more)"


def test_label_too_long_for_the_nic() -> None:
    nic = "enp0s31f6"
    state = replace(
        MIGRATED,
        nic=replace(MIGRATED.nic, name=nic),
        addresses=tuple(
            (d, replace(a, label="br0:averylong") if a.label == "br0:1" else a)
            for d, a in MIGRATED.addresses
        ),
    )
    text = refused(state, BridgeSide("br0", state.bridge, (state.nic,)))
    assert "'br0:averylong'" in text and "too long" in text


def test_bridge_side_blockers_are_refusals() -> None:
    side = replace(
        side_of(MIGRATED), blockers=("vlan br0.7 is stacked on br0, which undo deletes",)
    )
    assert refused(MIGRATED, side).startswith("vlan br0.7 is stacked on br0")


@pytest.mark.parametrize("mac", ["02:aa:00:00:00:01"])
def test_other_mac_is_a_note_not_a_refusal(mac: str) -> None:
    other = replace(MIGRATED, bridge=replace(MIGRATED.bridge, mac=mac))  # type: ignore[arg-type]
    assert giveback_refusals(other, side_of(other), ()) == []
    (note,) = giveback_notes(other)
    assert f"eth0 keeps its own MAC {NIC.mac}, not br0's {mac}" in note
