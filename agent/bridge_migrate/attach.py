"""`attach` and `detach`: pipework's job on the bridge, checked, verified and undoable.

attach: every check first (exit 3, nothing changed); the record's entry is written before the
first change (so `detach` finds whatever a killed agent left); then one veth pair, its guest end
created directly inside the guest's namespace under its final name; the host end joins the bridge;
the guest end gets the addresses and a default route per gateway; the gateway is asked from inside
the guest. Anything failing removes the pair, which takes the guest's addresses and routes with it,
and the entry (exit 4). Under the same locks as `apply`: never during a takeover.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bridgefilter, guestbook, lanprobe
from .attachment import Attachment, AttachSpec, GuestAddress, host_end_name
from .checkpoint import Interrupted, signal_guard
from .contract import ExitCode, StageName
from .errors import Refused
from .guest import Guest, GuestSpec, entered, resolved, with_netlink
from .model import IFA_F_NODAD
from .preflight import check_root
from .probes import Probe, ProbeKind
from .progress import Progress
from .record import Store
from .verify import run_probes

IFF_UP = 0x1


@dataclass(frozen=True)
class AttachRequest:
    guest: GuestSpec
    spec: AttachSpec
    timeout: float
    force_prefix: bool
    replace: bool


@dataclass(frozen=True)
class BridgeView:
    """The bridge as attach needs it."""

    name: str
    index: int
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]


class NotVerified(Exception):
    pass


def attach(req: AttachRequest, store: Store, progress: Progress) -> ExitCode:
    check_root()
    progress.bind(bridge=req.spec.bridge)
    with store.lock():
        _refuse_pending(store)
        with resolved(req.guest) as guest, IPRoute() as ipr:
            return _attach(req, store, progress, guest, ipr)


def _attach(
    req: AttachRequest, store: Store, progress: Progress, guest: Guest, ipr: IPRoute
) -> ExitCode:
    spec = req.spec
    attached = guestbook.load(store)
    old = _entry(attached, guest, spec.ifname)
    if old is not None and not _intact(ipr, guest, old):
        _remove(ipr, old)  # a half left by hand: the pair is ours, whatever became of its end
        old, attached = None, tuple(a for a in attached if a is not old)
    if old is not None and old.spec == spec:
        progress.finish(ExitCode.OK, "already attached", f"{old}; nothing to do")
        return ExitCode.OK
    if old is not None and not req.replace:
        raise Refused(
            f"{guest.spec} {spec.ifname} is attached already, otherwise: {old}",
            "give --replace to replace it, or `bridge-migrate detach` it first",
        )
    bridge = _bridge(ipr, spec.bridge, attached)
    _check(req, guest, ipr, bridge, attached, old)
    entry = Attachment(
        guest=str(guest.spec),
        netns_inode=guest.inode,
        spec=spec,
        host_end=host_end_name(guest.inode, spec.ifname),
        guest_mac=spec.mac or _random_mac(),
        mtu=spec.mtu or bridge.mtu,
    )
    progress.stage(
        StageName.CHECK, subject=str(guest.spec), counts=(("address(es)", len(spec.addresses)),)
    )
    kept = tuple(a for a in attached if a is not old)
    guestbook.save(store, (*kept, entry))
    if old is not None:
        _remove(ipr, old)
    # SIGTERM, SIGHUP or SIGINT from here on removes what was added, as a failure does.
    with signal_guard() as guard:
        try:
            _make(ipr, guest, entry, bridge, progress)
            _verify(guest, entry, bridge, req.timeout, progress)
        except (NotVerified, Interrupted, OSError, NetlinkError) as e:
            guard.armed = False  # the removal runs to its end
            return _roll_back(ipr, store, progress, guest, kept, entry, old, bridge, str(e))
        guard.armed = False
    progress.attach("attached", entry)
    progress.finish(ExitCode.OK, "attached", str(entry))
    return ExitCode.OK


def _roll_back(
    ipr: IPRoute,
    store: Store,
    progress: Progress,
    guest: Guest,
    kept: tuple[Attachment, ...],
    entry: Attachment,
    old: Attachment | None,
    bridge: BridgeView,
    why: str,
) -> ExitCode:
    _remove(ipr, entry)
    if old is not None:  # --replace: the one it replaced comes back as it was
        _make(ipr, guest, old, bridge, progress)
    guestbook.save(store, (*kept, old) if old is not None else kept)
    back = f"; {old} put back" if old is not None else ""
    progress.stage(StageName.ROLLBACK, subject=entry.host_end)
    progress.finish(
        ExitCode.ROLLED_BACK, "rolled back", f"{why}; everything attach added was removed{back}"
    )
    return ExitCode.ROLLED_BACK


def detach(spec: GuestSpec, ifname: str, store: Store, progress: Progress) -> ExitCode:
    check_root()
    with store.lock():
        _refuse_pending(store)
        attached = guestbook.load(store)
        with IPRoute() as ipr, _maybe_resolved(spec) as guest:
            entry = _entry(attached, guest, ifname) if guest else None
            entry = entry or next(
                (a for a in attached if a.guest == str(spec) and a.spec.ifname == ifname), None
            )
            if entry is None:
                progress.finish(ExitCode.OK, "nothing to do", f"{spec} {ifname} is not attached")
                return ExitCode.OK
            if (
                guest is not None
                and _guest_link(guest, ifname, entry.guest_mac) is None
                and _host_end(ipr, entry)
            ):
                raise Refused(
                    f"{spec} has no {ifname} with MAC {entry.guest_mac} any more, but "
                    f"{entry.host_end} is still on {entry.spec.bridge}: not removing what may "
                    "not be ours",
                    f"check it; `ip link del {entry.host_end}` removes the port",
                )
            removed = _remove(ipr, entry)
            guestbook.save(store, tuple(a for a in attached if a is not entry))
    what = f"removed {entry.host_end} and {ifname} in {spec}" if removed else "it was gone already"
    progress.stage(StageName.DETACH, subject=entry.host_end, acked=int(removed), total=1)
    progress.finish(ExitCode.OK, "detached", f"{entry}: {what}")
    return ExitCode.OK


@contextmanager
def _maybe_resolved(spec: GuestSpec) -> Iterator[Guest | None]:
    """The guest, or None if it is gone (a stopped container: its interfaces went with it)."""
    with ExitStack() as stack:
        try:
            guest: Guest | None = stack.enter_context(resolved(spec))
        except Refused:
            guest = None
        yield guest


# -- checks ------------


def _refuse_pending(store: Store) -> None:
    tx = store.load()
    if tx is not None and tx.phase.pending:
        raise Refused(
            f"transaction {tx.id} ({tx.plan.nic} -> {tx.plan.bridge}) is {tx.phase}",
            "wait until it is committed or rolled back (`bridge-migrate status`)",
        )


def _bridge(ipr: IPRoute, name: str, attached: tuple[Attachment, ...]) -> BridgeView:
    links = {m.get("IFLA_IFNAME"): m for m in ipr.get_links()}
    msg = links.get(name)
    if msg is None or msg.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) != "bridge":
        what = "no such device" if msg is None else "not a bridge"
        raise Refused(
            f"{name}: {what}", f"take the host over first: `bridge-migrate apply --bridge {name}`"
        )
    guests = {a.host_end for a in attached}
    ports = [n for n, m in links.items() if m.get("IFLA_MASTER") == msg["index"]]
    if not [p for p in ports if p not in guests]:
        raise Refused(
            f"{name} has no uplink port (ports: {', '.join(ports) or 'none'}): a guest on it "
            "would reach nothing beyond the host",
            f"take the host over first: `bridge-migrate apply --bridge {name}`",
        )
    addresses = tuple(
        ipaddress.ip_interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
        for m in ipr.get_addr(index=msg["index"])
    )
    return BridgeView(name, msg["index"], msg.get("IFLA_MTU"), addresses)


def _check(
    req: AttachRequest,
    guest: Guest,
    ipr: IPRoute,
    bridge: BridgeView,
    attached: tuple[Attachment, ...],
    old: Attachment | None,
) -> None:
    spec = req.spec
    if old is None and _guest_link(guest, spec.ifname, None) is not None:
        raise Refused(f"{spec.ifname} exists in {guest.spec} already", "choose another --ifname")
    for a in spec.addresses:
        if not req.force_prefix and not any(a.interface.ip in b.network for b in bridge.addresses):
            on = ", ".join(str(b) for b in bridge.addresses) or "no address"
            raise Refused(
                f"{a.address} is not in a prefix that {bridge.name} is on ({on}): the guest could "
                "not reach the host or the LAN there",
                "give an address in the host's prefix, or --force-prefix if the LAN routes it",
            )
    _check_in_use(ipr, bridge, spec, attached, old)
    problems = bridgefilter.refusals(bridge.name, {a.version for a in spec.addresses})
    if problems:
        raise Refused("; ".join(problems))


def _check_in_use(
    ipr: IPRoute,
    bridge: BridgeView,
    spec: AttachSpec,
    attached: tuple[Attachment, ...],
    old: Attachment | None,
) -> None:
    own = {m.get("IFA_ADDRESS") for m in ipr.get_addr()} | {
        m.get("IFA_LOCAL") for m in ipr.get_addr()
    }
    ours = {a.address for a in old.spec.addresses} if old else set()
    for a in spec.addresses:
        if a.address in own:
            raise Refused(f"{a.address} is the host's own address", "give the guest another")
        holder = next(
            (
                g
                for g in attached
                if g is not old and a.address in {x.address for x in g.spec.addresses}
            ),
            None,
        )
        if holder is not None:
            raise Refused(f"{a.address} is attached already: {holder}", "give the guest another")
        if a.address in ours:
            continue  # the interface being replaced holds it: it would answer for itself
        mac = lanprobe.in_use(bridge.name, a.address)
        if mac is not None:
            how = "ARP probe" if a.version == 4 else "duplicate address detection"
            raise Refused(
                f"{a.address} is in use on the LAN: {mac} answered the {how} on {bridge.name}",
                "give the guest a free address",
            )


# -- the changes ------------


def _make(
    ipr: IPRoute, guest: Guest, entry: Attachment, bridge: BridgeView, progress: Progress
) -> None:
    spec = entry.spec
    peer = {
        "ifname": spec.ifname,
        "net_ns_fd": guest.fd,
        "address": entry.guest_mac,
        "mtu": entry.mtu,
    }
    ipr.link("add", ifname=entry.host_end, kind="veth", mtu=entry.mtu, peer=peer)
    (index,) = ipr.link_lookup(ifname=entry.host_end)
    ipr.link("set", index=index, master=bridge.index, state="up")
    with_netlink(guest, lambda inside: _configure(inside, spec))
    progress.stage(StageName.ATTACH, subject=entry.host_end)


def _configure(inside: IPRoute, spec: AttachSpec) -> None:
    """Inside the guest: its end up, the addresses, a default route per gateway."""
    (index,) = inside.link_lookup(ifname=spec.ifname)
    inside.link("set", index=index, state="up")
    for a in spec.addresses:
        # IPv6 without DAD: the address was probed on the LAN before (lanprobe), and DAD
        # would leave it unusable for a second.
        flags = IFA_F_NODAD if a.version == 6 else 0
        inside.addr("add", index=index, address=a.address, prefixlen=a.prefixlen, flags=flags)
    for a in spec.addresses:
        if a.gateway:
            dst = "0.0.0.0/0" if a.version == 4 else "::/0"
            inside.route("add", dst=dst, gateway=a.gateway, oif=index)


def _remove(ipr: IPRoute, entry: Attachment) -> bool:
    """Delete the pair from the host end: the guest end, its addresses and routes go with it.
    False if it was gone."""
    found = _host_end(ipr, entry)
    if found is None:
        return False
    with suppress(NetlinkError):  # gone meanwhile (its guest ended)
        ipr.link("del", index=found)
    return True


def _verify(
    guest: Guest, entry: Attachment, bridge: BridgeView, timeout: float, progress: Progress
) -> None:
    probes = _probes(entry, bridge)
    if not probes:
        progress.stage(StageName.VERIFY, acked=0, total=0)  # no gateway, not on the prefix
        return
    deadline = time.monotonic() + timeout
    with entered(guest):
        results = run_probes(probes, deadline, progress.ping)
    silent = [r.probe for r in results if not r.ok]
    for r in results:
        progress.note(f"{r.probe.spec} {'ok' if r.ok else 'silent'} in {r.seconds * 1000:.0f} ms")
    progress.stage(
        StageName.VERIFY,
        acked=len(results) - len(silent),
        total=len(results),
        problems=tuple(p.spec for p in silent),
    )
    if silent:
        names = ", ".join(p.target for p in silent)
        raise NotVerified(f"from inside {guest.spec}, {names} did not answer within {timeout:g} s")


def _probes(entry: Attachment, bridge: BridgeView) -> tuple[Probe, ...]:
    """The gateway of each address; for one without, the host's own address on its prefix."""
    probes = []
    for a in entry.spec.addresses:
        target = a.gateway or _host_on(bridge, a)
        if target is not None:
            kind: ProbeKind = "arp" if a.version == 4 else "icmp"
            probes.append(Probe(kind, target, source=a.address, dev=entry.spec.ifname))
    return tuple(probes)


