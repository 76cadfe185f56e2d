"""The benchmark's two step-by-step contenders, run inside the lab's host namespace as
`python -m bridge_migrate_testlab.stepwise {recipe|unbatched} [--timeout S]`; prints one JSON
document.

recipe:    the classic commands, one `ip` process each, extended to this host's whole identity
           (every address and configured route), in the classic order: addresses onto the
           bridge, addresses off the NIC, the NIC into the bridge, each route deleted and re-added.
unbatched: the agent's own plan (bridge_migrate.plan), but every operation in its own netlink
           call, so the difference to the agent is the batch alone.

Both read the host first, then verify the gateways the way the agent does (an ARP request on the
bridge, an ICMPv6 echo from the moved address), and on a failed verification undo their steps
one by one, newest first, then read the host back: the same phases the agent reports.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from pyroute2 import IPRoute

from bridge_migrate.batch import send_batch
from bridge_migrate.model import AF_INET, AF_INET6, RT_TABLE_MAIN, Address, HostState, Route
from bridge_migrate.plan import (
    Plan,
    Step,
    plan_takeover,
)
from bridge_migrate.rollback import op_devices
from bridge_migrate.snapshot import read_host, read_links

ATTEMPT_S = 0.1  # as the agent: ask again after 100 ms without an answer
CMD_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
_ETH_P_ARP = 0x0806


@dataclass(frozen=True)
class PhaseTime:
    name: str
    ms: float
    detail: str


@dataclass(frozen=True)
class Undo:
    ops: int
    failed: int
    netlink_ms: float  # the inverse operations alone
    total_ms: float  # with reading the host back and comparing it with the snapshot
    differences: tuple[str, ...]


@dataclass
class Outcome:
    """Mutable while the contender runs, then dumped as JSON."""

    contender: str
    phases: list[PhaseTime] = field(default_factory=list)
    ops: int = 0
    failed_ops: list[str] = field(default_factory=list)
    change_ms: float = 0.0  # first disruptive operation to the last one's answer
    netlink_ms: float = 0.0  # the operations alone (recipe: the `ip` processes)
    verified: bool = False
    verified_ms: float | None = None  # first read of the host to the gateways answering
    undo: Undo | None = None

    def phase(self, name: str, started: float, detail: str = "") -> None:
        self.phases.append(PhaseTime(name, (time.perf_counter() - started) * 1000, detail))


# -- the recipe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    tolerate: str = ""  # a stderr text that means "already so" (the route the kernel flushed)


def recipe_commands(state: HostState, bridge: str) -> tuple[list[Command], list[Command]]:
    """(preparation, disruptive commands), in the classic recipe's order."""
    nic, link = state.nic.name, state.nic
    # As the agent's: the NIC's MAC and MTU, STP off, forwarding at once.
    create = ("ip", "link", "add", bridge, "address", link.mac, "mtu", str(link.mtu))
    prep = [
        Command((*create, "type", "bridge", "stp_state", "0", "forward_delay", "0")),
        Command(("ip", "link", "set", bridge, "up")),
    ]
    v4, v6 = _moved_addresses(state)
    steps = [_addr("add", a, bridge) for a in [*v4, *v6]]
    # Secondaries before the primary: deleting a primary also deletes its secondaries.
    steps += [_addr("del", a, nic) for a in [*reversed(v4), *v6]]
    steps.append(Command(("ip", "link", "set", nic, "master", bridge)))  # brctl addif
    for r in _moved_routes(state):
        # Deleting the NIC's last IPv4 address already flushed its IPv4 routes: "made to work"
        # means this delete may find nothing ("No such process") and the recipe goes on.
        steps.append(Command(_route("del", r, nic), tolerate="No such process"))
        steps.append(Command(_route("add", r, bridge)))
    return prep, steps


def _moved_addresses(state: HostState) -> tuple[list[Address], list[Address]]:
    mine = state.addresses_on(state.nic.name)
    v4 = [a for a in mine if a.family == AF_INET]
    v6 = [a for a in mine if a.family == AF_INET6 and a.is_global]
    return v4, v6


