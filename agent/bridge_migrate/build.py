"""The agent's build identity: a digest of its package's Python files. The same files give the
same identity wherever they are (a checkout, a wheel, an installed environment), and any change
gives another, so the remote driver reinstalls when the host's agent differs, not only when its
version number is older (it stayed 0.1.0 across many changes)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGE = "bridge_migrate"
_PACKAGE_DIR = Path(__file__).resolve().parent


def digest(files: Iterable[tuple[str, bytes]]) -> str:
    """The identity of (path inside the package, content) pairs: the wheel's or the tree's."""
    h = hashlib.sha256()
    for name, content in sorted(files):
        h.update(f"{name}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()[:16]


def tree_files(package_dir: Path) -> list[tuple[str, bytes]]:
    return [
        (p.relative_to(package_dir).as_posix(), p.read_bytes())
        for p in package_dir.rglob("*.py")
        if "__pycache__" not in p.parts
    ]


def identity() -> str:
    """This agent's build identity."""
    return digest(tree_files(_PACKAGE_DIR))


def version() -> str:
    try:
        return metadata.version("bridge-migrate")
    except metadata.PackageNotFoundError:
        return "unknown"
