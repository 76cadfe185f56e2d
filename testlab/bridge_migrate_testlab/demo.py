"""The demo: a real takeover in a throwaway lab, how long the host was unreachable, then a
takeover against a dead gateway and its rollback; last, what the takeover is for: a guest attached
to br0 that reaches the host and the LAN, beside a macvlan guest that cannot reach its host. Run as
root: `scripts/demo`."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from bridge_migrate_testlab.lab import Lab, MeterHandle
from bridge_migrate_testlab.results import MeterResult

DEAD_GATEWAY_TIMEOUT = 3
GUEST_V4, GUEST_V6 = "198.18.0.50", "2001:db8:0:1::50"
MACVLAN_V4 = "198.18.0.60"
PROBE_TIMEOUT = 2.0


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Lab() as lab, tempfile.TemporaryDirectory(prefix="bridge-migrate-demo.") as state:
            return _demo(lab, state)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; lab removed", file=sys.stderr)
        return 130


def _demo(lab: Lab, state: str) -> int:
    a = lab.addrs
    _title(f"A single-NIC host in namespace {lab.host_ns}, its gateway {a.gw_v4} in {lab.lan_ns}")
    _show(lab)

    _title("1. Take over, while a peer and a far host probe the host every millisecond")
    meters = _start_meters(lab)
    time.sleep(0.2)  # a baseline before the change
    code = _agent(lab, state, ["apply"])
    time.sleep(0.3)  # and after it
    results = [m.stop() for m in meters]
    _show(lab)
    _report_outage(results)
    if code != 0:
        print(f"demo: the takeover failed with exit code {code}", file=sys.stderr)
        return 1

    _title("2. Undo it from the transaction record")
    _agent(lab, state, ["rollback"])
    _show(lab)

    _title(f"3. The gateway dies; the takeover cannot verify within {DEAD_GATEWAY_TIMEOUT} s")
    lab.kill_gateway("addr", rotate_mac=False)  # same MAC when it comes back (step 4)
    code = _agent(lab, state, ["apply", "--timeout", str(DEAD_GATEWAY_TIMEOUT)])
    print(f"\nexit code {code} (4: not verified, host restored to its snapshot)")
    _show(lab)
    if code != 4:
        return 1
    return _guests(lab, state)


def _guests(lab: Lab, state: str) -> int:
    a = lab.addrs
    _title("4. The gateway is back: take over again, then attach a guest to br0")
    _revive_gateway(lab)
    if _agent(lab, state, ["apply"]) != 0:
        return 1
    guest = lab.add_namespace("guest")
    addresses = [f"{GUEST_V4}/24@{a.gw_v4}", f"{GUEST_V6}/64@{a.gw_v6}"]
    if _agent(lab, state, ["attach", f"netns:{guest}", *addresses]) != 0:
        return 1
    _agent(lab, state, ["status"])
    targets = {"the host": a.host_v4, "a LAN peer": a.peer_v4, "a far host": a.far_v4}
    targets |= {"the host (IPv6)": a.host_v6, "a far host (IPv6)": a.far_v6}
    reached = _probe(lab, guest, "the guest", targets)
    reached &= _probe(lab, lab.peer_ns, "a LAN peer", {"the guest": GUEST_V4})

    _title("5. Beside it, a macvlan guest on br0 (Docker's macvlan driver): the LAN, not its host")
    macvlan = lab.add_namespace("macvlan")
    lab.ip_batch(
        lab.host_ns,
        ["link add mv0 link br0 type macvlan mode bridge", f"link set mv0 netns {macvlan}"],
    )
    lab.ip_batch(
        macvlan,
        [
            f"addr add {MACVLAN_V4}/24 dev mv0",
            "link set mv0 up",
            f"route add default via {a.gw_v4} dev mv0",
        ],
    )
    print(f"\n$ ip link add mv0 link br0 type macvlan mode bridge  (in {macvlan}: {MACVLAN_V4}/24)")
    cut_off = not _probe(lab, macvlan, "the macvlan guest", {"the host": a.host_v4}, quiet=True)
    lan = _probe(lab, macvlan, "the macvlan guest", {"a LAN peer": a.peer_v4})
    return 0 if reached and cut_off and lan else 1


def _revive_gateway(lab: Lab) -> None:
    a, br = lab.addrs, lab.lan_bridge
    lab.ip_batch(
        lab.lan_ns,
        [f"addr add {a.gw_v4}/{a.v4_prefixlen} dev {br}", f"addr add {a.gw_v6}/64 dev {br} nodad"],
    )


def _probe(lab: Lab, ns: str, who: str, targets: dict[str, str], *, quiet: bool = False) -> bool:
    """Live probes from `ns`, one line each; whether every target answered."""
    ok = True
    for name, target in targets.items():
        try:
            result = lab.wait_reachable(ns, [target], timeout=PROBE_TIMEOUT)
            rtt = result.streams[0].rtt_avg_ms
            print(f"  {who} -> {name} {target}: answered, {rtt:.3f} ms")
        except TimeoutError:
            ok = False
            note = " (as expected)" if quiet else ""
            print(f"  {who} -> {name} {target}: NO answer in {PROBE_TIMEOUT:g} s{note}")
    return ok


def _start_meters(lab: Lab) -> list[MeterHandle]:
    a = lab.addrs
    return [
        lab.start_meter(lab.peer_ns, [a.host_v4, a.host_v6]),
        lab.start_meter(lab.far_ns, [a.host_v4]),
    ]


def _report_outage(results: Sequence[MeterResult]) -> None:
    names = ["IPv4 on-link", "IPv6 on-link", "IPv4 via the default route"]
    streams = [s for r in results for s in r.streams]
    print("\nHow long the host was unreachable (probes every 1 ms):")
    for name, s in zip(names, streams, strict=True):
        lost = s.lost + s.late
        print(
            f"  {name:<28} {s.sent:5} sent, {lost:3} lost, longest gap {s.longest_gap_ms:6.1f} ms"
        )


def _agent(lab: Lab, state: str, args: list[str]) -> int:
    argv = [sys.executable, "-m", "bridge_migrate", "--state-dir", state, *args]
    print(f"\n$ bridge-migrate {' '.join(args)}", flush=True)
    done = lab.run(lab.host_ns, argv, timeout=60)
    print(done.stdout + done.stderr, end="", flush=True)
    return done.returncode


def _show(lab: Lab) -> None:
    for what in (["-br", "addr"], ["route"], ["-6", "route", "show", "default"]):
        done = lab.run(lab.host_ns, ["ip", *what])
        print("\n".join(f"  {line}" for line in done.stdout.splitlines() if "lo " not in line))


def _title(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
