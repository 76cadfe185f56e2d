"""The Debian package (debian/): built from a copy of this checkout (scripts/build-deb), installed
with apt into a booted lab host (real systemd as PID 1) whose root is an overlay with a tmpfs
above the machine's (bridge_migrate_testlab.systemd), a takeover run through `systemctl start
bridge-migrate` with the lab's NIC, then purged: nothing of it is left in the host, and nothing of
it ever reached this machine's /usr, /etc or /var. Root only."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge_migrate_testlab.systemd import BootedHost, BootedLab, BootSpec
from hostview import read_view

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 600.0
APT_TIMEOUT = 180.0
TOOLS = ("dpkg-buildpackage", "dh", "pybuild")
# What the package installs that must be gone after the purge (and never appear on the machine).
INSTALLED = (
    "/usr/bin/bridge-migrate",
    "/usr/bin/bridge-migrate-remote",
    "/usr/lib/python3/dist-packages/bridge_migrate",
    "/usr/share/bridge-migrate",
    "/lib/systemd/system/bridge-migrate.service",
    "/lib/systemd/system/bridge-migrate-boot.service",
    "/usr/share/man/man8/bridge-migrate.8.gz",
    "/usr/share/man/man5/bridge-migrate.toml.5.gz",
    "/etc/bridge-migrate/bridge-migrate.toml",
    "/etc/bridge-migrate",
)
STATE = "/var/lib/bridge-migrate"  # the units' StateDirectory=: made at the first start
GONE = (*INSTALLED, STATE)
# The machine's package database: the lab's dpkg must write only to its overlay.
MACHINE_DPKG = ("/var/lib/dpkg/status", "/var/lib/dpkg/available")


def _missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    plugin = Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py")
    return missing + ([] if plugin.exists() else ["pybuild-plugin-pyproject"])


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: boots a lab host")
    if missing := _missing_tools():
        pytest.skip(f"Debian build tools missing ({', '.join(missing)}): run scripts/bootstrap")
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "scripts/build-deb"), str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"scripts/build-deb: {time.monotonic() - started:.1f} s")
    built = Path(done.stdout.strip().splitlines()[-1])
    assert built.parent == out and built.is_file()
    return built


def _digest(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


def _inside(host: BootedHost, argv: list[str], timeout: float = 30.0) -> str:
    done = host.run(argv, timeout=timeout, env={"DEBIAN_FRONTEND": "noninteractive"})
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout[-3000:]}{done.stderr}"
    return done.stdout


def _exists(host: BootedHost, path: str) -> bool:
    return host.run(["test", "-e", path]).returncode == 0


@pytest.fixture
def booted() -> Iterator[BootedLab]:
    with BootedLab(BootSpec(hostname="debhost")) as lab:
        yield lab


def test_the_deb_installs_takes_over_through_its_unit_and_purges_clean(
    deb: Path, booted: BootedLab
) -> None:
    host, lab = booted.host, booted.lab
    machine = {p: _digest(p) for p in MACHINE_DPKG}
    assert not [p for p in GONE if os.path.lexists(p)], "installed on the machine already"
    # Everything dpkg writes lands in the boot's overlay (a tmpfs above the machine's root).
    for top in ("/usr", "/etc", "/var", "/lib"):
        fstype = _inside(host, ["findmnt", "-n", "-o", "FSTYPE", "--target", top]).strip()
        assert fstype == "overlay", f"{top} inside the lab is {fstype}, not the boot's overlay"

    shutil.copy(deb, host.path(f"/root/{deb.name}"))
    started = time.monotonic()
    _inside(
        host,
        ["apt-get", "install", "-y", "--no-install-recommends", f"/root/{deb.name}"],
        timeout=APT_TIMEOUT,
    )
    print(f"apt-get install: {time.monotonic() - started:.1f} s")
    assert "install ok installed" in _inside(
        host, ["dpkg-query", "-W", "-f=${Status}", "bridge-migrate"]
    )
    for path in INSTALLED:
        assert _exists(host, path), path
    unit = _inside(host, ["cat", "/lib/systemd/system/bridge-migrate.service"])
    assert "ExecStart=/usr/bin/bridge-migrate apply\n" in unit and "@BIN@" not in unit
    boot_unit = _inside(host, ["cat", "/lib/systemd/system/bridge-migrate-boot.service"])
    assert "ExecStart=/usr/bin/bridge-migrate boot\n" in boot_unit
    conffiles = _inside(host, ["dpkg-query", "-W", "-f=${Conffiles}", "bridge-migrate"])
    assert "/etc/bridge-migrate/bridge-migrate.toml" in conffiles
    # Installing changed nothing on the network and enabled nothing.
    assert lab.run(lab.host_ns, ["ip", "-o", "link", "show", "br0"]).returncode != 0
    for name in ("bridge-migrate.service", "bridge-migrate-boot.service"):
        assert host.systemctl("is-enabled", name).stdout.strip() == "disabled"
        assert host.systemctl("is-active", name).stdout.strip() == "inactive"
    # The agent runs on Debian's Python and libraries, with the pyroute2 the package ships.
    code = (
        "import bridge_migrate, pyroute2, tenacity, jeepney, yaml, systemd; print("
        + ", ".join(
            f"{m}.__file__" for m in ("bridge_migrate", "pyroute2", "tenacity", "jeepney", "yaml")
        )
        + ")"
    )
    files = _inside(host, ["/usr/bin/python3", "-c", code]).split()
    assert files[0].startswith("/usr/lib/python3/dist-packages/bridge_migrate/")
    assert files[1].startswith("/usr/share/bridge-migrate/vendor/pyroute2/")
    assert all(f.startswith("/usr/lib/python3/dist-packages/") for f in files[2:]), files
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version in _inside(host, ["bridge-migrate", "--version"])
    assert _inside(host, ["man", "-w", "bridge-migrate.toml"]).strip().endswith(".5.gz")

    # The takeover, from the shipped (all-defaults) configuration, through the installed unit.
    started = time.monotonic()
    done = host.systemctl("start", "bridge-migrate", timeout=60)
    assert done.returncode == 0, done.stderr + host.systemctl("status", "bridge-migrate").stdout
    print(f"systemctl start bridge-migrate: {time.monotonic() - started:.2f} s")
    view = read_view(lab.host_ns)
    assert view.link("eth0")[5] == "br0"  # type: ignore[index]
    assert lab.addrs.host_v4 in view.addresses_on("br0")
    assert lab.addrs.host_v6 in view.addresses_on("br0")
    assert not [a for a in view.addresses_on("eth0") if not a.startswith("fe80")]
    status = host.show("bridge-migrate.service", "StatusText")
    assert status == "migrated: eth0 -> br0, verified", status
    assert _exists(host, f"{STATE}/record")
    lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6])

    host.systemctl("stop", "bridge-migrate", check=True)
    _inside(host, ["dpkg", "--purge", "bridge-migrate"], timeout=APT_TIMEOUT)
    known = host.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "bridge-migrate"])
    assert known.stdout in ("", "not-installed"), known.stdout  # purged: forgotten altogether
    left = [p for p in GONE if _exists(host, p)]
    assert not left, f"left after the purge: {left}"
    # The host stays where the admin put it: the purge leaves the network alone.
    assert read_view(lab.host_ns).link("eth0")[5] == "br0"  # type: ignore[index]
    # Nothing of it on the machine, whose package database is untouched.
    assert not [p for p in INSTALLED if os.path.lexists(p)]
    assert not os.path.lexists(STATE)
    assert {p: _digest(p) for p in MACHINE_DPKG} == machine
