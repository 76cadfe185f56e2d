"""The hand-over planned without root: the manager's files as the plan rewrites them (pure),
what it refuses, and the files module against a real filesystem (a planted symlink, a
read-only directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bridge_migrate import handover, serde
from bridge_migrate.handover import files, networkd, unitfile
from bridge_migrate.handover.files import ABSENT, FileChange, FileState
from bridge_migrate.plan import Adopt, Plan, WriteConfig, plan_takeover
from bridge_migrate.record import Recipe
from shapes import addr, host_with, route

NETWORK = "/etc/systemd/network/10-lab.network"
DHCP = "[Match]\nName=eth0\n\n[Network]\nDHCP=yes\nIPv6AcceptRA=yes\n\n[Link]\nMTUBytes=1500\n"
STATIC = "[Match]\nName=eth0\n# the lab\n[Network]\nAddress=198.18.0.10/24\nGateway=198.18.0.1\n"


def view(text: str = DHCP, iaid: int | None = 0x8BF2BF2B, **kw: object) -> networkd.NetworkdView:
    targets = tuple((p, ABSENT) for p in networkd.bridge_files(NETWORK, "br0"))
    fields = {
        "nic": "eth0",
        "network_file": NETWORK,
        "network": FileState(text, 0o644),
        "dropins": (),
        "iaid": iaid,
        "targets": targets,
        **kw,
    }
    return networkd.NetworkdView(**fields)  # type: ignore[arg-type]


STATE = host_with([addr("198.18.0.10/24")], [route(None, "198.18.0.1")], [])


def written(v: networkd.NetworkdView) -> dict[str, str]:
    h = handover.plan(v, STATE, "br0")
    assert isinstance(h, handover.Handover), h
    return {c.path: c.after.text or "" for c in h.files}


def test_the_nics_file_becomes_the_bridges_and_the_nic_its_port() -> None:
    out = written(view())
    netdev = unitfile.parse(out["/etc/systemd/network/10-br0.netdev"])
    assert netdev[0].values("MACAddress") == (STATE.nic.mac,)
    assert netdev[1].lines == (("STP", "no"), ("ForwardDelaySec", "0"))
    bridge = unitfile.parse(out["/etc/systemd/network/10-br0.network"])
    assert unitfile.named(bridge, "Match")[0].lines == (("Name", "br0"),)
    assert unitfile.named(bridge, "Network")[0].values("DHCP") == ("yes",)
    # the NIC's DHCP identity: the same IAID, so the same client id and the same lease
    for name in ("DHCPv4", "DHCPv6"):
        assert unitfile.named(bridge, name)[0].values("IAID") == (str(0x8BF2BF2B),)
    port = unitfile.parse(out[NETWORK])
    assert [s.name for s in port] == ["Match", "Link", "Network"]
    assert unitfile.named(port, "Network")[0].lines == (("Bridge", "br0"),)
    adopt = out[f"/run/systemd/network/10-br0.network.d/{networkd.ADOPT_DROP_IN}"]
    assert "KeepConfiguration=yes" in adopt


def test_a_static_host_gets_no_iaid_and_keeps_its_addresses() -> None:
    bridge = unitfile.parse(written(view(STATIC, iaid=None))["/etc/systemd/network/10-br0.network"])
    assert unitfile.named(bridge, "Network")[0].values("Address") == ("198.18.0.10/24",)
    assert not unitfile.named(bridge, "DHCPv4")


def test_an_iaid_the_admin_set_is_kept() -> None:
    text = DHCP + "[DHCPv4]\nIAID=7\n"
    bridge = unitfile.parse(written(view(text))["/etc/systemd/network/10-br0.network"])
    assert unitfile.named(bridge, "DHCPv4")[0].values("IAID") == ("7",)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"network_file": "/usr/lib/systemd/network/80-dhcp.network"}, "is not in"),
        ({"dropins": ("/etc/systemd/network/10-lab.network.d/x.conf",)}, "has drop-ins"),
        ({"network": ABSENT}, "is gone"),
        ({"targets": (("/etc/systemd/network/10-br0.netdev", FileState("x")),)}, "exist already"),
    ],
)
def test_what_cannot_be_handed_over_is_refused(change: dict[str, object], reason: str) -> None:
    planned = handover.plan(replace(view(), **change), STATE, "br0")  # type: ignore[arg-type]
    assert isinstance(planned, str) and reason in planned, planned


def test_a_nic_already_stacked_is_refused() -> None:
    planned = handover.plan(view(DHCP + "[Network]\nVLAN=eth0.5\n"), STATE, "br0")
    assert isinstance(planned, str) and "already stacks" in planned


def test_the_handover_comes_after_the_netlink_sends_and_replans_from_the_record() -> None:
    plan = plan_takeover(STATE, "br0", (view(),))
    write, adopt = plan.handover
    assert isinstance(write.do, WriteConfig) and isinstance(adopt.do, Adopt)
    assert plan.steps[-2:] == (write, adopt)
    restored = serde.load(Plan, serde.to_data(plan))
    assert restored == plan and Recipe.of(restored).plan(STATE) == plan


def test_file_changes_are_atomic_and_undone(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "br0.network"
    change = FileChange(str(target), ABSENT, FileState("[Match]\nName=br0\n", 0o640))
    files.write_states([change])
    assert target.read_text() == "[Match]\nName=br0\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert not list(target.parent.glob(".*"))  # no temporary left behind
    files.write_states([change.inverse()])
    assert not target.exists()


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.write_text("secret")
    link = tmp_path / "10-lab.network"
    link.symlink_to(real)
    with pytest.raises(files.FileError, match="not a regular file"):
        files.read_state(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs (root)")
def test_a_read_only_mount_fails_the_write_and_leaves_the_file(tmp_path: Path) -> None:
    # In a mount namespace of its own, so the machine never sees the mount.
    script = f"""
import errno, sys
from pathlib import Path
from bridge_migrate.handover.files import ABSENT, FileChange, FileState, write_states
d = Path({str(tmp_path)!r})
(d / "10-lab.network").write_text("before")
import subprocess
subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
change = FileChange(str(d / "10-lab.network"), FileState("before"), FileState("after"))
try:
    write_states([change])
except OSError as e:
    sys.exit(0 if e.errno == errno.EROFS and (d / "10-lab.network").read_text() == "before" else 2)
sys.exit(1)
"""
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind {tmp_path} {tmp_path} && exec {sys.executable} -c "$0"',
        script,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
