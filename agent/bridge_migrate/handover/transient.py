"""A process started as a transient systemd service (StartTransientUnit over the system bus): it
lives in a unit of its own, not in the agent's (a unit of ours is sandboxed, and what it starts
dies with it), and outlives the agent. Without systemd the process is started detached instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from jeepney import DBusAddress
from jeepney.io.blocking import DBusConnection

from ..bus import BusError, call, prop, system_bus

_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")
_UNIT = f"{_SYSTEMD}.Unit"
_POLL = 0.02
# Where a command line's bare program name is looked for (ifup starts "dhclient" through sh).
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TransientError(Exception):
    pass


def systemd_runs() -> bool:
    """sd_booted(): systemd is PID 1 (of this mount namespace's view)."""
    return Path("/run/systemd/system").is_dir()


def start_service(
    name: str, argv: Sequence[str], description: str, until: float, *, forking: str | None
) -> None:
    """Start `argv` as the transient service `name`, or detached where systemd does not run.
    `forking`: None for a program that stays in the foreground (returns once it was executed),
    else the pid file of one that forks when it is ready ("": none; returns once it forked)."""
    path = shutil.which(argv[0], path=_PATH)
    if path is None:
        raise TransientError(f"{argv[0]} is not installed (looked in {_PATH})")
    if not systemd_runs():
        _spawn_detached([path, *argv[1:]])
        return
    properties = [
        ("Description", ("s", description)),
        ("ExecStart", ("a(sasb)", [(path, list(argv), False)])),
        ("Type", ("s", "exec" if forking is None else "forking")),
        *([("PIDFile", ("s", forking))] if forking else []),
        # A client that exits (or fails) leaves no unit behind to block the name next time.
        ("CollectMode", ("s", "inactive-or-failed")),
    ]
    try:
        with system_bus() as conn:
            call(
                conn,
                _MANAGER,
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
                name,
                "fail",
                properties,
                [],
                timeout=_left(until),
            )
            _wait_active(conn, name, until)
    except BusError as e:
        raise TransientError(f"systemd could not start {name}: {e}") from e


def _wait_active(conn: DBusConnection, name: str, until: float) -> None:
    """Until the unit is active; its start job done and the unit not active is a failure."""
    state = "unknown"
    while time.monotonic() < until:
        try:
            path = call(conn, _MANAGER, "GetUnit", "s", name)[0]
            state = prop(conn, _SYSTEMD, path, _UNIT, "ActiveState")
            job = prop(conn, _SYSTEMD, path, _UNIT, "Job")[0]  # (id, path): id 0 when none
        except BusError:
            state, job = "gone", 0  # collected: it ran and ended already
        if state == "active":
            return
        if state in ("failed", "gone") or (state == "inactive" and not job):
            break
        time.sleep(_POLL)
    raise TransientError(f"{name} is {state}, not running")


def _spawn_detached(argv: Sequence[str]) -> None:
    """In a session of its own, with nothing of ours open: it outlives the agent."""
    with open(os.devnull, "r+b") as null:
        subprocess.Popen(list(argv), stdin=null, stdout=null, stderr=null, start_new_session=True)


def _left(until: float) -> float:
    return max(0.1, until - time.monotonic())