def _moved_routes(state: HostState) -> list[Route]:
    routes = [r for r in state.routes_on(state.nic.name) if r.table == RT_TABLE_MAIN]
    configured = [r for r in routes if r.protocol != 2]  # RTPROT_KERNEL: follows addresses
    return sorted(configured, key=lambda r: (r.family != AF_INET, not r.is_default))


def _addr(verb: str, a: Address, dev: str) -> Command:
    argv = ["ip", "-6" if a.family == AF_INET6 else "-4", "addr", verb, str(a), "dev", dev]
    if verb == "add" and a.broadcast:
        argv += ["broadcast", a.broadcast]
    if verb == "add" and a.family == AF_INET6:
        argv.append("nodad")  # the host owns the address already
    return Command(tuple(argv))


def _route(verb: str, r: Route, dev: str) -> tuple[str, ...]:
    dst = "default" if r.dst is None else f"{r.dst}/{r.dst_len}"
    argv = ["ip", "-6" if r.family == AF_INET6 else "-4", "route", verb, dst]
    if r.gateway:
        argv += ["via", r.gateway]
    argv += ["dev", dev, "metric", str(r.priority)]
    if verb == "add":
        argv += ["proto", str(r.protocol)]
        if r.prefsrc:
            argv += ["src", r.prefsrc]
    return tuple(argv)


