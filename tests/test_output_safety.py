"""Strings that reach sd_notify, the journal or the terminal carry no control characters."""

from __future__ import annotations

import pytest

from bridge_migrate.events import printable
from bridge_migrate.probes import ProbeSyntaxError, parse_probe
from bridge_migrate_testlab import Lab
from conftest import Agent
from hostview import assert_unchanged, read_view


def test_control_characters_are_shown_escaped() -> None:
    assert printable("ok\nREADY=1\x1b[2J\x7f\x85") == "ok\\x0aREADY=1\\x1b[2J\\x7f\\x85"
    assert printable("plain text: 198.18.0.1 ✓") == "plain text: 198.18.0.1 ✓"


@pytest.mark.parametrize("probe", ["icmp:fe80::1%eth0\nREADY=1", "tcp:[fe80::1%a b]:22"])
def test_a_scope_id_that_is_not_an_interface_name_is_refused(probe: str) -> None:
    with pytest.raises(ProbeSyntaxError, match="scope id"):
        parse_probe(probe)


@pytest.mark.root
def test_a_device_name_with_an_escape_reaches_the_terminal_escaped(lab: Lab, agent: Agent) -> None:
    # The kernel takes control characters in interface names (only '/', ':' and white space
    # are refused): a refusal that names such a device must not clear the admin's screen.
    lab.ip_batch(lab.host_ns, ["link add up\x1b[2J link eth0 type macvlan"])
    before = read_view(lab.host_ns)
    run = agent("apply")
    assert run.code == 3, run.stdout + run.stderr
    assert "up\\x1b[2J" in run.stderr and "\x1b" not in run.stderr + run.stdout
    assert_unchanged(before, read_view(lab.host_ns))