def _host_on(bridge: BridgeView, a: GuestAddress) -> str | None:
    return next((str(b.ip) for b in bridge.addresses if a.interface.ip in b.network), None)


# -- reading ------------


def _entry(attached: tuple[Attachment, ...], guest: Guest, ifname: str) -> Attachment | None:
    return next(
        (a for a in attached if a.netns_inode == guest.inode and a.spec.ifname == ifname), None
    )


def _intact(ipr: IPRoute, guest: Guest, entry: Attachment) -> bool:
    """Both ends are there as attach left them (not, say, a restarted guest)."""
    return (
        _host_end(ipr, entry) is not None
        and _guest_link(guest, entry.spec.ifname, entry.guest_mac) is not None
    )


def _host_end(ipr: IPRoute, entry: Attachment) -> int | None:
    for m in ipr.get_links():
        if (
            m.get("IFLA_IFNAME") == entry.host_end
            and m.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth"
        ):
            return int(m["index"])
    return None


def _guest_link(guest: Guest, ifname: str, mac: str | None) -> int | None:
    """The index of `ifname` in the guest (with MAC `mac`, if given); None if there is none."""

    def find(inside: IPRoute) -> int | None:
        for m in inside.get_links():
            if m.get("IFLA_IFNAME") == ifname and (mac is None or m.get("IFLA_ADDRESS") == mac):
                return int(m["index"])
        return None

    return with_netlink(guest, find)


def _random_mac() -> str:
    octets = [0x02, *secrets.token_bytes(5)]  # locally administered, unicast
    return ":".join(f"{o:02x}" for o in octets)
