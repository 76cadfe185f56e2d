"""The systemd units as installed: they pass `systemd-analyze verify` and carry the agent's one
hardening list, within the exposure target."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_migrate import sandbox
from bridge_migrate_testlab.systemd import exposure

ROOT = Path(__file__).resolve().parent.parent
AGENT = Path(sys.executable).with_name("bridge-migrate")
INSTALLED_EXPOSURE = 2.2  # issue 9: `systemd-analyze security`, at most

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd")


def install(tmp_path: Path) -> Path:
    units = tmp_path / "units"
    subprocess.run(
        [
            str(ROOT / "scripts/install"),
            "--bin",
            str(AGENT),
            "--unit-dir",
            str(units),
            "--config-dir",
            str(tmp_path / "etc"),
            "--man-dir",
            str(tmp_path / "man"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return units


def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = install(tmp_path)
    names = sorted(p.name for p in units.iterdir())
    assert names == ["bridge-migrate-boot.service", "bridge-migrate.service"]
    for unit in units.iterdir():
        text = unit.read_text()
        assert f"ExecStart={AGENT} " in text and "@BIN@" not in text
    # Where man-db is installed, verify looks up Documentation=man:...: the installed pages.
    env = {**os.environ, "MANPATH": str(tmp_path / "man")}
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert {p.name for p in (tmp_path / "man").glob("man*/*")} == {
        "bridge-migrate.8",
        "bridge-migrate.toml.5",
    }


def test_boot_unit_runs_before_the_network_is_online(tmp_path: Path) -> None:
    text = (install(tmp_path) / "bridge-migrate-boot.service").read_text()
    assert "Before=network-online.target" in text
    assert "WantedBy=multi-user.target" in text  # network-online.target: pulled in by nothing
    assert "ExecStart=" in text and text.split("ExecStart=")[1].split()[1] == "boot"


def test_install_writes_a_commented_configuration_once(tmp_path: Path) -> None:
    install(tmp_path)
    config = tmp_path / "etc/bridge-migrate.toml"
    config.write_text('bridge = "vmbr0"\n')
    install(tmp_path)
    assert config.read_text() == 'bridge = "vmbr0"\n'


def test_installed_units_carry_the_sandbox_of_the_apply(tmp_path: Path) -> None:
    for unit in install(tmp_path).iterdir():
        service = unit.read_text().split("[Service]\n")[1].split("\n[")[0]
        missing = set(sandbox.APPLY) - set(service.splitlines())
        assert not missing, f"{unit.name} lacks {sorted(missing)} (sandbox.APPLY)"


def test_installed_units_are_within_the_exposure_target(tmp_path: Path) -> None:
    for unit in install(tmp_path).iterdir():
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", unit.name],
            cwd=unit.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert exposure(done.stdout, unit.name) <= INSTALLED_EXPOSURE, done.stdout
