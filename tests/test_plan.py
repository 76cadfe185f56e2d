"""The pure planner, on its own state model: no root, no kernel."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_migrate.model import (
    AF_INET,
    AF_INET6,
    IFA_F_NODAD,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
    RT_TABLE_LOCAL,
    RTPROT_KERNEL,
    HostState,
    Neighbour,
)
from bridge_migrate.plan import (
    DelAddress,
    ReplaceRoute,
    SetMaster,
    is_migrated,
    plan_takeover,
)
from bridge_migrate.simulate import simulate, simulate_op
from shapes import addr, as_restored, host_with, hosts, route

LAB = host_with(
    [
        addr("198.18.0.10/24"),
        addr("198.18.0.11/24", label="eth0:1"),
        addr("2001:db8:0:1::10/64"),
        addr("fe80::1/64"),
    ],
    [
        route(None, "198.18.0.1"),
        route("198.19.5.0/24", "198.18.0.2"),
        route(None, "2001:db8:0:1::1", family=AF_INET6),
        route("198.18.0.10/32", None, table=RT_TABLE_LOCAL, protocol=RTPROT_KERNEL, type=2),
    ],
    [Neighbour(AF_INET, "198.18.0.1", "02:00:00:00:00:fe", NUD_REACHABLE, 0, "eth0")],
)


def forward(state: HostState, bridge: str = "br0") -> HostState:
    return simulate(state, [s.do for s in plan_takeover(state, bridge).steps])


def test_make_before_break() -> None:
    plan = plan_takeover(LAB, "br0")
    make = [type(s.do).__name__ for s in plan.make]
    assert plan.make[0].do == SetMaster("eth0", "br0")
    assert make[1:] == sorted(make[1:])  # AddAddress before AddNeighbour
    assert set(make) == {"SetMaster", "AddAddress", "AddNeighbour"}
    batch = [type(s.do).__name__ for s in plan.batch]
    # Routes first; then the NIC's addresses, then its neighbour entries.
    assert batch == sorted(batch, key=["ReplaceRoute", "DelAddress", "DelNeighbour"].index)


def test_secondary_deleted_before_primary_and_link_local_stays() -> None:
    deleted = [
        op.address.address
        for s in plan_takeover(LAB, "br0").batch
        if isinstance(op := s.do, DelAddress)
    ]
    assert deleted == ["2001:db8:0:1::10", "198.18.0.11", "198.18.0.10"]


def test_kernel_routes_are_not_moved() -> None:
    moved = [
        op.old for s in plan_takeover(LAB, "br0").batch if isinstance(op := s.do, ReplaceRoute)
    ]
    assert {r.protocol for r in moved} == {3}
    assert len(moved) == 3


def test_bridge_gets_addresses_labels_and_nodad() -> None:
    after = forward(LAB)
    on_bridge = after.addresses_on("br0")
    assert [a.address for a in on_bridge] == ["198.18.0.10", "198.18.0.11", "2001:db8:0:1::10"]
    assert [a.label for a in on_bridge if a.family == AF_INET] == ["br0", "br0:1"]
    assert on_bridge[2].flags & IFA_F_NODAD
    assert [a.address for a in after.addresses_on("eth0")] == ["fe80::1"]
    assert is_migrated(after, "br0") and not is_migrated(LAB, "br0")


def test_neighbours_are_carried_as_stale_and_static_ones_kept() -> None:
    static = Neighbour(AF_INET, "198.18.0.5", "02:00:00:00:00:05", NUD_PERMANENT, 0, "eth0")
    after = forward(replace(LAB, neighbours=(*LAB.neighbours, static)))
    states = {n.dst: n.state for n in after.neighbours_on("br0")}
    assert states == {"198.18.0.1": NUD_STALE, "198.18.0.5": NUD_PERMANENT}
    assert after.neighbours_on("eth0") == ()


def test_every_step_has_its_inverse_beside_it() -> None:
    plan = plan_takeover(LAB, "br0")
    for i, step in enumerate(plan.steps):
        before = simulate(LAB, [s.do for s in plan.steps[:i]])
        after = as_restored(simulate(before, [step.do, step.undo]))
        # One step alone may reorder addresses; the whole reversed sequence must not (below).
        assert replace(after, addresses=()) == replace(as_restored(before), addresses=())
        assert set(after.addresses) == set(before.addresses)


# Property tests on random hosts -----------------------------------------------------------


@given(hosts())
@settings(max_examples=300, deadline=None)
def test_plan_then_inverse_gives_back_the_snapshot(state: HostState) -> None:
    plan = plan_takeover(state, "br0")
    after = simulate(state, [s.do for s in plan.steps])
    assert as_restored(simulate(after, [s.undo for s in reversed(plan.steps)])) == as_restored(
        state
    )


@given(hosts(), st.data())
@settings(max_examples=300, deadline=None)
def test_route_runs_simulate_as_one_operation_at_a_time(
    state: HostState, data: st.DataObject
) -> None:
    """`simulate` takes consecutive route operations together (linear time); it must give the
    same state as one operation at a time, forwards and back, on any prefix."""
    plan = plan_takeover(state, "br0")
    done = plan.steps[: data.draw(st.integers(0, len(plan.steps)))]
    ops = [s.do for s in done]
    ops += [s.undo for s in reversed(done)][: data.draw(st.integers(0, len(done)))]
    one_by_one = state
    for op in ops:
        one_by_one = simulate_op(one_by_one, op)
    assert simulate(state, ops) == one_by_one


@given(hosts(), st.data())
@settings(max_examples=300, deadline=None)
def test_any_prefix_of_the_batch_rolls_back_to_the_snapshot(
    state: HostState, data: st.DataObject
) -> None:
    plan = plan_takeover(state, "br0")
    k = data.draw(st.integers(1, len(plan.steps)))
    done = plan.steps[:k]
    partial = simulate(state, [s.do for s in done])
    assert as_restored(simulate(partial, [s.undo for s in reversed(done)])) == as_restored(state)


@given(hosts())
@settings(max_examples=200, deadline=None)
def test_takeover_moves_everything_configured(state: HostState) -> None:
    after = forward(state)
    assert after.nic.master == "br0"
    assert not any(a.is_global for a in after.addresses_on("eth0"))
    for family in (AF_INET, AF_INET6):
        moved = [
            a.address
            for a in state.addresses_on("eth0")
            if a.family == family and (family == AF_INET or a.is_global)
        ]
        assert [a.address for a in after.addresses_on("br0") if a.family == family] == moved
    configured = [r for r in state.routes if r.protocol != RTPROT_KERNEL and r.table != 255]
    assert {r.on("br0") for r in configured} <= set(after.routes_on("br0"))
    assert not any(r in after.routes for r in configured)


@pytest.mark.parametrize("bridge", ["br0", "vmbr0"])
def test_bridge_name_shapes_labels(bridge: str) -> None:
    labels = [a.label for a in forward(LAB, bridge).addresses_on(bridge) if a.label]
    assert labels == [bridge, f"{bridge}:1"]
