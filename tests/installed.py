"""The installed units as a booted lab host gets them (tests/test_systemd.py, test_handover.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(Path(sys.executable).with_name("bridge-migrate"))


def installed_units() -> dict[str, str]:
    """units/*.service with the agent's path, as scripts/install writes them."""
    units = {p.name: p.read_text().replace("@BIN@", AGENT) for p in (ROOT / "units").iterdir()}
    # The units' PrivateTmp= hides /tmp, where a CI checkout (and so the agent) may live; the
    # "bridge-migrate-" prefix also reaches the transient units the agent starts.
    checkout = f"[Service]\nBindReadOnlyPaths={ROOT}\n"
    drop_ins = {
        f"{name}.d/checkout.conf": checkout
        for name in ("bridge-migrate.service", "bridge-migrate-.service")
    }
    return {**units, **drop_ins}
