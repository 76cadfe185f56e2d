"""The dhcpcd hand-over planner (pure, no root): what it hands over, how the command line is
carried onto the bridge, what it refuses with what to do first, and that a view read back from a
record is checked before anything is built from it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bridge_migrate import handover, serde
from bridge_migrate.handover.clients import DhcpcdAdoption, DhcpcdView
from bridge_migrate.owner import Manager
from bridge_migrate.plan import Adopt, Readopt, WriteConfig, plan_takeover
from bridge_migrate.record import Recipe
from shapes import addr, host_with, route

DHCP, RA = 16, 9
STATE = host_with(
    [addr("198.18.0.122/24", lft=100)],
    [
        route("198.18.0.0/24", None, priority=1002, protocol=DHCP),
        route(None, "198.18.0.1", priority=1002, protocol=DHCP),
    ],
    [],
)
VIEW = DhcpcdView(
    nic="eth0",
    pid=73,
    title="dhcpcd: eth0 [ip4] [ip6]",
    family="",
    unit="lab-dhcpcd.service",
    transient=True,
    unit_file_state="transient",
    argv=("/usr/sbin/dhcpcd", "-B", "eth0"),
    control="/run/dhcpcd/eth0.sock",
    leases=(".lease", ".lease6"),
    conf_blocks=(),
)


def handed(view: DhcpcdView = VIEW, state: object = STATE) -> handover.Handover:
    planned = handover.plan(view, state, "br0")  # type: ignore[arg-type]
    assert isinstance(planned, handover.Handover), planned
    return planned


def adoption(view: DhcpcdView = VIEW) -> DhcpcdAdoption:
    a = handed(view).adoption
    assert isinstance(a, DhcpcdAdoption)
    return a


def refusal(view: DhcpcdView) -> str:
    planned = handover.plan(view, STATE, "br0")
    assert isinstance(planned, str), planned
    return planned


def test_same_unit_same_identity_same_metric_on_the_bridge() -> None:
    h = handed()
    assert h.manager is Manager.DHCPCD and h.files == ()  # no file of dhcpcd's changes
    a = adoption()
    assert a.unit == "lab-dhcpcd.service" and a.argv_nic == VIEW.argv
    # The NIC's MAC is 02:00:00:00:00:01: its last 4 bytes are dhcpcd's IAID on the NIC, and
    # the metric of its routes (1000 + ifindex there) is kept on the bridge.
    assert a.argv_bridge == (
        "/usr/sbin/dhcpcd",
        *("--iaid", "00:00:00:01", "--metric", "1002"),
        *("-B", "br0"),
    )
    assert a.leases == (".lease", ".lease6")


def test_what_the_command_line_sets_is_kept() -> None:
    argv = ("/usr/sbin/dhcpcd", "-4", "--iaid", "1234", "-m", "50", "eth0")
    a = adoption(
        replace(VIEW, argv=argv, family="-4", leases=(".lease",), control="/run/dhcpcd/eth0-4.sock")
    )
    assert a.argv_bridge == ("/usr/sbin/dhcpcd", "-4", "--iaid", "1234", "-m", "50", "br0")
    assert a.family == "-4"


def test_metric_without_routes_is_dhcpcds_default_for_the_nic() -> None:
    a = handed(VIEW, replace(STATE, routes=())).adoption
    assert isinstance(a, DhcpcdAdoption)
    assert "1001" in a.argv_bridge  # 1000 + eth0's ifindex (1 here)


def test_the_plan_says_what_a_reboot_does() -> None:
    notes = "\n".join(handed().notes)
    assert "without a release" in notes and "lab-dhcpcd.service" in notes
    assert "at reboot nothing starts dhcpcd" in notes and "/usr/sbin/dhcpcd -B eth0" in notes


def test_the_transaction_stops_and_starts_it_after_the_batch_and_undoes_it() -> None:
    plan = plan_takeover(STATE, "br0", (VIEW,))
    assert [type(s.do) for s in plan.handover] == [Adopt]  # no WriteConfig: no files
    assert not any(isinstance(s.do, WriteConfig) for s in plan.handover)
    (step,) = plan.handover
    assert isinstance(step.undo, Readopt) and step.undo.adoption == adoption()
    assert str(step.do) == "dhcpcd adopts br0 with eth0 as its port"


def test_a_recorded_plan_is_replanned_to_the_same() -> None:
    plan = plan_takeover(STATE, "br0", (VIEW,))
    recorded = serde.load(Recipe, json.loads(json.dumps(serde.to_data(Recipe.of(plan)))))
    assert recorded.plan(STATE) == plan


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(argv=("/tmp/x/dhcpcd-evil", "eth0")), "is not a command line of dhcpcd"),
        (dict(argv=("dhcpcd", "eth0")), "is not a command line of dhcpcd"),
        (dict(argv=("/usr/sbin/dhcpcd", "-c", "/x\n", "eth0")), "not a command line"),
        (dict(control="/etc/shadow"), "is not dhcpcd's control socket"),
        (dict(leases=("/../../etc/passwd",)), "are not dhcpcd's"),
        (dict(family="-4 -x"), "not a dhcpcd address family"),
        (dict(unit="../x.service"), "not a systemd service name"),
        (dict(nic="eth1"), "of eth1, not eth0"),
    ],
    ids=["program", "relative", "newline", "socket", "lease", "family", "unit", "nic"],
)
def test_a_crafted_view_is_refused(change: dict[str, object], reason: str) -> None:
    tampered = replace(VIEW, **change)  # type: ignore[arg-type]
    assert reason in refusal(tampered)
    plan = plan_takeover(STATE, "br0", (VIEW,))
    with pytest.raises(ValueError, match=reason):
        Recipe.of(replace(plan, views=(tampered,))).plan(STATE)


@pytest.mark.parametrize(
    ("change", "reason", "first"),
    [
        (
            dict(
                title="dhcpcd: [manager] [ip4] [ip6]",
                argv=("/usr/sbin/dhcpcd", "-b"),
                control="/run/dhcpcd/sock",
                leases=(),
            ),
            "serves every interface",
            "denyinterfaces eth0",
        ),
        (
            dict(transient=False, unit="dhcpcd.service", unit_file_state="enabled"),
            "starts dhcpcd on eth0 again (at the next boot",
            "point dhcpcd.service at br0",
        ),
        (
            dict(unit="session-3.scope", argv=(), why_unknown=""),
            "command line of dhcpcd on eth0",
            "--iaid 00:00:00:01",
        ),
        (dict(control=""), "no control socket", "copy /var/lib/dhcpcd/eth0.lease to br0.lease"),
        (
            dict(conf_blocks=("/etc/dhcpcd.conf:12",)),
            "/etc/dhcpcd.conf:12",
            "`interface br0`",
        ),
        (dict(with_systemd=False), "another network namespace", "persistent"),
        (dict(argv=("/usr/sbin/dhcpcd", "-B", "eth1")), "does not name eth0", ""),
        (dict(pid=0, title="", unit="", argv=()), "no dhcpcd pid file", "--iaid"),
    ],
    ids=[
        "master",
        "boot-service",
        "unknown-argv",
        "no-socket",
        "interface-block",
        "netns",
        "other-nic",
        "none",
    ],
)
def test_refused_with_reason_and_what_to_do(
    change: dict[str, object], reason: str, first: str
) -> None:
    r = refusal(replace(VIEW, **change))  # type: ignore[arg-type]
    assert reason in r and first in r, r
