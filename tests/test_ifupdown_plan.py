"""The ifupdown and dhclient hand-over planners, pure: no root, no files, no processes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge_migrate.handover import clients, ifupdown
from bridge_migrate.handover.clients import (
    DhclientProcess,
    DhclientView,
    dhclient_args,
    dhclient_duid,
    dhclient_latest,
    dhclient_leases,
    dhclient_moved_lease,
    dhclient_plan,
    dhclient_renamed,
)
from bridge_migrate.handover.files import ABSENT, FileState
from bridge_migrate.handover.ifupdown import IfupdownView, stanzas
from bridge_migrate.model import AF_INET6, Sysctl
from shapes import addr, host_with

STATE = host_with([addr("198.18.0.10/24")], [], [])
MAC = STATE.nic.mac
MAIN = "/etc/network/interfaces"

DHCP = """auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp

iface eth0 inet6 auto
"""
STATIC = """# The primary network interface
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
\taddress 198.18.0.10/24
\tgateway 198.18.0.1
\tdns-nameservers 198.18.0.1

iface eth0 inet6 static
\taddress 2001:db8:0:1::10/64
\tgateway 2001:db8:0:1::1

# a comment that stays
iface eth1 inet manual
"""


def view(
    files: dict[str, str] | str,
    *,
    ifstate: str | None = "lo=lo\neth0=eth0\n",
    client: bool = True,
    bridge_utils: bool = True,
) -> IfupdownView:
    texts = {MAIN: files} if isinstance(files, str) else files
    return IfupdownView(
        nic="eth0",
        bridge="br0",
        files=tuple((p, FileState(t)) for p, t in texts.items()),
        ifstate=FileState(ifstate),
        nic_state=FileState("eth0\n") if ifstate else ABSENT,
        bridge_state=ABSENT,
        bridge_utils=bridge_utils,
        ifupdown2=False,
        dhcp_client=client,
    )


def planned(v: IfupdownView) -> dict[str, str | None]:
    changes = ifupdown.plan(v, STATE, "br0")
    assert not isinstance(changes, str), changes
    return {c.path: c.after.text for c in changes}


def refused(v: IfupdownView) -> str:
    why = ifupdown.plan(v, STATE, "br0")
    assert isinstance(why, str), why
    return why


def test_dhcp_stanzas_become_the_bridges_and_the_nic_leaves_auto() -> None:
    out = planned(view(DHCP))
    assert out[MAIN] == (
        "auto lo\n"
        "iface lo inet loopback\n"
        "\n"
        "# bridge-migrate: eth0 is br0's port; br0 has eth0's addressing\n"
        "iface eth0 inet manual\n"
        "\n"
        "auto br0\n"
        "iface br0 inet dhcp\n"
        "    bridge_ports eth0\n"
        f"    bridge_hw {MAC}\n"
        "    bridge_stp off\n"
        "    bridge_fd 0\n"
        "\n"
        "iface br0 inet6 auto\n"
    )


def test_ifstate_says_what_a_boot_with_the_new_files_would() -> None:
    a = ifupdown.adoption(view(DHCP), STATE, "br0")
    out = {c.path: c.after.text for c in a.state}
    assert out == {
        "/run/network/ifstate": "lo=lo\nbr0=br0\n",
        "/run/network/ifstate.br0": "br0\n",
        "/run/network/ifstate.eth0": "\n",  # as ifdown leaves it: not configured
    }
    back = {c.inverse().path: c.inverse().after for c in a.state}
    assert back["/run/network/ifstate"] == FileState("lo=lo\neth0=eth0\n")
    assert back["/run/network/ifstate.br0"] == ABSENT
    # not among the files: a restart mid-transaction puts those back, and /run starts empty
    assert not [p for p in planned(view(DHCP)) if p.startswith("/run/")]


def test_static_options_are_carried_in_order_with_their_indentation() -> None:
    text = planned(view(STATIC))[MAIN]
    assert text is not None
    assert "iface br0 inet static\n\tbridge_ports eth0\n" in text
    assert "\tbridge_fd 0\n\taddress 198.18.0.10/24\n\tgateway 198.18.0.1\n" in text
    assert "\tdns-nameservers 198.18.0.1\n" in text
    assert "iface br0 inet6 static\n\taddress 2001:db8:0:1::10/64\n" in text
    assert text.count("bridge_ports") == 1  # the bridge's hook makes it once
    assert text.startswith("# The primary network interface\nauto lo\n")
    assert text.endswith("\n# a comment that stays\niface eth1 inet manual\n")
    assert "auto eth0" not in text and "iface eth0 inet static" not in text


def test_the_inverse_gives_back_every_byte() -> None:
    v = view(STATIC)
    changes = ifupdown.plan(v, STATE, "br0")
    assert not isinstance(changes, str)
    back = {c.inverse().path: c.inverse().after for c in changes}
    assert back == {MAIN: FileState(STATIC)}


@pytest.mark.parametrize(
    ("line", "after"),
    [
        ("auto lo eth0", "auto lo"),
        ("allow-hotplug eth0", None),
        ("allow-auto eth0 eth1", "allow-auto eth1"),
    ],
)
def test_the_nic_leaves_the_lines_that_bring_it_up_alone(line: str, after: str | None) -> None:
    text = planned(view(f"{line}\niface eth0 inet dhcp\n"))[MAIN]
    assert text is not None
    lines = text.splitlines()
    assert line not in lines
    if after:
        assert lines[0] == after
    assert "auto br0" in lines


def test_a_sourced_file_holding_the_stanza_is_rewritten_and_auto_in_the_main_file() -> None:
    part = "/etc/network/interfaces.d/eth0"
    out = planned(
        view(
            {
                MAIN: "source /etc/network/interfaces.d/*\nauto lo eth0\niface lo inet loopback\n",
                part: "iface eth0 inet dhcp\n",
            }
        )
    )
    assert out[MAIN] == "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n"
    assert out[part] is not None and "iface br0 inet dhcp\n" in out[part]


def test_continued_lines_are_read_whole() -> None:
    text = planned(view("auto eth0\niface eth0 inet static\n  address \\\n  198.18.0.10/24\n"))[
        MAIN
    ]
    assert text is not None and "  address 198.18.0.10/24\n" in text


def test_stanzas_end_at_their_last_option() -> None:
    found = stanzas("iface eth0 inet dhcp\n  metric 5\n\n# about lo\nauto lo\n")
    assert [(s.kind, s.start, s.end, s.options) for s in found] == [
        ("iface", 0, 2, (("metric", "5"),)),
        ("auto", 4, 5, ()),
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("iface eth0 inet dhcp\n  up ip route add 198.19.0.0/16 via 198.18.0.2\n", "commands (up)"),
        ("iface eth0 inet dhcp\n  hwaddress ether 02:00:00:00:00:09\n", "not carried: hwaddress"),
        ("iface eth0 inet dhcp\n  bridge_ports eth1\n", "not carried: bridge_ports"),
        ("iface eth0 inet manual\n", "method inet manual"),
        ("iface eth0 inet ppp\n  provider isp\n", "method inet ppp"),
        ("iface eth0 inet static inherits base\n", "is not `iface NAME FAMILY METHOD`"),
        ("mapping eth*\n  script /usr/local/bin/map\niface eth0 inet dhcp\n", "maps eth0"),
        ("iface eth0 inet dhcp\niface br0 inet manual\n", "names br0 already"),
        ("auto br0\niface eth0 inet dhcp\n", "names br0 already"),
        ("allow-ovs eth0\niface eth0 inet dhcp\n", "`allow-ovs`"),
        ("no-auto-down eth0\niface eth0 inet dhcp\n", "`no-auto-down eth0`"),
        ("auto lo\niface lo inet loopback\n", "no `iface eth0` stanza"),
    ],
)
def test_refused_with_the_reason(text: str, why: str) -> None:
    assert why in refused(view(text))


def test_refused_when_the_stanzas_are_in_two_files() -> None:
    files = {
        MAIN: "iface eth0 inet dhcp\n",
        "/etc/network/interfaces.d/v6": "iface eth0 inet6 auto\n",
    }
    assert "spread over" in refused(view(files))


def test_refused_without_bridge_utils_or_a_dhcp_client() -> None:
    assert "apt-get install bridge-utils" in refused(view(DHCP, bridge_utils=False))
    assert "no DHCP client serves it" in refused(view(DHCP, client=False))
    assert not isinstance(ifupdown.plan(view(STATIC, client=False), STATE, "br0"), str)


def test_refused_under_ifupdown2() -> None:
    assert "ifupdown2" in refused(replace(view(DHCP), ifupdown2=True))


def test_the_adoption_keeps_the_nics_settings() -> None:
    mine = (
        Sysctl(AF_INET6, "eth0", "addr_gen_mode", "0"),
        Sysctl(AF_INET6, "eth0", "autoconf", "0"),
    )
    state = replace(STATE, sysctls=(*mine, Sysctl(AF_INET6, "default", "autoconf", "1")))
    a = ifupdown.adoption(view(DHCP), state, "br0")
    assert (a.nic, a.bridge, a.sysctls) == ("eth0", "br0", mine)


# -- dhclient ---------------------------------------------------------------------------------

IFUP = [
    *("dhclient", "-4", "-v", "-i", "-pf", "/run/dhclient.eth0.pid"),
    *("-lf", "/var/lib/dhcp/dhclient.eth0.leases", "-I"),
    *("-df", "/var/lib/dhcp/dhclient6.eth0.leases", "eth0"),
]
DUID = r'default-duid "\000\001\000\0012\241a\323\002W\025\322\377H";'
LEASES = (
    DUID
    + """