def _run_command(cmd: Command, out: Outcome) -> bool:
    started = time.perf_counter()
    done = subprocess.run(cmd.argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    out.netlink_ms += (time.perf_counter() - started) * 1000
    ok = done.returncode == 0 or (bool(cmd.tolerate) and cmd.tolerate in done.stderr)
    if not ok:
        out.failed_ops.append(f"{' '.join(cmd.argv)}: {done.stderr.strip()}")
    return ok


def recipe_inverse(state: HostState, bridge: str) -> list[Command]:
    """Undo, newest first: routes back, NIC out of the bridge, addresses back, bridge gone."""
    nic = state.nic.name
    v4, v6 = _moved_addresses(state)
    cmds = [Command(_route("del", r, bridge), "No such process") for r in _moved_routes(state)]
    cmds.append(Command(("ip", "link", "set", nic, "nomaster")))
    cmds += [Command(_addr("add", a, nic).argv, "File exists") for a in [*v4, *v6]]
    cmds += [Command(_route("add", r, nic), "File exists") for r in _moved_routes(state)]
    cmds.append(Command(("ip", "link", "del", bridge)))
    return cmds


def run_recipe(ipr: IPRoute, nic: str, bridge: str, timeout: float) -> Outcome:
    out, t0 = Outcome("recipe"), time.perf_counter()
    state = read_host(nic, bridge)
    out.phase("snapshot", t0)
    prep, steps = recipe_commands(state, bridge)
    started = time.perf_counter()
    for cmd in prep:
        _run_command(cmd, out)
    out.phase("bridge", started, f"{len(prep)} commands")
    out.netlink_ms, started = 0.0, time.perf_counter()
    for cmd in steps:
        _run_command(cmd, out)
    out.ops, out.change_ms = len(steps), (time.perf_counter() - started) * 1000
    out.phase("commands", started, f"{len(steps)} ip processes, {len(out.failed_ops)} failed")
    _verify(state, bridge, timeout, out, t0)
    if not out.verified:
        inverse = recipe_inverse(state, bridge)
        _undo(ipr, state, bridge, out, len(inverse), lambda o: _all(_run_command, inverse, o))
    return out


def _all(run: Callable[[Command, Outcome], bool], cmds: Sequence[Command], out: Outcome) -> int:
    return sum(0 if run(c, out) else 1 for c in cmds)


# -- the agent's plan, one netlink call per operation ---------------------------------------


def run_unbatched(ipr: IPRoute, nic: str, bridge: str, timeout: float) -> Outcome:
    out, t0 = Outcome("unbatched"), time.perf_counter()
    state = read_host(nic, bridge)
    out.phase("snapshot", t0)
    started = time.perf_counter()
    plan = plan_takeover(state, bridge)
    changes = (*plan.make, *plan.batch)
    out.phase("plan", started, f"{len(changes)} operations, one call each")
    started = time.perf_counter()
    _send_each([plan.prepare], ipr, out)
    out.phase("bridge", started, str(plan.prepare.do))
    out.netlink_ms, started = 0.0, time.perf_counter()
    _send_each(changes, ipr, out)
    out.ops, out.change_ms = len(changes), (time.perf_counter() - started) * 1000
    out.phase("calls", started, f"{len(changes)} netlink calls in {out.netlink_ms:.2f} ms")
    _verify(state, bridge, timeout, out, t0)
    if not out.verified:
        steps = plan.steps
        _undo(ipr, state, bridge, out, len(steps), lambda o: _undo_each(plan, ipr, o))
    return out


def _send_each(steps: Sequence[Step], ipr: IPRoute, out: Outcome, undo: bool = False) -> int:
    # Names are resolved once: the bridge exists from the first batch step on.
    links = {name: link.index for name, link in read_links(ipr).items()}
    failed = 0
    for step in steps:
        op = step.undo if undo else step.do
        if any(d not in links for d in op_devices(op)):
            continue  # the device is gone: nothing left to undo on it
        result = send_batch([op], links.__getitem__)
        out.netlink_ms += result.seconds * 1000
        if not result.ok:
            failed += 1
            out.failed_ops.extend(o.describe() for o in result.failures)
    return failed


def _undo_each(plan: Plan, ipr: IPRoute, out: Outcome) -> int:
    return _send_each(list(reversed(plan.steps)), ipr, out, undo=True)


# -- verification and undo, shared ----------------------------------------------------------


def _undo(
    ipr: IPRoute,
    state: HostState,
    bridge: str,
    out: Outcome,
    count: int,
    run: Callable[[Outcome], int],
) -> None:
    started = time.perf_counter()
    out.netlink_ms = 0.0
    failed = run(out)
    netlink = out.netlink_ms
    after = read_host(state.nic.name, bridge)
    diff = _differences(state, after)
    total = (time.perf_counter() - started) * 1000
    out.undo = Undo(count, failed, netlink, total, diff)
    out.phase("rollback", started, f"{count} inverse operations in {netlink:.2f} ms")


def _differences(before: HostState, after: HostState) -> tuple[str, ...]:
    diff = []
    if after.bridge is not None:
        diff.append(f"{after.bridge.name} still exists")
    if after.nic.master != before.nic.master:
        diff.append(f"{after.nic.name} master is {after.nic.master}")
    nic = before.nic.name
    had = [str(a) for a in before.addresses_on(nic)]
    has = [str(a) for a in after.addresses_on(nic)]
    diff += [f"address {a} missing" for a in had if a not in has]
    routes = {str(r) for r in _moved_routes(after)}
    diff += [f"route {r} missing" for r in map(str, _moved_routes(before)) if r not in routes]
    return tuple(diff)


def _verify(state: HostState, bridge: str, timeout: float, out: Outcome, t0: float) -> None:
    started = time.perf_counter()
    asks = _gateway_asks(state, bridge)
    answered = _ask_until(asks, time.monotonic() + timeout)
    out.verified = bool(asks) and answered == len(asks)
    if out.verified:
        out.verified_ms = (time.perf_counter() - t0) * 1000
    out.phase("verify", started, f"{answered}/{len(asks)} gateways answered")


@dataclass
class _Ask:
    """One gateway question (ARP request or ICMPv6 echo) on its own socket."""

    sock: socket.socket
    request: bytes
    to: tuple[object, ...] | None  # sendto address; None: a packet socket, send()
    is_answer: Callable[[bytes], bool]
    answered: bool = False

    def send(self) -> None:
        try:
            if self.to is None:
                self.sock.send(self.request)
            else:
                self.sock.sendto(self.request, self.to)
        except OSError:  # e.g. no route yet: ask again on the next round
            pass


def _gateway_asks(state: HostState, bridge: str) -> list[_Ask]:
    asks = []
    for r in state.routes_on(state.nic.name):
        if not (r.is_default and r.gateway and r.table == RT_TABLE_MAIN):
            continue
        source = _source(state, r)
        if source is None:
            continue
        ask = _arp_ask if r.family == AF_INET else _echo6_ask
        asks.append(ask(bridge, source, r.gateway))
    return asks


def _source(state: HostState, route: Route) -> str | None:
    assert route.gateway is not None
    gw = ipaddress.ip_address(route.gateway)
    for a in state.addresses_on(state.nic.name):
        net = ipaddress.ip_interface(f"{a.address}/{a.prefixlen}").network
        if a.family == route.family and a.is_global and gw in net:
            return a.address
    return None


def _arp_ask(bridge: str, source: str, gateway: str) -> _Ask:
    # As the agent asks (verify._ArpAsker): protocol 0 until bound, no RCU grace period.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((bridge, _ETH_P_ARP))
    mac = sock.getsockname()[4]
    spa, tpa = socket.inet_aton(source), socket.inet_aton(gateway)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, spa, b"\0" * 6, tpa)
    frame = b"\xff" * 6 + mac + struct.pack("!H", _ETH_P_ARP) + arp

    def is_answer(f: bytes) -> bool:
        return len(f) >= 42 and f[20:22] == b"\0\2" and f[28:32] == tpa and f[38:42] == spa

    return _Ask(sock, frame, None, is_answer)


