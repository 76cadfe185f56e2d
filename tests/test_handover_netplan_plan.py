"""netplan's and cloud-init's hand-over planned from views alone (pure, no root): the YAML that
defines the NIC gains the bridge with the NIC's addressing, as netplan itself reads it back; what
cannot be moved as it is is refused with the reason."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bridge_migrate.compare import differences
from bridge_migrate.handover import Handover, cloudinit, netplan
from bridge_migrate.handover import plan as plan_handover
from bridge_migrate.handover.files import ABSENT, FileChange, FileState, write_states
from bridge_migrate.model import AF_INET6, HostState
from shapes import NIC, addr, host_with, route

STATE = host_with([], [], [])
MAC = NIC.mac
LAB = "/etc/netplan/01-lab.yaml"
DHCP = """network:
  version: 2
  renderer: networkd
  ethernets:
    eth0:
      dhcp4: true
      dhcp6: true
"""
IDENTITY, ADOPTION = netplan.dropins("br0")


def view(*files: tuple[str, str], iaid: int | None = 3010874519) -> netplan.NetplanView:
    return netplan.NetplanView(
        nic="eth0",
        network_file=netplan.generated("eth0"),
        yaml=tuple((p, FileState(t, 0o600)) for p, t in files),
        iaid=iaid,
        targets=((IDENTITY, ABSENT), (ADOPTION, ABSENT)),
    )


def planned(*files: tuple[str, str], iaid: int | None = 3010874519) -> tuple[FileChange, ...]:
    changes = netplan.plan(view(*files, iaid=iaid), STATE, "br0")
    assert not isinstance(changes, str), changes
    return changes


def refused(*files: tuple[str, str]) -> str:
    why = netplan.plan(view(*files), STATE, "br0")
    assert isinstance(why, str), why
    return why


def written(changes: tuple[FileChange, ...], path: str = LAB) -> str:
    text = next(c.after.text for c in changes if c.path == path)
    assert text is not None
    return text


def test_dhcp_moves_onto_the_bridge_with_the_nic_as_its_port() -> None:
    changes = planned((LAB, DHCP))
    assert [c.path for c in changes] == [LAB, IDENTITY, ADOPTION]
    doc = yaml.safe_load(written(changes))
    assert doc["network"]["ethernets"] == {"eth0": {}}
    assert doc["network"]["bridges"] == {
        "br0": {
            "interfaces": ["eth0"],
            "macaddress": MAC,
            "parameters": {"stp": False, "forward-delay": 0},
            "dhcp4": True,
            "dhcp6": True,
        }
    }
    assert doc["network"]["renderer"] == "networkd" and doc["network"]["version"] == 2
    yaml_change = changes[0]
    assert yaml_change.before == FileState(DHCP, 0o600) and yaml_change.after.mode == 0o600


def test_the_bridge_presents_the_nics_iaid_and_networkd_keeps_what_it_finds() -> None:
    changes = planned((LAB, DHCP))
    identity = written(changes, IDENTITY)
    assert "[DHCPv4]\nIAID=3010874519\n" in identity and "[DHCPv6]\nIAID=3010874519\n" in identity
    assert IDENTITY.startswith("/etc/systemd/network/10-netplan-br0.network.d/")
    assert ADOPTION.startswith("/run/systemd/network/10-netplan-br0.network.d/")
    assert "[Network]\nKeepConfiguration=yes\n" in written(changes, ADOPTION)


def test_static_or_unknown_client_needs_no_iaid() -> None:
    static = DHCP.replace("dhcp4: true\n      dhcp6: true", "addresses: [198.18.0.10/24]")
    assert [c.path for c in planned((LAB, static))] == [LAB, ADOPTION]
    assert [c.path for c in planned((LAB, DHCP), iaid=None)] == [LAB, ADOPTION]


def test_device_settings_stay_on_the_nic_and_scalars_come_back_as_written() -> None:
    text = """# This file is generated from information provided by the datasource.  Changes
