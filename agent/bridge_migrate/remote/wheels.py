"""The wheels sent to a host: the agent's (built from this checkout), its pure-Python
dependencies' and pip's (for a host without one). systemd-python is the host's own: it compiles.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from .. import build
from ..contract import ExitCode
from .errors import RemoteError

CHECKOUT = Path(__file__).resolve().parents[3]  # agent/bridge_migrate/remote/ -> the checkout
AGENT_WHEEL = "bridge_migrate-*.whl"
_PIP_TIMEOUT = 300.0


def agent_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob(AGENT_WHEEL))
    if len(found) != 1:
        raise RemoteError(ExitCode.REFUSED, f"want one {AGENT_WHEEL} in {wheels}, found {found}")
    return found[0]


def identity(wheel: Path) -> str:
    """The build identity of the agent in `wheel` (build.digest over its package files)."""
    prefix = f"{build.PACKAGE}/"
    with zipfile.ZipFile(wheel) as z:
        files = [
            (n[len(prefix) :], z.read(n))
            for n in z.namelist()
            if n.startswith(prefix) and n.endswith(".py")
        ]
    return build.digest(files)


def build_wheels(target: Path) -> Path:
    """Build the agent's wheel from this checkout into `target`, and fetch the others."""
    source = CHECKOUT
    if not (source / "pyproject.toml").exists():
        raise RemoteError(
            ExitCode.REFUSED,
            f"{source} is not a checkout of bridge-migrate: pass --wheels DIR built in one",
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    target.mkdir(parents=True, exist_ok=True)
    with open(source / "pyproject.toml", "rb") as f:
        deps = [d for d in tomllib.load(f)["project"]["dependencies"] if "systemd" not in d]
    with tempfile.TemporaryDirectory(prefix="bridge-migrate-build-") as tmp:
        src = Path(tmp) / "src"  # a copy: never write build/ into the checkout
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        shutil.copytree(source / "agent", src / "agent", ignore=ignore)
        # In place if this Python's setuptools can (much faster), else in an isolated build.
        in_place = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
        _pip([*pip, "wheel", "--no-deps", *in_place, "-w", str(target), str(src)], "build")
    download = [*pip, "download", "--only-binary=:all:", "--no-deps", "-d", str(target)]
    _pip([*download, *deps], "fetch the dependencies' wheels")
    if not list(target.glob("pip-*.whl")):
        bundled = _bundled_pip()
        if bundled is not None:
            shutil.copy2(bundled, target / bundled.name)
        else:
            _pip([*download, "pip"], "fetch pip's wheel")
    return target


def tar(wheels: Path, *, pip: bool) -> bytes:
    """The wheels as one tar (pip's only for a host without a pip of its own)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for p in sorted(wheels.glob("*.whl")):
            if pip or not p.name.startswith("pip-"):
                t.add(p, arcname=p.name)
    return buf.getvalue()


def _pip(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PIP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RemoteError(ExitCode.INTERNAL, f"cannot {what}: {e}") from None
    if done.returncode != 0:
        raise RemoteError(ExitCode.INTERNAL, f"cannot {what}: {done.stderr.strip()[-2000:]}")


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 here (bdist_wheel built in; the project asks for >= 68)."""
    try:
        return _version_key(metadata.version("setuptools")) >= (70, 1)
    except metadata.PackageNotFoundError:
        return False


def _bundled_pip() -> Path | None:
    import ensurepip

    places = [Path(ensurepip.__file__).parent / "_bundled", Path("/usr/share/python-wheels")]
    found = [p for d in places for p in d.glob("pip-*-py3-none-any.whl")]
    return max(found, key=lambda p: _version_key(p.name.split("-")[1]), default=None)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:4])
