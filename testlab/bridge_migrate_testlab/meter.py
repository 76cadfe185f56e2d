"""ICMP echo outage meter, run inside a lab namespace as
`python -m bridge_migrate_testlab.meter TARGET...`.

One process, one raw socket per address family, one select loop. Probe k of every target is due
at start + k * interval, so the schedule never drifts. Stops on SIGTERM/SIGINT, after --duration,
or (with --until-reply) once every target answered; then waits up to --late-ms for replies still
in flight and prints one JSON document (results.MeterResult) on stdout. "ready" on stderr
means the sockets are open and probing starts now.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from bridge_migrate_testlab.results import LateProbe, LostProbe, MeterResult, StreamResult

MAX_DURATION_S = 600.0  # hard cap: a forgotten meter must end by itself
MAX_TARGETS = 64
MAX_LISTED = 2000  # cap on listed lost/late probes per target
MAX_BURST = 16  # slots sent back to back when late; older ones are skipped, not crammed in
RECV_BATCH = 256  # datagrams read per socket per wake-up
DRAIN_POLL_NS = 10_000_000

_PENDING, _OK, _LATE, _ERROR = 0, 1, 2, 3
_ECHO = {4: (8, 0), 6: (128, 129)}  # family -> (request type, reply type)
_PAYLOAD = struct.Struct("!4sQ")  # run token, 64-bit sequence (the ICMP one wraps at 65536)
_SOL_RAW, _ICMP_FILTER, _ICMP6_FILTER = 255, 1, 1  # from linux/icmp.h, linux/icmpv6.h
_SO_TIMESTAMPNS = 35  # asm-generic/socket.h; timespec of two 64-bit longs on 64-bit machines
_CMSG_SPACE = socket.CMSG_SPACE(16)


@dataclass(frozen=True)
class MeterConfig:
    targets: tuple[str, ...]
    interval_ms: float = 1.0
    late_ms: float = 100.0
    duration_s: float = MAX_DURATION_S
    until_reply: bool = False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _open_socket(family: int) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    proto = socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6
    sock = socket.socket(af, socket.SOCK_RAW, proto)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)  # kernel receive times
    reply = _ECHO[family][1]
    # Let only echo replies reach us: the kernel copies every ICMP packet to every raw socket.
    if family == 4:
        sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("I", ~(1 << reply) & 0xFFFFFFFF))
    else:
        words = [0xFFFFFFFF] * 8  # a set bit blocks that type
        words[reply >> 5] &= ~(1 << (reply & 31))
        sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("8I", *words))
    return sock


class _Stream:
    """Mutable per-target state. Times: ns on the packet clock (see Meter), from the start."""

    def __init__(self, target: str, ident: int, late_ns: int) -> None:
        addr = ipaddress.ip_address(target)
        self.target = str(addr)
        self.family: int = addr.version
        self.packed = addr.packed
        self.ident = ident
        self.late_ns = late_ns
        self.sent_at: list[int] = []
        self.state = bytearray()
        self.received = self.late = self.duplicates = self.send_errors = 0
        self.rtt_sum = self.rtt_max = 0
        self.last_rx = 0
        self.gap = self.gap_at = 0
        self.late_probes: list[LateProbe] = []

    def request(self, token: bytes) -> bytes:
        seq = len(self.sent_at)
        payload = _PAYLOAD.pack(token, seq)
        header = struct.pack("!BBHHH", _ECHO[self.family][0], 0, 0, self.ident, seq & 0xFFFF)
        if self.family == 6:  # the kernel fills in the ICMPv6 checksum
            return header + payload
        csum = _checksum(header + payload)
        return header[:2] + struct.pack("!H", csum) + header[4:] + payload

    def record(self, seq: int, rx: int) -> None:
        if self.state[seq] != _PENDING:
            self.duplicates += 1
            return
        rtt = rx - self.sent_at[seq]
        if rtt > self.late_ns:
            self.state[seq] = _LATE
            self.late += 1
            if len(self.late_probes) < MAX_LISTED:
                self.late_probes.append(LateProbe(seq, self.sent_at[seq] / 1e6, rtt / 1e6))
            return
        self.state[seq] = _OK
        self.received += 1
        self.rtt_sum += rtt
        self.rtt_max = max(self.rtt_max, rtt)
        self._gap_to(rx)

    def _gap_to(self, rx: int) -> None:
        if rx - self.last_rx > self.gap:
            self.gap, self.gap_at = rx - self.last_rx, self.last_rx
        self.last_rx = max(self.last_rx, rx)

    def _longest_loss(self, end: int) -> tuple[int, int, int]:
        """(probes, ns, began at ns) of the longest run without an on-time reply."""
        best, first = (0, 0, 0), -1
        for i, st in enumerate([*self.state, _OK]):
            if st != _OK:
                first = i if first < 0 else first
                continue
            if first >= 0:
                until = self.sent_at[i] if i < len(self.sent_at) else end
                span = (i - first, until - self.sent_at[first], self.sent_at[first])
                best, first = max(best, span), -1
        return best

    def result(self, end: int) -> StreamResult:
        self._gap_to(end)
        lost = [s for s, st in enumerate(self.state) if st in (_PENDING, _ERROR)]
        run, loss, loss_at = self._longest_loss(end)
        return StreamResult(
            target=self.target,
            family=self.family,
            sent=len(self.sent_at),
            received=self.received,
            late=self.late,
            lost=len(lost),
            duplicates=self.duplicates,
            send_errors=self.send_errors,
            longest_gap_ms=self.gap / 1e6,
            longest_gap_at_ms=self.gap_at / 1e6,
            max_missed_run=run,
            longest_loss_ms=loss / 1e6,
            longest_loss_at_ms=loss_at / 1e6,
            rtt_avg_ms=self.rtt_sum / self.received / 1e6 if self.received else None,
            rtt_max_ms=self.rtt_max / 1e6 if self.received else None,
            lost_probes=tuple(LostProbe(s, self.sent_at[s] / 1e6) for s in lost[:MAX_LISTED]),
            late_probes=tuple(self.late_probes),
            truncated=len(lost) > MAX_LISTED or self.late > MAX_LISTED,
        )


class Meter:
    """The probe loop. Two clocks: the send schedule runs on CLOCK_MONOTONIC; packet times
    (send, kernel receive timestamp) on CLOCK_REALTIME, the only clock SO_TIMESTAMPNS offers,
    so that a reply the kernel took in on time is not late because this process was slow to
    read it (seen on a loaded 2-CPU machine: 100 ms scheduling stalls). A step of the wall
    clock during a run would distort packet times."""

    def __init__(self, cfg: MeterConfig) -> None:
        if not 1 <= len(cfg.targets) <= MAX_TARGETS:
            raise ValueError(f"need 1..{MAX_TARGETS} targets")
        if not 0.05 <= cfg.interval_ms <= 10_000 or cfg.late_ms <= 0:
            raise ValueError("bad interval or late threshold")
        self.cfg = cfg
        self.stop_requested = False
        self.interval = round(cfg.interval_ms * 1e6)
        self.late = round(cfg.late_ms * 1e6)
        self.duration = round(min(cfg.duration_s, MAX_DURATION_S) * 1e9)
        self.token = secrets.token_bytes(4)
        base = secrets.randbelow(0x10000)  # identifiers: ours among other raw-socket users
        self.streams = [
            _Stream(t, (base + i) & 0xFFFF, self.late) for i, t in enumerate(cfg.targets)
        ]
        self.socks = {f: _open_socket(f) for f in sorted({s.family for s in self.streams})}
        self.by_key = {(s.family, s.ident): s for s in self.streams}
        self.skipped = self.max_lag = 0
        self.t0_mono = self.t0_real = 0

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()

    def _now(self) -> int:
        return time.monotonic_ns() - self.t0_mono

    def _pkt_now(self) -> int:
        return time.time_ns() - self.t0_real

    def run(self) -> MeterResult:
        self.t0_mono, self.t0_real = time.monotonic_ns(), time.time_ns()
        slot, stopped_at, end = 0, -1, 0
        # Each pass sends, receives or sleeps until the next slot, so time bounds the loop;
        # the count guard only catches a clock that does not move.
        for _ in range((self.duration // self.interval + 2) * 64 + 100_000):
            now = self._now()
            if stopped_at < 0 and self._should_stop(now):
                stopped_at, end = now, self._pkt_now()
            if stopped_at >= 0:
                if self._drained(now, stopped_at):
                    break
                self._receive(DRAIN_POLL_NS)
                continue
            slot = self._send_due(slot, now)
            self._receive(slot * self.interval - self._now())
        if stopped_at < 0:
            stopped_at, end = self._now(), self._pkt_now()
        return MeterResult(
            interval_ms=self.cfg.interval_ms,
            late_ms=self.cfg.late_ms,
            duration_ms=stopped_at / 1e6,
            skipped_slots=self.skipped,
            max_send_lag_ms=self.max_lag / 1e6,
            streams=tuple(s.result(end) for s in self.streams),
        )

    def _should_stop(self, now: int) -> bool:
        if self.stop_requested or now >= self.duration:
            return True
        return self.cfg.until_reply and all(s.received + s.late for s in self.streams)

    def _drained(self, now: int, stopped_at: int) -> bool:
        if self.cfg.until_reply or now - stopped_at >= self.late:
            return True
        recent = self.late // self.interval + 1
        return all(_PENDING not in s.state[-recent:] for s in self.streams)

    def _send_due(self, slot: int, now: int) -> int:
        due = now // self.interval + 1 - slot  # slots 0..now//interval are due
        if due > 0:
            self.max_lag = max(self.max_lag, now - slot * self.interval)
        if due > MAX_BURST:
            self.skipped += due - MAX_BURST
            slot += due - MAX_BURST
            due = MAX_BURST
        for _ in range(max(due, 0)):
            for s in self.streams:
                self._send(s)
            slot += 1
        return slot

    def _send(self, s: _Stream) -> None:
        packet = s.request(self.token)
        s.sent_at.append(self._pkt_now())
        s.state.append(_PENDING)
        try:
            self.socks[s.family].sendto(packet, (s.target, 0))
        except OSError:  # e.g. ENETUNREACH while a route is gone: that probe is lost
            s.send_errors += 1
            s.state[-1] = _ERROR

    def _receive(self, wait_ns: int) -> None:
        socks = list(self.socks.values())
        readable, _, _ = select.select(socks, [], [], max(wait_ns, 0) / 1e9)
        for sock in readable:
            family = 4 if sock.family == socket.AF_INET else 6
            for _ in range(RECV_BATCH):
                try:
                    data, anc, _flags, addr = sock.recvmsg(2048, _CMSG_SPACE)
                except BlockingIOError:
                    break
                self._on_reply(family, data, addr[0], self._rx_time(anc))

    def _rx_time(self, anc: list[tuple[int, int, bytes]]) -> int:
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack_from("qq", data)
                return int(sec * 1_000_000_000 + nsec - self.t0_real)
        return self._pkt_now()

    def _on_reply(self, family: int, data: bytes, source: str, rx: int) -> None:
        icmp = (
            data[(data[0] & 0x0F) * 4 :] if family == 4 else data
        )  # v4 raw includes the IP header
        if len(icmp) < 8 + _PAYLOAD.size or icmp[0] != _ECHO[family][1]:
            return
        ident, seq16 = struct.unpack_from("!HH", icmp, 4)
        token, seq = _PAYLOAD.unpack_from(icmp, 8)
        s = self.by_key.get((family, ident))
        if s is None or token != self.token or seq >= len(s.sent_at) or seq & 0xFFFF != seq16:
            return
        if ipaddress.ip_address(source).packed == s.packed:
            s.record(seq, rx)


def _parse(argv: Sequence[str]) -> MeterConfig:
    p = argparse.ArgumentParser(prog="python -m bridge_migrate_testlab.meter", description=__doc__)
    p.add_argument("targets", nargs="+", metavar="TARGET", help="IPv4 or IPv6 address")
    p.add_argument("--interval-ms", type=float, default=1.0)
    p.add_argument("--late-ms", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=MAX_DURATION_S, help="seconds (capped)")
    p.add_argument("--until-reply", action="store_true", help="stop once every target answered")
    a = p.parse_args(argv)
    return MeterConfig(tuple(a.targets), a.interval_ms, a.late_ms, a.duration, a.until_reply)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = _parse(sys.argv[1:] if argv is None else argv)
    meter = Meter(cfg)

    def stop(signum: int, frame: FrameType | None) -> None:
        meter.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print("ready", file=sys.stderr, flush=True)
        result = meter.run()
    finally:
        meter.close()
    print(result.to_json(), flush=True)
    if cfg.until_reply:
        return 0 if all(s.received + s.late for s in result.streams) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
