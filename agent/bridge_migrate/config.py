"""The configuration file the units read; command-line flags override it.

    # /etc/bridge-migrate/bridge-migrate.toml
    nic = "eth0"              # default: the device of the default route
    bridge = "br0"
    timeout = 10              # seconds for the gateway to answer
    probes = ["tcp:198.18.0.20:22"]
    confirm_within = 120      # keep the change pending until `bridge-migrate confirm`

A bad file is an input error (exit 2) naming the file, the key and the line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

DEFAULT_PATH = Path("/etc/bridge-migrate/bridge-migrate.toml")


@dataclass(frozen=True)
class Config:
    nic: str | None = None
    bridge: str | None = None
    timeout: float | None = None
    probes: tuple[str, ...] = ()
    confirm_within: float | None = None


# What each key means, for bridge-migrate.toml(5): the type as the manual names it, the text.
KEYS: dict[str, tuple[str, str]] = {
    "nic": ("string", "the NIC to take over; default: the device of the default route"),
    "bridge": ("string", "the bridge to create, and the one undo leaves; default br0"),
    "timeout": (
        "number",
        "seconds (more than 0, at most 3600; default 10) for every probe to answer, counted "
        "from the batch; otherwise the host is rolled back",
    ),
    "probes": ("array of strings", "also require icmp:ADDR or tcp:ADDR:PORT to answer"),
    "confirm_within": (
        "number",
        "after verifying, keep the change pending this many seconds: bridge-migrate confirm "
        "commits it, else the dead man rolls it back",
    ),
}
_KINDS: dict[str, type | tuple[type, ...]] = {
    "nic": str,
    "bridge": str,
    "timeout": (int, float),
    "probes": list,
    "confirm_within": (int, float),
}


def load_config(path: Path, *, required: bool) -> Config:
    """Read `path`; a missing file is an empty configuration unless `required`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise UsageError(f"{path}: no such configuration file") from None
        return Config()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: {e}") from None
    return _config(path, text, data)


def _config(path: Path, text: str, data: dict[str, object]) -> Config:
    for key, value in data.items():
        at = f"{path}, line {_line_of(text, key)}, key {key!r}"
        if key not in _KINDS:
            raise UsageError(f"{at}: unknown key; known keys: {', '.join(_KINDS)}")
        kind = _KINDS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{at}: expected {_kind_name(kind)}, found {value!r}")
        if isinstance(value, list) and not all(isinstance(p, str) for p in value):
            raise UsageError(f'{at}: expected a list of strings such as "icmp:ADDR"')
    probes = data.get("probes", [])
    assert isinstance(probes, list)
    return Config(
        nic=_opt(data, "nic", str),
        bridge=_opt(data, "bridge", str),
        timeout=_number(data, "timeout"),
        probes=tuple(probes),
        confirm_within=_number(data, "confirm_within"),
    )


def where(path: Path, key: str) -> str:
    """`path, line N, key 'k'`: where a value came from, for error messages."""
    try:
        line = _line_of(path.read_text(), key)
    except OSError:
        line = 1
    return f"{path}, line {line}, key {key!r}"


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def _opt(data: dict[str, object], key: str, kind: type[str]) -> str | None:
    value = data.get(key)
    return value if isinstance(value, kind) else None


def _number(data: dict[str, object], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, int | float) else None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if kind is str:
        return "a string"
    return "a list" if kind is list else "a number"
