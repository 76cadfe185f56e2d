"""The systemd units as installed: they pass `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = Path(sys.executable).with_name("bridge-migrate")

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
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


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