# to it will not persist across an instance reboot.
network:
    version: 2
    ethernets:
        eth0:
            mtu: 9000
            wakeonlan: yes
            macaddress: 52:54:00:12:34:56
            addresses: ["2001:db8::10/64", 198.18.0.10/24]
            routes:
              - to: default
                via: 198.18.0.1
            nameservers: {addresses: [198.18.0.53], search: [lab]}
            ipv6-address-token: "::10"
            dhcp4: no
        eth1:
            dhcp4: true
    vlans:
        vlan9: {id: 9, link: eth1}
"""
    out = written(planned((LAB, text)))
    assert out.startswith("# This file is generated from information provided by the datasource.")
    raw = yaml.load(out, Loader=yaml.BaseLoader)["network"]
    assert raw["ethernets"]["eth0"] == {
        "mtu": "9000",
        "wakeonlan": "yes",
        "macaddress": "52:54:00:12:34:56",
    }
    br0 = raw["bridges"]["br0"]
    assert br0["macaddress"] == MAC and br0["interfaces"] == ["eth0"]
    assert br0["addresses"] == ["2001:db8::10/64", "198.18.0.10/24"]
    assert br0["routes"] == [{"to": "default", "via": "198.18.0.1"}]
    assert br0["nameservers"] == {"addresses": ["198.18.0.53"], "search": ["lab"]}
    assert br0["ipv6-address-token"] == "::10" and br0["dhcp4"] == "no"
    assert raw["ethernets"]["eth1"] == {"dhcp4": "true"} and raw["vlans"]["vlan9"]["link"] == "eth1"
    assert "macaddress: 52:54:00:12:34:56" in out, "a MAC stays a MAC (not base 60), unquoted"
    assert "wakeonlan: yes" in out and "dhcp4: no" in out


@pytest.mark.parametrize(
    ("files", "said"),
    [
        ((), "eth0 is defined in no netplan file"),
        (((LAB, DHCP), ("/etc/netplan/90-more.yaml", DHCP)), "exactly one file must define it"),
        (
            ((LAB, DHCP.replace("eth0:\n", f"nic:\n      match: {{macaddress: '{MAC}'}}\n")),),
            "defined by `match:`",
        ),
        (
            ((LAB, DHCP.replace("eth0:\n", "nic:\n      set-name: eth0\n")),),
            "defined by `match:`",
        ),
        (((LAB, DHCP.replace("networkd", "NetworkManager")),), "rendered by NetworkManager"),
        (
            ((LAB, DHCP + "  bridges:\n    br0:\n      interfaces: []\n"),),
            "br0 is defined already",
        ),
        (
            ((LAB, DHCP + "  vlans:\n    vlan9: {id: 9, link: eth0}\n"),),
            "eth0 already carries other devices",
        ),
        ((("/run/netplan/01-lab.yaml", DHCP),), "not in /etc/netplan"),
        (((LAB, "network: [\n"),), "is not YAML"),
    ],
)
def test_what_cannot_be_moved_as_it_is_is_refused(
    files: tuple[tuple[str, str], ...], said: str
) -> None:
    assert said in refused(*files)


def test_a_file_in_run_hides_the_same_name_in_etc() -> None:
    static = DHCP.replace("dhcp4: true\n      dhcp6: true", "addresses: [198.18.0.10/24]")
    why = refused((LAB, DHCP), ("/run/netplan/01-lab.yaml", static))
    assert "/run/netplan/01-lab.yaml defines eth0, and it is not in /etc/netplan" in why


def test_existing_dropins_are_refused() -> None:
    taken = netplan.NetplanView(
        "eth0", netplan.generated("eth0"), ((LAB, FileState(DHCP, 0o600)),), None,
        ((IDENTITY, FileState("x", 0o644)), (ADOPTION, ABSENT)),
    )  # fmt: skip
    assert f"{IDENTITY} exist already" in str(netplan.plan(taken, STATE, "br0"))


def test_cloud_init_is_told_to_keep_away_and_the_dispatch_names_each_manager() -> None:
    v = cloudinit.CloudInitView("eth0", "/etc/netplan/50-cloud-init.yaml", ABSENT)
    h = plan_handover(v, STATE, "br0")
    assert isinstance(h, Handover) and h.manager.value == "cloud-init"
    (change,) = h.files
    assert change.path == cloudinit.DISABLE and change.before == ABSENT
    assert change.after.text is not None
    assert yaml.safe_load(change.after.text) == {"network": {"config": "disabled"}}
    there = cloudinit.CloudInitView("eth0", "x", FileState("datasource_list: [NoCloud]\n"))
    assert "add `network: {config: disabled}`" in str(plan_handover(there, STATE, "br0"))
    n = plan_handover(view((LAB, DHCP)), STATE, "br0")
    assert isinstance(n, Handover) and n.manager.value == "systemd-networkd"
    assert n.adoption == netplan.NetplanAdoption(
        "eth0", "br0", "/run/systemd/network/10-netplan-br0.network", netplan.generated("eth0")
    )


@pytest.mark.skipif(shutil.which("netplan") is None, reason="netplan is not installed")
@pytest.mark.parametrize(
    "text",
    [DHCP, DHCP.replace("dhcp4: true\n      dhcp6: true", "addresses: [198.18.0.10/24]")],
)
def test_netplan_renders_the_rewritten_yaml_as_a_bridge(tmp_path: Path, text: str) -> None:
    """netplan itself reads the result (in a scratch root): a bridge with the NIC's MAC, STP
    off, the NIC its port without addresses."""
    (tmp_path / "etc/netplan").mkdir(parents=True)
    target = tmp_path / "etc/netplan/01-lab.yaml"
    target.write_text(written(planned((LAB, text))))
    target.chmod(0o600)
    subprocess.run(["netplan", "generate", "--root-dir", str(tmp_path)], check=True, timeout=60)
    out = tmp_path / "run/systemd/network"
    netdev = (out / "10-netplan-br0.netdev").read_text()
    assert f"MACAddress={MAC}" in netdev and "STP=false" in netdev
    assert "ForwardDelaySec=0" in netdev
    port = (out / "10-netplan-eth0.network").read_text()
    assert "Bridge=br0" in port and "DHCP=" not in port and "\nAddress=" not in port
    bridge = (out / "10-netplan-br0.network").read_text()
    assert ("DHCP=yes" in bridge) == ("dhcp4" in text)
    assert ("Address=198.18.0.10/24" in bridge) == ("addresses" in text)


def test_readopt_waits_for_the_global_addresses_networkd_had_configured() -> None:
    held = [addr("198.18.0.10/24"), addr("fe80::1/64"), addr("2001:db8::10/64"), addr("10.9.9.9/8")]
    owned = ("198.18.0.10", "2001:db8::10", "fe80::1")  # 10.9.9.9: added by hand, foreign
    v = replace(view((LAB, DHCP)), owned=owned)
    a = netplan.adoption(v, host_with(held, [], []), "br0")
    assert a.addresses == ("198.18.0.10", "2001:db8::10")


def test_a_manager_configuring_the_nic_again_may_have_learnt_its_ra_routes_again() -> None:
    """After readopt, networkd re-learns RA routes: their expiry is fresh, not the snapshot's
    run down by the age (a rollback wrongly ended exit 5 on that)."""

    def state(expires: int) -> HostState:
        ra = route("2001:db8::/64", None, family=AF_INET6, protocol=9, expires=expires)
        return host_with([], [ra], [])

    assert differences(state(1795), state(1800), 5.0, managed=True) == ()
    # Unmanaged, a lifetime may also have grown (an RA renewed it: the bridge's first router
    # solicitation is answered during the check), but not run down by more than the age.
    assert differences(state(1795), state(1800), 5.0) == ()
    assert differences(state(1795), state(1700), 5.0) != ()


def test_new_dropin_directories_are_readable_by_the_manager_whatever_the_umask(
    tmp_path: Path,
) -> None:
    """The agent's unit runs with UMask=0077; networkd reads drop-ins as its own user."""
    target = tmp_path / "run/systemd/network/10-netplan-br0.network.d/x.conf"
    old = os.umask(0o077)
    try:
        write_states([FileChange(str(target), ABSENT, FileState("[Network]\n", 0o644))])
    finally:
        os.umask(old)
    for d in (target.parent, target.parent.parent, tmp_path / "run"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
