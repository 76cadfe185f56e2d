"""Probes that prove the host talks on its new path, retried until a deadline.

The gateway is asked at layer 2 for IPv4 (an ARP request on the bridge: needs no route, answers
where ICMP is filtered, and its reply resolves the kernel's entry as a side effect) and by ICMPv6
echo from the moved global address for IPv6 (works while the bridge's link-local is tentative).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, retry_if_result, stop_when_event_set, wait_fixed
from tenacity.stop import stop_base

from . import dump
from .model import AF_INET, AF_INET6, RT_TABLE_MAIN, HostState
from .probes import Probe

ETH_P_ARP = 0x0806
_ATTEMPT_WAIT = 0.1  # how long one attempt waits for its answer before asking again
_PAUSE = 0.02  # between attempts


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    ok: bool
    attempts: int
    seconds: float  # from the start of verification to the answer (or to giving up)


def run_probes(
    probes: tuple[Probe, ...], deadline: float, on_attempt: Callable[[], None]
) -> tuple[ProbeResult, ...]:
    """Each probe retried until it answers or the monotonic `deadline` passes; `on_attempt`
    is called before each try (a watchdog ping)."""
    with probing(probes, deadline, on_attempt) as results:
        return results()


@contextmanager
def probing(
    probes: tuple[Probe, ...], deadline: float, on_attempt: Callable[[], None]
) -> Iterator[Callable[[], tuple[ProbeResult, ...]]]:
    """The probes running in the background while the body does other work; what it is given
    waits for their results. Leaving stops them, within one attempt (also when the body
    raises: a rollback starts at once, not at the deadline)."""
    started = time.monotonic()
    stop = threading.Event()
    # Concurrently: one silent target must not eat the others' time.
    pool = ThreadPoolExecutor(max_workers=max(1, len(probes)))
    try:
        running = [pool.submit(_run_until, p, started, deadline, on_attempt, stop) for p in probes]
        yield lambda: tuple(f.result() for f in running)
    finally:
        stop.set()
        pool.shutdown(wait=True)


def _run_until(
    probe: Probe,
    started: float,
    deadline: float,
    on_attempt: Callable[[], None],
    stop: threading.Event,
) -> ProbeResult:
    attempts = 0
    asker = _ASKERS[probe.kind](probe)

    def attempt() -> bool:
        nonlocal attempts
        attempts += 1
        on_attempt()
        wait = max(0.001, min(_ATTEMPT_WAIT, deadline - time.monotonic()))
        try:
            return asker.ask(wait)
        except OSError:
            return False

    retrying = Retrying(
        stop=_StopBefore(deadline) | stop_when_event_set(stop),
        wait=wait_fixed(_PAUSE),
        retry=retry_if_result(lambda ok: not ok),
        retry_error_callback=lambda _state: False,
    )
    try:
        ok = bool(retrying(attempt))
    finally:
        asker.close()
    return ProbeResult(probe, ok, attempts, time.monotonic() - started)


class _StopBefore(stop_base):
    """tenacity's stop_before_delay (8.3+; Debian 12 has 8.2.1): stop rather than pause past
    the (monotonic) deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() + _PAUSE >= self.deadline


