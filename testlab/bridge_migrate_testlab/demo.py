"""The demo: a real takeover in a throwaway lab, how long the host was unreachable, then a
takeover against a dead gateway and its rollback. Run as root: `scripts/demo`."""

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
    lab.kill_gateway("addr")
    code = _agent(lab, state, ["apply", "--timeout", str(DEAD_GATEWAY_TIMEOUT)])
    print(f"\nexit code {code} (4: not verified, host restored to its snapshot)")
    _show(lab)
    return 0 if code == 4 else 1


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