def _echo6_ask(bridge: str, source: str, gateway: str) -> _Ask:
    sock = socket.socket(AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
    scope = socket.if_nametoindex(bridge)
    sock.bind((source, 0, 0, scope))
    ident = struct.pack("!HH", 0xB3, 1)
    request = b"\x80\0\0\0" + ident + b"netlab-bench"

    def is_answer(p: bytes) -> bool:
        return p[:1] == b"\x81" and p[4:8] == ident

    return _Ask(sock, request, (gateway, 0, 0, scope), is_answer)


def _ask_until(asks: list[_Ask], deadline: float) -> int:
    """Ask every unanswered gateway each ATTEMPT_S until all answered or the deadline."""
    next_round = 0.0
    for _ in range(int(MAX_TIMEOUT_S / 0.001)):  # bounded; the deadline ends it much sooner
        now = time.monotonic()
        pending = [a for a in asks if not a.answered]
        if not pending or now >= deadline:
            break
        if now >= next_round:
            for a in pending:
                a.send()
            next_round = now + ATTEMPT_S
        wait = max(0.0, min(next_round, deadline) - now)
        readable, _, _ = select.select([a.sock for a in pending], [], [], wait)
        for a in pending:
            if a.sock in readable:
                a.answered = any(a.is_answer(p) for p in _drain(a.sock))
    for a in asks:
        a.sock.close()
    return sum(a.answered for a in asks)


def _drain(sock: socket.socket) -> list[bytes]:
    packets = []
    for _ in range(64):
        try:
            packets.append(sock.recv(2048, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
    return packets


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bridge_migrate_testlab.stepwise", description=__doc__
    )
    p.add_argument("contender", choices=("recipe", "unbatched"))
    p.add_argument("--nic", default="eth0")
    p.add_argument("--bridge", default="br0")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for the gateways")
    p.add_argument("--print", action="store_true", help="recipe: print the commands, run none")
    a = p.parse_args(argv)
    run = run_recipe if a.contender == "recipe" else run_unbatched
    with IPRoute() as ipr:
        if a.print:
            prep, steps = recipe_commands(read_host(a.nic, a.bridge), a.bridge)
            lines = ["# preparation, as the agent's", *(" ".join(c.argv) for c in prep)]
            lines += ["# the change, one process each", *(" ".join(c.argv) for c in steps)]
            print("\n".join(lines))
            return 0
        out = run(ipr, a.nic, a.bridge, min(a.timeout, MAX_TIMEOUT_S))
    print(json.dumps(asdict(out)))
    return 0 if out.verified and not out.failed_ops else 1


if __name__ == "__main__":
    sys.exit(main())
