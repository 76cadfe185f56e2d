"""cloud-init: told not to write the network configuration again, so that what it rendered, once
handed over by the manager that reads it (netplan's YAML, networkd's or ifupdown's files), is
not put back from the datasource at the next boot. The file it is told in is cloud-init's own
documented switch; rollback removes it. cloud-init itself does not run after boot: nothing to
adopt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from ..model import HostState
from .files import ABSENT, FileChange, FileState, read_state

DISABLE = "/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg"
_TEXT = (
    "# Written by bridge-migrate: {nic} was handed over to {bridge} in {rendered};\n"
    "# cloud-init must not write the network configuration again from its datasource.\n"
    "network: {{config: disabled}}\n"
)


@dataclass(frozen=True)
class CloudInitView:
    nic: str
    rendered: str  # what cloud-init rendered for the NIC (its netplan file, ...)
    disable: FileState  # DISABLE as it is


@dataclass(frozen=True)
class CloudInitAdoption:
    nic: str
    bridge: str


def read(rendered: str, nic: str) -> CloudInitView:
    return CloudInitView(nic, rendered, read_state(DISABLE))


def plan(view: CloudInitView, state: HostState, bridge: str) -> tuple[FileChange, ...] | str:
    if view.disable.exists:
        return (
            f"{DISABLE} exists and does not disable the network configuration: add "
            "`network: {config: disabled}` to it yourself"
        )
    rendered = ", ".join(PurePosixPath(p).name for p in view.rendered.split(", "))
    text = _TEXT.format(nic=state.nic.name, bridge=bridge, rendered=rendered)
    return (FileChange(DISABLE, ABSENT, FileState(text, 0o644)),)


def adopt(a: CloudInitAdoption, until: float) -> None:
    """cloud-init reads its configuration at the next boot: nothing runs now."""


def readopt(a: CloudInitAdoption, until: float) -> None:
    """As adopt: the restored file (none) is what the next boot reads."""
