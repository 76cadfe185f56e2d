"""The hand-over: the NIC's manager is given the bridge in its own terms, inside the
transaction, so that nothing undoes the takeover when the manager restarts, reloads, renews a
lease or boots.

For each owner: `read` what the manager has (I/O, before the snapshot), `plan` the files it
needs rewritten and how it adopts the new state (pure), and, in the transaction, after the
netlink takeover: write the files, then `adopt`. The way back: the files are restored first,
the netlink inverses run, and `readopt` comes last, so the manager configures the NIC again from
its own files. One module per manager; this one dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from ..model import HostState
from ..owner import Manager, Owner
from . import clients, cloudinit, ifupdown, netplan, networkd, networkmanager
from .files import ABSENT, FileChange, FileState

WAIT = 20.0  # seconds a manager has to configure the NIC again in a rollback

View = (
    networkd.NetworkdView
    | networkmanager.NetworkManagerView
    | netplan.NetplanView
    | cloudinit.CloudInitView
    | clients.DhcpcdView
    | ifupdown.IfupdownView
    | clients.DhclientView
)
Adoption = (
    networkd.NetworkdAdoption
    | networkmanager.NetworkManagerAdoption
    | netplan.NetplanAdoption
    | cloudinit.CloudInitAdoption
    | clients.DhcpcdAdoption
    | ifupdown.IfupdownAdoption
    | clients.DhclientAdoption
)


@dataclass(frozen=True)
class Handover:
    manager: Manager
    files: tuple[FileChange, ...]
    adoption: Adoption
    notes: tuple[str, ...] = ()  # for `plan`: what the hand-over does that is worth knowing


@dataclass(frozen=True)
class Reading:
    views: tuple[View, ...]
    unsupported: tuple[Owner, ...]  # owners no hand-over is known for: refused by owner.py


# The unit that configures the NIC from the manager's files at boot. While a transaction is
# pending, a drop-in has it run `bridge-migrate recover` first: after a restart in the middle of
# one, the manager's files are put back before the manager reads them.
BOOT_UNITS = {
    Manager.NETWORKD: "systemd-networkd.service",
    Manager.NETWORKMANAGER: "NetworkManager.service",
    Manager.IFUPDOWN: "networking.service",
}
RECOVER = (
    "# Written by bridge-migrate while a transaction is pending, removed when it ends: after a\n"
    "# restart in the middle of one, the network manager's files go back before it starts.\n"
    "[Service]\nExecStartPre=+-bridge-migrate recover\n"
)


def recover_drop_ins(managers: set[Manager]) -> tuple[FileChange, ...]:
    units = sorted({BOOT_UNITS[m] for m in managers if m in BOOT_UNITS})
    return tuple(
        FileChange(
            f"/etc/systemd/system/{unit}.d/bridge-migrate-recover.conf", ABSENT, FileState(RECOVER)
        )
        for unit in units
    )


class HandoverError(Exception):
    """The manager did not take the new state (or the old one back) as it should."""


def read(owners: tuple[Owner, ...], nic: str, bridge: str, ifindex: int) -> Reading:
    views: list[View] = []
    unsupported: list[Owner] = []
    for owner in owners:
        match owner.manager:
            case Manager.NETWORKD if not owner.generator:
                views.append(networkd.read(owner.source, nic, bridge, ifindex))
            case Manager.NETWORKD:  # its files are netplan's rendering
                views.append(netplan.read(owner.source, nic, bridge, ifindex))
            case Manager.NETWORKMANAGER:
                views.append(networkmanager.read(nic, bridge))
            case Manager.CLOUD_INIT:
                views.append(cloudinit.read(owner.source, nic))
            case Manager.DHCPCD:
                views.extend(clients.dhcpcd_read(nic))
            case Manager.IFUPDOWN:
                views.append(ifupdown.read(nic, bridge))
            case Manager.DHCLIENT:
                views.append(clients.dhclient_read(nic, bridge))
            case _:
                assert_never(owner.manager)
    return Reading(tuple(views), tuple(unsupported))


def plan(view: View, state: HostState, bridge: str) -> Handover | str:
    """The hand-over, or why it cannot be made (with nothing changed)."""
    match view:
        case networkd.NetworkdView():
            files = networkd.plan(view, state, bridge)
            if isinstance(files, str):
                return files
            bridge_network = files[1].path
            adoption = networkd.NetworkdAdoption(
                view.nic, bridge, bridge_network, view.network_file
            )
            return Handover(Manager.NETWORKD, files, adoption)
        case networkmanager.NetworkManagerView():
            planned = networkmanager.plan(view, state, bridge)
            if isinstance(planned, str):
                return planned
            return Handover(Manager.NETWORKMANAGER, *planned)
        case netplan.NetplanView():
            changes = netplan.plan(view, state, bridge)
            if isinstance(changes, str):
                return changes
            return Handover(Manager.NETWORKD, changes, netplan.adoption(view, state, bridge))
        case cloudinit.CloudInitView():
            changes = cloudinit.plan(view, state, bridge)
            if isinstance(changes, str):
                return changes
            told = cloudinit.CloudInitAdoption(view.nic, bridge)
            return Handover(Manager.CLOUD_INIT, changes, told)
        case clients.DhcpcdView():
            # No file changes: a hand-started dhcpcd has none naming the NIC (its lease files
            # move with the client, in adopt and readopt, as renewed by then).
            dhcpcd = clients.dhcpcd_plan(view, state, bridge)
            if isinstance(dhcpcd, str):
                return dhcpcd
            return Handover(Manager.DHCPCD, (), dhcpcd, clients.dhcpcd_notes(dhcpcd))
        case ifupdown.IfupdownView():
            changes = ifupdown.plan(view, state, bridge)
            if isinstance(changes, str):
                return changes
            return Handover(Manager.IFUPDOWN, changes, ifupdown.adoption(view, state, bridge))
        case clients.DhclientView():
            # No file changes either: its lease file moves with it (adopt and readopt).
            moves = clients.dhclient_plan(view, state, bridge)
            if isinstance(moves, str):
                return moves
            return Handover(Manager.DHCLIENT, (), moves, clients.dhclient_notes(moves))
        case _:
            assert_never(view)


def manager_of(view: View) -> Manager:
    match view:
        case networkd.NetworkdView() | netplan.NetplanView():
            return Manager.NETWORKD
        case networkmanager.NetworkManagerView():
            return Manager.NETWORKMANAGER
        case cloudinit.CloudInitView():
            return Manager.CLOUD_INIT
        case clients.DhcpcdView():
            return Manager.DHCPCD
        case ifupdown.IfupdownView():
            return Manager.IFUPDOWN
        case clients.DhclientView():
            return Manager.DHCLIENT
        case _:
            assert_never(view)


def manager_of_adoption(a: Adoption) -> Manager:
    match a:
        case networkd.NetworkdAdoption() | netplan.NetplanAdoption():
            return Manager.NETWORKD
        case networkmanager.NetworkManagerAdoption():
            return Manager.NETWORKMANAGER
        case cloudinit.CloudInitAdoption():
            return Manager.CLOUD_INIT
        case clients.DhcpcdAdoption():
            return Manager.DHCPCD
        case ifupdown.IfupdownAdoption():
            return Manager.IFUPDOWN
        case clients.DhclientAdoption():
            return Manager.DHCLIENT
        case _:
            assert_never(a)


_ERRORS = (
    networkd.NetworkdError,
    networkmanager.NetworkManagerError,
    netplan.NetplanError,
    clients.DhcpcdError,
    ifupdown.IfupdownError,
    clients.DhclientError,
)


def adopt(a: Adoption, until: float) -> None:
    """The manager takes the bridge; `until` (monotonic) bounds the wait for it."""
    try:
        match a:
            case networkd.NetworkdAdoption():
                networkd.adopt(a, until)
            case networkmanager.NetworkManagerAdoption():
                networkmanager.adopt(a, until)
            case netplan.NetplanAdoption():
                netplan.adopt(a, until)
            case cloudinit.CloudInitAdoption():
                cloudinit.adopt(a, until)
            case clients.DhcpcdAdoption():
                clients.dhcpcd_adopt(a, until)
            case ifupdown.IfupdownAdoption():
                ifupdown.adopt(a, until)
            case clients.DhclientAdoption():
                clients.dhclient_adopt(a, until)
            case _:
                assert_never(a)
    except _ERRORS as e:
        raise HandoverError(str(e)) from e


def restored(a: Adoption, until: float) -> None:
    """The manager's files are back after a restart cut a transaction short, before the manager
    starts (`bridge-migrate recover`): what was rendered from the rewritten ones at boot is
    rendered again from them."""
    try:
        match a:
            case netplan.NetplanAdoption():
                netplan.generate(until)  # its generator ran at boot, on the rewritten YAML
            case (
                networkd.NetworkdAdoption()
                | networkmanager.NetworkManagerAdoption()
                | cloudinit.CloudInitAdoption()
                | clients.DhcpcdAdoption()
                | ifupdown.IfupdownAdoption()
                | clients.DhclientAdoption()
            ):
                pass  # they read their files when they start
            case _:
                assert_never(a)
    except _ERRORS as e:
        raise HandoverError(str(e)) from e


def release(a: Adoption, until: float) -> None:
    """The manager lets go of the bridge, before the rollback's netlink inverses."""
    try:
        match a:
            case networkd.NetworkdAdoption() | netplan.NetplanAdoption():
                pass  # networkd reads its files only when told (readopt): nothing to let go
            case networkmanager.NetworkManagerAdoption():
                networkmanager.release(a, until)
            case cloudinit.CloudInitAdoption():
                pass  # it runs at boot only
            case clients.DhcpcdAdoption():
                clients.dhcpcd_release(a, until)
            case ifupdown.IfupdownAdoption():
                pass  # no daemon: its files and its state are all it has
            case clients.DhclientAdoption():
                clients.dhclient_release(a, until)
            case _:
                assert_never(a)
    except _ERRORS as e:
        raise HandoverError(str(e)) from e


def readopt(a: Adoption, until: float) -> None:
    try:
        match a:
            case networkd.NetworkdAdoption():
                networkd.readopt(a, until)
            case networkmanager.NetworkManagerAdoption():
                networkmanager.readopt(a, until)
            case netplan.NetplanAdoption():
                netplan.readopt(a, until)
            case cloudinit.CloudInitAdoption():
                cloudinit.readopt(a, until)
            case clients.DhcpcdAdoption():
                clients.dhcpcd_readopt(a, until)
            case ifupdown.IfupdownAdoption():
                ifupdown.readopt(a, until)
            case clients.DhclientAdoption():
                clients.dhclient_readopt(a, until)
            case _:
                assert_never(a)
    except _ERRORS as e:
        raise HandoverError(str(e)) from e