lease {
  interface "eth0";
  fixed-address 198.18.0.109;
  option subnet-mask 255.255.255.0;
  option routers 198.18.0.1;
  option host-name "lab {x}";
  renew 2 2026/12/01 10:46:38;
  expire 2 2026/12/01 10:47:42;
}
lease {
  interface "eth0";
  fixed-address 198.18.0.109;
  option subnet-mask 255.255.255.0;
  renew 2 2026/12/01 10:47:38;
  expire 2 2026/12/01 10:48:42;
}
lease6 {
  interface "eth0";
  ia-na 15:d2:ff:48 {
    starts 1796122000;
    renew 60;
    iaaddr 2001:db8:0:1::1001 {
      starts 1796122000;
      preferred-life 120;
      max-life 180;
    }
  }
}
"""
)


def test_ifups_command_line_is_read() -> None:
    args = dhclient_args(tuple(IFUP))
    assert not isinstance(args, str)
    assert (args.family, args.interfaces, args.lease_file, args.duid_file, args.one_shot) == (
        4,
        ("eth0",),
        "/var/lib/dhcp/dhclient.eth0.leases",
        "/var/lib/dhcp/dhclient6.eth0.leases",
        False,
    )
    bare = dhclient_args(("dhclient", "-6", "-v", "eth0"))
    assert not isinstance(bare, str) and bare.lease_file == "/var/lib/dhcp/dhclient6.leases"
    release = dhclient_args(("dhclient", "-r", "eth0"))
    assert not isinstance(release, str) and release.one_shot
    assert isinstance(dhclient_args(("dhclient", "eth0", "-lf")), str)


def test_the_bridges_command_line_is_ifups_for_the_bridge() -> None:
    assert dhclient_renamed(tuple(IFUP), "eth0", "br0") == (
        "dhclient",
        *("-4", "-v", "-i", "-pf", "/run/dhclient.br0.pid"),
        *("-lf", "/var/lib/dhcp/dhclient.br0.leases", "-I"),
        *("-df", "/var/lib/dhcp/dhclient6.br0.leases", "br0"),
    )
    assert dhclient_renamed(("dhclient", "-nw", "-e", "X=eth0", "eth0"), "eth0", "br0") == (
        "dhclient",
        "-nw",
        "-e",
        "X=eth0",  # not a file name: left as it is
        "br0",
    )
    veth = dhclient_renamed(
        ("dhclient", "-d", "-lf", "/l/veth0.eth0.leases", "eth0"), "eth0", "br0"
    )
    assert veth == ("dhclient", "-d", "-lf", "/l/veth0.br0.leases", "br0")


def test_the_lease_file_is_read_in_order_with_its_times() -> None:
    leases = dhclient_leases(LEASES)
    assert [(x.family, x.interface) for x in leases] == [(4, "eth0"), (4, "eth0"), (6, "eth0")]
    latest = dhclient_latest(LEASES, "eth0", 4)
    assert latest is not None and latest == leases[1]
    assert (latest.address, latest.prefixlen, latest.expiry) == ("198.18.0.109", 24, 1796122122)
    assert leases[2].expiry == 1796122000 + 180
    assert dhclient_duid(LEASES) == DUID
    assert dhclient_duid("lease {\n}\n", LEASES) == DUID
    epoch = dhclient_leases('lease {\n  interface "br0";\n  expire epoch 1700000000; # x\n}\n')
    assert epoch[0].expiry == 1700000000
    assert dhclient_leases(LEASES[:-30]) == dhclient_leases(LEASES)[:2]  # cut short: whole ones


def test_the_bridge_gets_the_duid_and_the_latest_lease() -> None:
    fresh = dhclient_moved_lease(LEASES, None, "eth0", "br0", 4, DUID)
    assert fresh is not None
    assert fresh.startswith(DUID + '\nlease {\n  interface "br0";\n')
    assert [x.interface for x in dhclient_leases(fresh)] == ["br0"]
    assert "renew 2 2026/12/01 10:47:38;" in fresh
    shared = dhclient_moved_lease(LEASES, LEASES, "eth0", "br0", 4, DUID)
    assert shared is not None and shared.startswith(LEASES)
    assert [x.interface for x in dhclient_leases(shared)][-1] == "br0"
    assert dhclient_moved_lease(LEASES, None, "eth1", "br0", 4, DUID) is None


def dhclient_view(
    argv: list[str] = IFUP,
    files: dict[str, str] | None = None,
    bridge_clients: tuple[DhclientProcess, ...] = (),
) -> DhclientView:
    texts = {"/var/lib/dhcp/dhclient.eth0.leases": LEASES} if files is None else files
    return DhclientView(
        "eth0",
        "br0",
        (DhclientProcess(89, 4711, tuple(argv)),),
        bridge_clients,
        tuple((p, FileState(t)) for p, t in texts.items()),
    )


def test_a_client_moves_with_its_files_named_for_the_bridge() -> None:
    a = dhclient_plan(dhclient_view(), STATE, "br0")
    assert not isinstance(a, str)
    (m,) = a.moves
    assert (m.family, m.lease_file, m.bridge_lease_file, m.bridge_lease_existed) == (
        4,
        "/var/lib/dhcp/dhclient.eth0.leases",
        "/var/lib/dhcp/dhclient.br0.leases",
        False,
    )
    assert m.bridge_argv[-1] == "br0" and m.argv == tuple(IFUP)


@pytest.mark.parametrize(
    ("v", "why"),
    [
        (dhclient_view(["dhclient", "eth0", "eth1"]), "serves eth0, eth1, not eth0 alone"),
        (dhclient_view(files={}), "its DUID is not in /var/lib/dhcp/dhclient.eth0.leases nor"),
        (
            dhclient_view(
                ["dhclient", "-v", "eth0"],
                {
                    "/etc/dhcp/dhclient.conf": '#interface "eth0" {\n'
                    'interface "eth0" {\n  send host-name "a";\n}\n'
                },
            ),
            'has an `interface "eth0"` block',
        ),
        (
            dhclient_view(bridge_clients=(DhclientProcess(90, 1, ("dhclient", "br0")),)),
            "already serves br0",
        ),
    ],
)
def test_a_client_that_cannot_move_is_refused(v: DhclientView, why: str) -> None:
    refusal = dhclient_plan(v, STATE, "br0")
    assert isinstance(refusal, str) and why in refusal, refusal


def test_a_commented_interface_block_is_no_block() -> None:
    conf = {"/etc/dhcp/dhclient.conf": '#interface "eth0" {\n#  send host-name "a";\n#}\n'}
    a = dhclient_plan(dhclient_view(["dhclient", "-v", "eth0"], conf), STATE, "br0")
    assert not isinstance(a, str), a


def test_a_bare_client_identified_by_its_mac_needs_no_duid() -> None:
    a = dhclient_plan(dhclient_view(["dhclient", "-v", "eth0"], files={}), STATE, "br0")
    assert not isinstance(a, str)
    assert a.moves[0].bridge_lease_file == a.moves[0].lease_file == clients._DHCLIENT_LEASES[4]


def test_a_dhcpv6_lease_makes_its_own_prefix_route_and_an_ipv4_host_address_none() -> None:
    # dhclient -6 holds a /128 with a finite lifetime: the kernel gives it a /128 route, which
    # the takeover must not copy (the kernel would keep a twin of it beside its own)
    assert addr("2001:db8:0:1::1f18/128", lft=120).makes_prefix_route
    assert not addr("198.18.0.10/32").makes_prefix_route
    assert addr("198.18.0.10/24").makes_prefix_route


def test_plan_says_a_client_run_by_hand_is_not_started_at_boot() -> None:
    a = dhclient_plan(dhclient_view(["dhclient", "-v", "eth0"], files={}), STATE, "br0")
    assert not isinstance(a, str)
    notes = " ".join(clients.dhclient_notes(a))
    assert "at reboot" in notes and "bare eth0" in notes and "`dhclient -v eth0`" in notes
    ifups = replace(
        dhclient_view(), clients=(DhclientProcess(89, 1, tuple(IFUP), "networking.service"),)
    )
    b = dhclient_plan(ifups, STATE, "br0")
    assert not isinstance(b, str) and not b.moves[0].by_hand
    assert "at reboot" not in " ".join(clients.dhclient_notes(b))  # ifup starts it on br0
