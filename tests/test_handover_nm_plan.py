"""The NetworkManager hand-over planned without root: the two keyfiles as the plan writes them
(pure), what it refuses, where the rollback lets NetworkManager go, and the device state file it
names a profile in."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bridge_migrate import handover, serde
from bridge_migrate.handover import networkmanager as nm
from bridge_migrate.handover import unitfile
from bridge_migrate.handover.files import ABSENT, FileState
from bridge_migrate.model import AF_INET6
from bridge_migrate.plan import (
    Adopt,
    Plan,
    Readopt,
    Release,
    RestoreConfig,
    WriteConfig,
    plan_takeover,
)
from bridge_migrate.record import Recipe
from bridge_migrate.rollback import managers_around
from shapes import NIC, addr, host_with, route

KEYFILE = "/etc/NetworkManager/system-connections/lab.nmconnection"
DHCP = """[connection]
id=lab
type=ethernet
interface-name=eth0

[ethernet]
mtu=1500

[ipv4]
method=auto

[ipv6]
method=auto
"""
STATIC = """[connection]
id=lab
type=ethernet
autoconnect=false
zone=trusted
lldp=enable
# the lab
[ipv4]
method=manual
address1=198.18.0.10/24,198.18.0.1
dns=198.18.0.1;

[ipv6]
method=manual
address1=2001:db8:0:1::10/64,2001:db8:0:1::1
"""
LAB = nm.Profile(
    "3a283ada-adcb-3e3b-8327-0e40f36f1387", "lab", "802-3-ethernet", "eth0", True, 0, "", KEYFILE
)
EUI64 = "2001:db8:0:1:0:ff:fe00:1"  # of NIC's 02:00:00:00:00:01


def view(text: str = DHCP, **kw: object) -> nm.NetworkManagerView:
    fields: dict[str, object] = {
        "nic": "eth0",
        "unreadable": "",
        "profile": LAB,
        "external": False,
        "keyfile": FileState(text, 0o600),
        "profiles": (LAB,),
        "client_id": "01:02:00:00:00:00:01",
        "duid": "00:04:27:cb:05:6e:a5:16:5e:c8:d3:00:70:cf:78:98:a1:28",
        "iaid": "2b:50:67:35",
        "vpns": (),
        "others": (),
        "unit": nm.UNIT,
        "targets": tuple((p, ABSENT) for p in nm.profile_files("eth0", "br0")),
        **kw,
    }
    return nm.NetworkManagerView(**fields)  # type: ignore[arg-type]


DEFAULTS = [
    route(None, "198.18.0.1", priority=100),
    route(None, "fe80::1", family=AF_INET6, priority=100),
]
STATE = host_with([addr("198.18.0.125/24", lft=120), addr(f"{EUI64}/64", lft=1800)], DEFAULTS, [])


def planned(v: nm.NetworkManagerView, state: object = STATE) -> handover.Handover:
    h = handover.plan(v, state, "br0")  # type: ignore[arg-type]
    assert isinstance(h, handover.Handover), h
    return h


Sections = dict[str, unitfile.Section]


def written(v: nm.NetworkManagerView, state: object = STATE) -> tuple[Sections, Sections]:
    """The bridge's and the port's keyfiles, by section."""
    h = planned(v, state)
    bridge, port = (unitfile.parse(c.after.text or "") for c in h.files)
    return {s.name: s for s in bridge}, {s.name: s for s in port}


def test_the_bridge_gets_the_nics_addressing_and_dhcp_identity() -> None:
    h = planned(view())
    assert [c.path for c in h.files] == list(nm.profile_files("eth0", "br0"))
    assert all(c.after.mode == 0o600 and not c.before.exists for c in h.files)
    assert KEYFILE not in [c.path for c in h.files], "the NIC's own profile is left as it is"
    bridge, port = written(view())
    c = bridge["connection"]
    assert (c.values("type"), c.values("interface-name")) == (("bridge",), ("br0",))
    assert bridge["bridge"].lines == (("mac-address", NIC.mac.upper()), ("stp", "false"))
    v4, v6 = bridge["ipv4"], bridge["ipv6"]
    assert v4.values("method") == ("auto",)
    assert v4.values("dhcp-client-id") == ("01:02:00:00:00:00:01",)
    assert v6.values("dhcp-duid") == (view().duid,)
    assert v6.values("dhcp-iaid") == (str(0x2B506735),)  # NM would derive it from "br0"
    # NM gives a bridge's routes 425, an Ethernet NIC's 100: the NIC's metric is pinned
    assert (v4.values("route-metric"), v6.values("route-metric")) == (("100",), ("100",))
    assert not v6.values("token"), "EUI-64 of the same MAC: the same SLAAC address"
    assert "ethernet" not in bridge
    pc = port["connection"]
    assert pc.values("master") == c.values("uuid") and pc.values("slave-type") == ("bridge",)
    assert (pc.values("interface-name"), pc.values("type")) == (("eth0",), ("ethernet",))
    assert pc.values("autoconnect-priority") == ("1",)
    assert port["ethernet"].lines == (("mtu", "1500"),)
    assert not {"ipv4", "ipv6"} & set(port)
    a = h.adoption
    assert isinstance(a, nm.NetworkManagerAdoption)
    assert (a.nic_uuid, a.bridge_uuid, a.port_uuid) == (
        LAB.uuid,
        *c.values("uuid"),
        *pc.values("uuid"),
    )


def test_a_static_profile_is_carried_line_for_line() -> None:
    static = view(STATIC, client_id="", duid="", iaid="")
    bridge, port = written(static, host_with([addr("198.18.0.10/24")], DEFAULTS, []))
    assert bridge["ipv4"].lines == (
        ("method", "manual"),
        ("address1", "198.18.0.10/24,198.18.0.1"),
        ("dns", "198.18.0.1;"),
        ("route-metric", "100"),
    )
    assert not bridge["ipv6"].values("dhcp-duid")
    # autoconnect as the NIC's was; the firewall zone is layer 3 (bridge), LLDP layer 2 (port)
    assert bridge["connection"].values("autoconnect") == ("false",)
    assert port["connection"].values("autoconnect") == ("false",)
    assert bridge["connection"].values("zone") == ("trusted",)
    assert port["connection"].values("lldp") == ("enable",)
    assert not bridge["connection"].values("lldp") and not port["connection"].values("zone")


def test_a_route_metric_the_admin_set_is_kept() -> None:
    bridge, _ = written(view(DHCP + "route-metric=50\n"))
    assert bridge["ipv6"].values("route-metric") == ("50",)
    assert bridge["ipv4"].values("route-metric") == ("100",)


def test_the_port_outranks_every_profile_that_could_take_the_nic() -> None:
    rival = replace(LAB, uuid="r", id="rival", interface_name="", priority=5)
    other_nic = replace(LAB, uuid="o", id="other", interface_name="eth1", priority=50)
    off = replace(LAB, uuid="x", id="off", autoconnect=False, priority=70)
    _, port = written(view(profiles=(LAB, rival, other_nic, off)))
    assert port["connection"].values("autoconnect-priority") == ("6",)
    top = replace(rival, priority=999)
    refused = handover.plan(view(profiles=(LAB, top)), STATE, "br0")
    assert isinstance(refused, str) and "priority 999" in refused


def test_a_stable_privacy_address_is_kept_by_its_interface_identifier() -> None:
    stable = "2001:db8:0:1:9c1e:4f2a:77d0:1b3"
    temporary = addr("2001:db8:0:1:1111:2222:3333:4444/64", lft=600, flags=0x01)
    state = host_with([addr(f"{stable}/64", lft=1800), temporary], DEFAULTS, [])
    bridge, _ = written(view(), state)
    assert bridge["ipv6"].values("addr-gen-mode") == ("eui64",)
    assert bridge["ipv6"].values("token") == ("::9c1e:4f2a:77d0:1b3",)
    two = host_with([addr(f"{stable}/64", lft=1800), addr(f"{EUI64}/64", lft=1800)], DEFAULTS, [])
    refused = handover.plan(view(), two, "br0")
    assert isinstance(refused, str) and "2 interface identifiers" in refused
    pinned, _ = written(view(DHCP + "token=::1\n"), state)
    assert pinned["ipv6"].values("token") == ("::1",) and not pinned["ipv6"].values("addr-gen-mode")


WIFI = replace(LAB, type="802-11-wireless")
VLAN = nm.Profile(
    "v",
    "vlan5",
    "vlan",
    "",
    True,
    0,
    "eth0",
    "/etc/NetworkManager/system-connections/v.nmconnection",
)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"unreadable": "no answer"}, "could not be asked: no answer"),
        ({"profile": None}, "no profile active"),
        ({"external": True}, "only watches eth0"),
        ({"unit": "nm.service"}, "does not run as NetworkManager.service"),
        ({"vpns": ("office",)}, "office are active"),
        ({"others": ("wifi (802-11-wireless) on wlan0",)}, "other profiles active (wifi"),
        ({"profile": WIFI}, "only Ethernet"),
        (
            {"profile": replace(LAB, filename="/etc/sysconfig/network-scripts/ifcfg-eth0")},
            "not a keyfile",
        ),
        ({"profile": replace(LAB, filename="")}, "memory only"),
        ({"keyfile": ABSENT}, "not a keyfile"),
        (
            {
                "profile": replace(
                    LAB, filename="/run/NetworkManager/system-connections/netplan-eth0.nmconnection"
                )
            },
            "generated by netplan",
        ),
        ({"keyfile": FileState(DHCP + "[802-1x]\neap=tls\n")}, "[802-1x] is not carried"),
        (
            {
                "keyfile": FileState(
                    DHCP.replace("[ethernet]", "[connection]\nmaster=bond0\n[ethernet]")
                )
            },
            "master=",
        ),
        ({"keyfile": FileState(DHCP + "[a=b]\n")}, "[a=b] is not carried"),
        ({"keyfile": FileState(DHCP + "not a line\n")}, "neither a section"),
        ({"targets": ((nm.profile_files("eth0", "br0")[0], FileState("x")),)}, "exist already"),
        ({"profiles": (LAB, replace(LAB, uuid="b", id="br0"))}, "'br0' (b) exists already"),
        (
            {"profiles": (LAB, replace(LAB, uuid="b", id="mine", interface_name="br0"))},
            "is for br0",
        ),
        ({"profiles": (LAB, VLAN)}, "'vlan5' (vlan) stands on eth0"),
    ],
)
def test_what_cannot_be_handed_over_is_refused(change: dict[str, object], reason: str) -> None:
    refused = handover.plan(replace(view(), **change), STATE, "br0")  # type: ignore[arg-type]
    assert isinstance(refused, str) and reason in refused, refused


def test_the_plan_replans_from_the_record_to_the_same_files() -> None:
    plan = plan_takeover(STATE, "br0", (view(),))
    write, adopt = plan.handover
    assert isinstance(write.do, WriteConfig) and isinstance(adopt.do, Adopt)
    restored = serde.load(Plan, serde.to_data(plan))
    assert restored == plan and Recipe.of(restored).plan(STATE) == plan  # the UUIDs are derived


def test_the_rollback_lets_networkmanager_go_before_the_files_and_the_inverses() -> None:
    plan = plan_takeover(STATE, "br0", (view(),))
    undo = managers_around([s.undo for s in reversed(plan.steps)])
    kinds = [type(op) for op in undo]
    assert kinds[:2] == [Release, RestoreConfig] and kinds[-1] is Readopt
    assert not any(isinstance(s.do, Release) for s in plan.steps), "not a step of the plan"
    assert str(undo[0]) == "NetworkManager lets go of br0"


def test_a_device_state_file_names_the_profile_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nm, "DEVICES", str(tmp_path))
    (tmp_path / "7").write_text(
        "[device]\nmanaged=true\nconnection-uuid=old\nnm-owned=false\n\n[dhcp4]\ndhcp4.expiry=1\n"
    )
    nm._name_profile(7, "new")
    sections = {s.name: s for s in unitfile.parse((tmp_path / "7").read_text())}
    assert sections["device"].values("connection-uuid") == ("new",)
    assert sections["device"].values("nm-owned") == ("false",)
    assert sections["dhcp4"].values("dhcp4.expiry") == ("1",)
    nm._name_profile(8, "fresh")  # NetworkManager never wrote one for that device
    assert unitfile.parse((tmp_path / "8").read_text())[0].lines == (
        ("managed", "true"),
        ("connection-uuid", "fresh"),
    )
