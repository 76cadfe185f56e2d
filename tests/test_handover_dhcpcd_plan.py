"""The dhcpcd hand-over planner (pure, no root): what it hands over, how the command line is
carried onto the bridge, and what it refuses with what to do by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge_migrate.handover.clients import (
    DhcpcdAdoption,
    DhcpcdRefusal,
    DhcpcdView,
    dhcpcd_notes,
    dhcpcd_plan,
)
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


def adoption(view: DhcpcdView = VIEW) -> DhcpcdAdoption:
    planned = dhcpcd_plan(view, STATE, "br0")
    assert isinstance(planned, DhcpcdAdoption), planned
    return planned


def refusal(view: DhcpcdView) -> DhcpcdRefusal:
    planned = dhcpcd_plan(view, STATE, "br0")
    assert isinstance(planned, DhcpcdRefusal), planned
    return planned


def test_same_unit_same_identity_same_metric_on_the_bridge() -> None:
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
    a = adoption(replace(VIEW, argv=argv, family="-4"))
    assert a.argv_bridge == ("/usr/sbin/dhcpcd", "-4", "--iaid", "1234", "-m", "50", "br0")
    assert a.family == "-4"


def test_metric_without_routes_is_dhcpcds_default_for_the_nic() -> None:
    bare = replace(STATE, routes=())
    planned = dhcpcd_plan(VIEW, bare, "br0")
    assert isinstance(planned, DhcpcdAdoption)
    assert "1001" in planned.argv_bridge  # 1000 + eth0's ifindex (1 here)


def test_the_plan_says_what_a_reboot_does() -> None:
    notes = "\n".join(dhcpcd_notes(adoption()))
    assert "without a release" in notes and "lab-dhcpcd.service" in notes
    assert "at reboot nothing starts dhcpcd" in notes and "/usr/sbin/dhcpcd -B eth0" in notes


@pytest.mark.parametrize(
    ("change", "reason", "by_hand"),
    [
        (
            dict(title="dhcpcd: [master] [ip4] [ip6]", argv=("/usr/sbin/dhcpcd", "-b")),
            "serves every interface",
            "denyinterfaces eth0",
        ),
        (
            dict(transient=False, unit="dhcpcd.service", unit_file_state="enabled"),
            "again at the next boot",
            "point dhcpcd.service at br0",
        ),
        (
            dict(unit="session-3.scope", argv=(), why_unknown=""),
            "command line of dhcpcd on eth0",
            "--iaid 00:00:00:01",
        ),
        (dict(control=""), "no control socket", "dhcpcd -x -p eth0"),
        (
            dict(conf_blocks=("/etc/dhcpcd.conf:12",)),
            "/etc/dhcpcd.conf:12",
            "`interface br0`",
        ),
    ],
    ids=["master", "boot-service", "unknown-argv", "no-socket", "interface-block"],
)
def test_refused_with_reason_and_what_to_do(
    change: dict[str, object], reason: str, by_hand: str
) -> None:
    r = refusal(replace(VIEW, **change))  # type: ignore[arg-type]
    assert reason in r.reason, r
    assert by_hand in r.alternative, r
