"""The independent dead man: a transient systemd timer that runs `bridge-migrate expire ID`
shortly after the deadline, so the host is restored even if the agent, its terminal or its SSH
session dies. Success disarms it.

The timer is systemd's, not ours: it outlives any process of ours. Its AccuracySec is set tight
(the default is one minute). The rollback it starts joins the network namespace the transaction
changed, in the dead man's sandbox (sandbox.DEAD_MAN).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .contract import GRACE as GRACE  # the timer's: deadline + GRACE

ACCURACY = "10ms"
_SYSTEMCTL_TIMEOUT = 15.0


class DeadManError(OSError):
    pass


@dataclass(frozen=True)
class Where:
    """Whether an independent dead man can act on this network namespace, and how."""

    available: bool
    netns_path: str | None  # NetworkNamespacePath for the units; None: systemd's own namespace
    why_not: str


def locate() -> Where:
    if not os.path.isdir("/run/systemd/system"):
        return Where(False, None, "systemd is not PID 1 here")
    mine = _identity("/proc/self/ns/net")
    try:
        if _identity("/proc/1/ns/net") == mine:
            return Where(True, None, "")
        pid1_seen = True
    except PermissionError:  # a sandboxed unit may not look at PID 1
        pid1_seen = False
    for path in sorted(Path("/run/netns").glob("*")):
        if _identity(path) == mine:
            return Where(True, str(path), "")
    if not pid1_seen and "INVOCATION_ID" in os.environ:
        # A unit in no named namespace: systemd started it in its own.
        return Where(True, None, "")
    return Where(False, None, "this network namespace has no name under /run/netns")


def _identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def unit_name(tx_id: str, label: str) -> str:
    return f"bridge-migrate-{tx_id}-{label}"


def arm(where: Where, tx_id: str, label: str, seconds: float, state_dir: Path) -> str:
    """Start a timer that runs `expire tx_id` in `seconds`; return its unit name."""
    unit = unit_name(tx_id, label)
    command = [sys.executable, "-m", "bridge_migrate", "--state-dir", str(state_dir)]
    argv = [
        "systemd-run",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        f"--description=bridge-migrate dead man: roll back transaction {tx_id} if pending",
        f"--on-active={round(seconds * 1000)}ms",
        f"--timer-property=AccuracySec={ACCURACY}",
        "--property=Type=oneshot",
        *sandbox.run_properties(sandbox.DEAD_MAN, state_dir),
    ]
    if where.netns_path:
        argv.append(f"--property=NetworkNamespacePath={where.netns_path}")
    _call([*argv, "--", *command, "expire", tx_id], f"arm the dead man {unit}.timer")
    return unit


def disarm(unit: str) -> None:
    """Stop the timer (not its service: a rollback already running must finish)."""
    _call(["systemctl", "stop", f"{unit}.timer"], f"disarm the dead man {unit}.timer", ok=(0, 5))


def _call(argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeadManError(f"cannot {what}: {e}") from None
    if done.returncode not in ok:  # systemctl: 5, the unit is gone already
        raise DeadManError(f"cannot {what}: {done.stderr.strip() or done.returncode}")
