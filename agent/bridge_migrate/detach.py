"""Run `apply` from an interactive shell as its own systemd unit, and show its progress here.

Over SSH the shell's session scope dies with the connection; a transaction in its own unit does
not. This process only follows the unit's journal and passes on its exit code: a hang-up kills
the follower, never the transaction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence

from . import deadman, sandbox
from .record import Store

_DRAIN = 2.0  # at most this long for the unit's last journal lines, once it ended
_QUIET = 0.2  # they are all in once the journal has been quiet this long


def wanted() -> bool:
    """Interactive, under a systemd PID 1, and not already inside a unit."""
    return (
        sys.stdin.isatty()
        and "INVOCATION_ID" not in os.environ
        and deadman.locate().available
        and os.path.exists("/run/systemd/journal/socket")
    )


def run_as_unit(store: Store, argv: Sequence[str]) -> int:
    """Run `bridge-migrate ARGV` (on `store`) as a transient service; stream its output;
    return its code."""
    # The sandbox binds the state directory in, so it must exist; the lock makes it as the
    # agent would (and refuses here already if another agent is working).
    with store.lock():
        pass
    unit = f"bridge-migrate-apply-{uuid.uuid4().hex[:8]}"
    command = [
        "systemd-run",
        "--quiet",
        "--wait",
        "--collect",
        f"--unit={unit}",
        "--description=bridge-migrate apply (started from a terminal)",
        "--setenv=PYTHONUNBUFFERED=1",
        "--property=Type=exec",
        *sandbox.run_properties(sandbox.APPLY, store.directory),
    ]
    netns = deadman.locate().netns_path
    if netns:
        command.append(f"--property=NetworkNamespacePath={netns}")
    print(f"bridge-migrate: running as {unit}.service; a hang-up here does not stop it")
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(f"{unit}.service", stop), daemon=True)
    follower.start()
    done = subprocess.run([*command, "--", sys.executable, "-m", "bridge_migrate", *argv])
    stop.set()
    follower.join(timeout=_DRAIN)
    return done.returncode


def _follow(unit: str, stop: threading.Event) -> None:
    from systemd import journal

    reader = journal.Reader()
    reader.this_boot()
    reader.add_match(_SYSTEMD_UNIT=unit)
    reader.seek_head()
    quiet = 0.0  # after the unit ended: its last lines may still be on their way to the journal
    while not stop.is_set() or quiet < _QUIET:
        for entry in reader:
            print(entry.get("MESSAGE", ""), flush=True)
            quiet = 0.0
        if reader.wait(0.1) == journal.NOP and stop.is_set():
            quiet += 0.1
