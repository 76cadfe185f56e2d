"""The configuration file: values, precedence of flags, and errors that name file, key, line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge_migrate.cli import _request, build_parser
from bridge_migrate.config import Config, load_config
from bridge_migrate.errors import UsageError

GOOD = """\
# the takeover the unit performs
nic = "eth0"
bridge = "vmbr0"
timeout = 4.5
probes = ["icmp:198.18.0.1", "tcp:[2001:db8::1]:22"]
confirm_within = 120
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge-migrate.toml"
    path.write_text(text)
    return path


def request(path: Path, *flags: str):  # type: ignore[no-untyped-def]
    return _request(build_parser().parse_args(["--config", str(path), "apply", *flags]))


def test_values_are_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), required=True)
    assert config == Config(
        nic="eth0",
        bridge="vmbr0",
        timeout=4.5,
        probes=("icmp:198.18.0.1", "tcp:[2001:db8::1]:22"),
        confirm_within=120.0,
    )


def test_flags_override_the_file(tmp_path: Path) -> None:
    req = request(write(tmp_path, GOOD), "--bridge", "br0", "--timeout", "2", "--probe", "icmp:::1")
    assert (req.nic, req.bridge, req.timeout, req.confirm_within) == ("eth0", "br0", 2.0, 120.0)
    assert [p.spec for p in req.probes] == ["icmp:::1"]


def test_missing_default_file_is_an_empty_configuration(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml", required=False) == Config()
    with pytest.raises(UsageError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", required=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('nic = "eth0"\ntimout = 3\n', "line 2, key 'timout': unknown key"),
        ('\n\ntimeout = "soon"\n', "line 3, key 'timeout': expected a number, found 'soon'"),
        ("timeout = true\n", "line 1, key 'timeout': expected a number"),
        ("probes = [1, 2]\n", "line 1, key 'probes': expected a list of strings"),
        ('bridge = ["br0"]\n', "line 1, key 'bridge': expected a string"),
        ('nic = "eth0\n', "line 1"),  # TOML syntax: tomllib names the line
    ],
)
def test_bad_values_name_file_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as error:
        load_config(path, required=True)
    assert str(path) in error.value.message and message in error.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\ntimeout = 0\n", "line 2, key 'timeout' 0: give seconds"),
        ('probes = ["udp:1.2.3.4:5"]\n', "line 1, key 'probes' 'udp:1.2.3.4:5'"),
        ('nic = "eth/0"\n', "line 1, key 'nic' 'eth/0'"),
        ("confirm_within = -5\n", "line 1, key 'confirm_within' -5"),
    ],
)
def test_bad_settings_are_refused_with_their_place(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as error:
        request(path)
    assert f"{path}, {message}" in error.value.message


def test_bad_configuration_exits_2_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge_migrate.cli import main

    path = write(tmp_path, "\n\ntimeout = -1\n")
    assert main(["--config", str(path), "--state-dir", str(tmp_path / "s"), "apply"]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 3, key 'timeout' -1" in err and "Nothing was changed" in err
    assert not (tmp_path / "s").exists()