class _Asker:
    """One socket per probe, kept across attempts."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.sock: socket.socket | None = None

    def ask(self, wait: float) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        # Closing a packet socket waits for an RCU grace period (22-45 ms measured): do it
        # off the critical path.
        if self.sock is not None:
            threading.Thread(target=self.sock.close, daemon=True).start()


class _ArpAsker(_Asker):
    def ask(self, wait: float) -> bool:
        probe = self.probe
        assert probe.dev and probe.source
        if self.sock is None:
            # Protocol 0 at first: a socket made with ETH_P_ARP hooks every device at once, and
            # binding it to one then waits out an RCU grace period to unhook (12-19 ms
            # measured); bound with the protocol, it hooks the one device, with no wait.
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.sock.bind((probe.dev, ETH_P_ARP))
        mac = self.sock.getsockname()[4]
        spa = socket.inet_aton(probe.source)
        tpa = socket.inet_aton(probe.target)
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, spa, b"\0" * 6, tpa)
        self.sock.send(b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp)
        return _await(self.sock, wait, lambda f: _is_arp_reply(f, tpa, spa))


def _is_arp_reply(frame: bytes, sender: bytes, target: bytes) -> bool:
    if len(frame) < 42:
        return False
    op, spa, tpa = struct.unpack_from("!H", frame, 20)[0], frame[28:32], frame[38:42]
    return bool(op == 2 and spa == sender and tpa == target)


class _IcmpAsker(_Asker):
    def __init__(self, probe: Probe) -> None:
        super().__init__(probe)
        self.v6 = ipaddress.ip_address(probe.target).version == 6
        self.scope = 0
        self.seq = 0

    def _open(self) -> socket.socket:
        probe = self.probe
        family, proto = (
            (AF_INET6, socket.IPPROTO_ICMPV6) if self.v6 else (AF_INET, socket.IPPROTO_ICMP)
        )
        s = socket.socket(family, socket.SOCK_RAW, proto)
        if probe.dev:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, probe.dev.encode())
            self.scope = socket.if_nametoindex(probe.dev) if self.v6 else 0
        if probe.source:
            s.bind((probe.source, 0, 0, self.scope) if self.v6 else (probe.source, 0))
        return s

    def ask(self, wait: float) -> bool:
        if self.sock is None:
            self.sock = self._open()
        self.seq = (self.seq + 1) & 0xFFFF
        ident_seq = struct.pack("!HH", os.getpid() & 0xFFFF, self.seq)
        payload = b"bridge-migrate"
        if self.v6:
            # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
            self.sock.sendto(
                b"\x80\0\0\0" + ident_seq + payload, (self.probe.target, 0, 0, self.scope)
            )
            return _await(self.sock, wait, lambda p: p[:1] == b"\x81" and p[4:8] == ident_seq)
        checksum = _checksum(b"\x08\0\0\0" + ident_seq + payload)
        self.sock.sendto(
            b"\x08\0" + struct.pack("!H", checksum) + ident_seq + payload, (self.probe.target, 0)
        )
        source = socket.inet_aton(self.probe.target)
        return _await(self.sock, wait, lambda p: _is_echo_reply_v4(p, source, ident_seq))


def _is_echo_reply_v4(packet: bytes, source: bytes, ident_seq: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    return packet[12:16] == source and icmp[:1] == b"\x00" and icmp[4:8] == ident_seq


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class _TcpAsker(_Asker):
    def ask(self, wait: float) -> bool:
        assert self.probe.port is not None
        with socket.create_connection((self.probe.target, self.probe.port), timeout=wait):
            return True


def _await(s: socket.socket, wait: float, matches: Callable[[bytes], bool]) -> bool:
    """Read from `s` until a packet `matches` or `wait` seconds pass (bounded by the clock)."""
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([s], [], [], left)
        if ready and matches(s.recv(65535)):
            return True
    return False


_ASKERS: dict[str, type[_Asker]] = {"arp": _ArpAsker, "icmp": _IcmpAsker, "tcp": _TcpAsker}


def wrong_way(current: HostState, snapshot: HostState, source: str, target: str) -> tuple[str, ...]:
    """Ask the kernel (RTM_GETROUTE) how the host itself now reaches each next hop it had on
    `source` and each prefix moved from it: through anything but `target`, its traffic would
    go out of the wrong device (a bridge port, or a bridge about to go). `current`: the host
    as just read, which has `target`'s index."""
    through = {link.name: link.index for link in (current.nic, current.bridge) if link}.get(target)
    targets = _route_targets(snapshot, source)
    found = []
    for dst, answer in zip(targets, dump.routes_to(targets), strict=True):
        if isinstance(answer, OSError):
            found.append(f"the host has no route to {dst}: {answer}")
        elif answer != through:
            found.append(f"the host sends to {dst} via {_name(answer)}, not {target}")
    return tuple(found)


def _name(index: int) -> str:
    """A device's name (a dump: asked only when the check has already failed)."""
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in dump.links()}
    return str(names.get(index, index))


def _route_targets(snapshot: HostState, source: str) -> list[str]:
    """The next hops of the moved routes in the main table, and an address in each moved
    prefix that is not the host's own."""
    own = {a.address for _, a in snapshot.addresses}
    # A link-local next hop names no device by itself: the probe bound to the bridge covers it.
    hops = dict.fromkeys(  # a thousand routes have a handful of next hops: each parsed once
        r.next_hop
        for r in snapshot.routes_on(source)
        if r.next_hop and r.table == RT_TABLE_MAIN and r.family == _family_of(r.next_hop)
    )
    targets = [h for h in hops if not ipaddress.ip_address(h).is_link_local]
    for a in snapshot.addresses_on(source):
        if not a.is_global:
            continue
        net = ipaddress.ip_interface(f"{a.address}/{a.prefixlen}").network
        spare = next((h for h in itertools.islice(map(str, net.hosts()), 4) if h not in own), None)
        if spare is not None:
            targets.append(spare)
    return list(dict.fromkeys(t for t in targets if t is not None))


def _family_of(address: str) -> int:
    return AF_INET6 if ":" in address else AF_INET
