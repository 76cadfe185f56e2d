"""Test-only failpoints: the agent SIGKILLs itself at the step boundary that
BRIDGE_MIGRATE_TEST_KILL_AT names (planned, bridge, applying, batch, verifying, verified,
committed), so tests can prove that no boundary leaves the host half-migrated."""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "BRIDGE_MIGRATE_TEST_KILL_AT"


def boundary(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
