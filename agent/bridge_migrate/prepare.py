"""Before anything changes: the host read and the plan made (the way over, or the way back),
refused with every reason at once, or returned with the state the plan must leave and the probes
that must then answer. `bridge-migrate plan` stops here; `apply` and `undo` go on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import handover
from .contract import StageName
from .errors import Refused
from .giveback import giveback_notes, giveback_refusals, plan_giveback, port_refusals
from .handover.files import FileError
from .model import HostState, Link
from .owner import Owner, ask_owners, handover_refused, ownership
from .owner import describe as describe_ownership
from .owner import refusals as unmanageable
from .plan import Plan, carried_counts, is_migrated, plan_takeover
from .preflight import choose_nic, refusals
from .probes import Probe, gateway_probes
from .progress import Progress
from .simulate import simulate
from .snapshot import dump_links_and_routes, read_bridge_side, read_host


@dataclass(frozen=True)
class ApplyRequest:
    nic: str | None
    bridge: str
    timeout: float
    probes: tuple[Probe, ...]
    confirm_within: float | None  # keep the change pending this long, until `confirm`
    detach: tuple[str, ...] = ()  # undo: the bridge's other ports, released before it goes


@dataclass(frozen=True)
class Prepared:
    """Everything decided before the first change."""

    snapshot: HostState
    plan: Plan
    desired: HostState
    probes: tuple[Probe, ...]


def read_plan(req: ApplyRequest, progress: Progress) -> Prepared | None:
    """Snapshot and plan; None when the host is already migrated. Raises Refused."""
    dumps = dump_links_and_routes()
    nic = choose_nic(dumps, req.nic, req.bridge)
    progress.bind(nic=nic, bridge=req.bridge)
    asked = ask_owners(nic)
    state = read_host(nic, req.bridge, dumps)
    reading = _read_managers(asked.owners, state.nic, req.bridge)
    progress.attach("snapshot", state)
    progress.stage(
        StageName.SNAPSHOT, subject=state.nic.name, counts=tuple(carried_counts(state).items())
    )
    if is_migrated(state, req.bridge):
        return None
    owned = ownership(asked, state)
    progress.attach("owner", owned)
    for line in describe_ownership(owned):
        progress.note(line)
    problems = [
        *refusals(state, req.bridge),
        *unmanageable(owned, req.bridge, reading.unsupported),
        *(
            handover_refused(owned, handover.manager_of(v), why, req.bridge)
            for v in reading.views
            if isinstance(why := handover.plan(v, state, req.bridge), str)
        ),
    ]
    progress.attach("carried", carried_counts(state))
    if problems:
        progress.attach("blockers", problems)
        raise Refused("; ".join(problems))
    plan = plan_takeover(state, req.bridge, reading.views)
    notes = _handover_notes(reading.views, state, req.bridge)
    progress.attach("handover_notes", notes)
    for line in notes:
        progress.note(f"handover {line}")
    probes = (*gateway_probes(state, nic, req.bridge), *req.probes)
    if not probes:
        raise Refused(f"nothing to verify: {nic} has no default route via a gateway", "add --probe")
    progress.attach("plan", plan)
    desired = simulate(state, [s.do for s in plan.steps])
    counts = (("settings", len(plan.tune)), ("additions", len(plan.make)))
    progress.stage(StageName.PLAN, counts=(*counts, ("in one batch", len(plan.batch))))
    return Prepared(state, plan, desired, probes)


def _handover_notes(views: tuple[handover.View, ...], state: HostState, bridge: str) -> list[str]:
    """What the hand-overs do that is worth knowing before (what a reboot brings, say)."""
    planned = [handover.plan(v, state, bridge) for v in views]
    return [n for h in planned if not isinstance(h, str) for n in h.notes]


def _read_managers(owners: tuple[Owner, ...], nic: Link, bridge: str) -> handover.Reading:
    try:
        return handover.read(owners, nic.name, bridge, nic.index)
    except FileError as e:
        raise Refused(str(e)) from None


def read_giveback(
    req: ApplyRequest, progress: Progress, guests: Mapping[str, str] | None = None
) -> Prepared | None:
    """Snapshot and plan the way back; None when there is no bridge to leave. Raises Refused.
    `guests`: the bridge's ports `attach` made, named in the refusal."""
    side = read_bridge_side(req.bridge, req.detach)
    if side.device is None:
        return None
    problems = port_refusals(side, req.detach, guests)
    nic = side.kept_port(req.detach)
    if problems or nic is None:
        raise Refused("; ".join(problems))
    progress.bind(nic=nic.name, bridge=req.bridge)
    state = read_host(nic.name, req.bridge)
    progress.attach("snapshot", state)
    progress.stage(
        StageName.SNAPSHOT, subject=req.bridge, counts=tuple(carried_counts(state).items())
    )
    problems = giveback_refusals(state, side, req.detach)
    if problems:
        raise Refused("; ".join(problems))
    for note in giveback_notes(state):
        progress.note(note)
    plan = plan_giveback(state, req.bridge, req.detach)
    probes = (*gateway_probes(state, req.bridge, nic.name), *req.probes)
    if not probes:
        raise Refused(f"nothing to verify: {req.bridge} has no default route via a gateway")
    progress.attach("plan", plan)
    desired = simulate(state, [s.do for s in plan.steps])
    counts = (("operations", len(plan.steps)), ("in one batch", len(plan.batch)))
    progress.stage(StageName.PLAN, counts=counts)
    return Prepared(state, plan, desired, probes)
