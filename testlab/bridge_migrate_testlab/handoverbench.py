"""How long is a managed host unreachable while its manager is handed the bridge? The same 1 ms
meter as scripts/bench (peer -> host, IPv4 and IPv6, on the host's own addresses), around
`apply` on lab hosts run by a real network manager (managed.py), beside the plain takeover of a
host nobody manages, booted the same way, in the same run.

    python -m bridge_migrate_testlab.handoverbench [--runs N] [ROW ...]

Each run: start the meter, apply (exit 0 required), keep probing 1.5 s, stop; then rollback
(exit 0 required) and wait until the host reaches its gateway again. Rows alternate run by run,
so machine noise hits all of them. Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bridge_migrate_testlab.managed import (
    ROWS,
    ManagedRow,
    booted_lab,
    configured,
    global_addresses,
)
from bridge_migrate_testlab.systemd import BootedLab, BootSpec

AGENT = str(Path(sys.executable).with_name("bridge-migrate"))
STATE = "/var/lib/bridge-migrate"
PLAIN = "plain (nobody manages eth0)"
_AFTER = 1.5  # seconds probed after apply returns
_MAX_RUNS = 200


@dataclass(frozen=True)
class Run:
    row: str
    lost: int  # probes with no answer within 100 ms, both families
    gap_ms: float  # longest time without an answer, either family
    apply_ms: float  # apply's wall time, start to exit


def _host_addresses(booted: BootedLab) -> list[str]:
    found = sorted(global_addresses(booted, "eth0"))
    return [a.split("/")[0] for a in found]


def _one(row: str, booted: BootedLab) -> Run:
    lab = booted.lab
    targets = _host_addresses(booted)
    meter = lab.start_meter(lab.peer_ns, targets, 1.0, late_ms=100.0)
    started = time.monotonic()
    done = booted.host.run([AGENT, "--state-dir", STATE, "apply", "--timeout", "20"], timeout=90)
    took = (time.monotonic() - started) * 1000
    time.sleep(_AFTER)
    result = meter.stop()
    if done.returncode != 0:
        raise RuntimeError(f"{row}: apply exited {done.returncode}: {done.stdout}{done.stderr}")
    back = booted.host.run([AGENT, "--state-dir", STATE, "rollback"], timeout=90)
    if back.returncode != 0:
        raise RuntimeError(f"{row}: rollback exited {back.returncode}: {back.stdout}")
    lab.wait_reachable(lab.host_ns, [lab.addrs.gw_v4, lab.addrs.gw_v6], timeout=30)
    lost = sum(s.lost + s.late for s in result.streams)
    return Run(row, lost, max(s.longest_gap_ms for s in result.streams), took)


def _plain_lab() -> BootedLab:
    return BootedLab(BootSpec(hostname="plain"), plug_first=True)


def bench(rows: Sequence[ManagedRow], runs: int) -> list[Run]:
    results: list[Run] = []
    with ExitStack() as stack:
        labs: dict[str, BootedLab] = {PLAIN: stack.enter_context(_plain_lab())}
        for r in rows:
            labs[r.name] = stack.enter_context(booted_lab(r))
            configured(labs[r.name], r)
        for n in range(min(runs, _MAX_RUNS)):
            for name, booted in labs.items():
                results.append(_one(name, booted))
                print(f"run {n + 1}: {results[-1]}", file=sys.stderr)
    return results


def table(results: Sequence[Run]) -> str:
    plain = [r for r in results if r.row == PLAIN]
    base_gap = statistics.median(r.gap_ms for r in plain) if plain else 0.0
    lines = [
        "| host | runs | lost probes (median) | longest gap ms (median, max) | vs plain | "
        "apply ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r.row for r in results):
        mine = [r for r in results if r.row == name]
        gap = statistics.median(r.gap_ms for r in mine)
        ratio = f"{gap / base_gap:.2f}x" if base_gap else "-"
        lines.append(
            f"| {name} | {len(mine)} | {statistics.median(r.lost for r in mine):g} | "
            f"{gap:.1f}, {max(r.gap_ms for r in mine):.1f} | {ratio} | "
            f"{statistics.median(r.apply_ms for r in mine):.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per host (default 5)")
    handed = [r.name for r in ROWS if r.handed_over]
    p.add_argument("rows", nargs="*", default=handed, help=f"default: {' '.join(handed)}")
    args = p.parse_args(argv)
    unknown = set(args.rows) - {r.name for r in ROWS if r.handed_over}
    if unknown:
        p.error(f"not a handed-over row: {', '.join(sorted(unknown))}")
    rows = [r for r in ROWS if r.name in args.rows]
    print(table(bench(rows, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
