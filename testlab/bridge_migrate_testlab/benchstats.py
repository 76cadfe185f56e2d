"""The bench's records and figures: per-run loss from the meters, medians and maxima per
contender, the bar, and the tables (Markdown, printed as they are and written to the docs)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bridge_migrate_testlab.benchlab import STREAM_HELP, STREAMS
from bridge_migrate_testlab.contenders import KNOWN, Attempt, lookup
from bridge_migrate_testlab.results import MeterResult

GAP_BAR_MS = 10.0
OUTAGE_MS = 100.0  # "a gap above 100 ms": the ~1 s hazard and anything like it
CLEAN_BAR = 0.95


@dataclass(frozen=True)
class StreamRun:
    name: str
    sent: int
    lost: int  # no reply, or a reply later than the meter's late threshold
    longest_loss_ms: float  # first unanswered probe to the next answered one
    lost_at_ms: tuple[float, ...]  # when each lost probe was sent, since the contender started


@dataclass(frozen=True)
class RunRecord:
    contender: str
    shape: str
    index: int
    attempt: Attempt
    streams: tuple[StreamRun, ...]
    meter_lag_ms: float  # the meters' own worst stall: a large one makes the run suspect

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.streams)

    @property
    def gap_ms(self) -> float:
        return max((s.longest_loss_ms for s in self.streams), default=0.0)

    def stream(self, name: str) -> StreamRun:
        return next(s for s in self.streams if s.name == name)


def run_record(
    contender: str,
    shape: str,
    index: int,
    attempt: Attempt,
    meters: Sequence[tuple[MeterResult, float]],
) -> RunRecord:
    """meters: each result with the wall-clock time its probing began."""
    runs = []
    pairs = [(s, t0) for result, t0 in meters for s in result.streams]
    for name, (s, t0) in zip(STREAMS, pairs, strict=True):
        offset = (t0 - attempt.started) * 1000
        sent = [p.sent_ms for p in s.lost_probes] + [p.sent_ms for p in s.late_probes]
        at = tuple(sorted(round(ms + offset, 2) for ms in sent))
        runs.append(StreamRun(name, s.sent, s.lost + s.late, s.longest_loss_ms, at))
    lag = max(r.max_send_lag_ms for r, _ in meters)
    return RunRecord(contender, shape, index, attempt, tuple(runs), lag)


# -- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One contender on one lab shape."""

    key: str
    runs: int
    clean: int  # runs without a single lost probe on any stream
    lost_med: dict[str, float]
    lost_max: dict[str, int]
    lost_mean: float  # per run, all streams
    gap_med: float
    gap_max: float
    over_bar: int  # runs with a gap above GAP_BAR_MS
    outages: int  # runs with a gap above OUTAGE_MS
    verified_med: float | None
    verified_p90: float | None
    change_med: float | None
    ops: int
    wall_med: float
    failed: int  # runs the contender itself reported as not verified


def figures(key: str, records: Sequence[RunRecord]) -> Figures:
    mine = [r for r in records if r.contender == key]
    gaps = [r.gap_ms for r in mine] or [0.0]
    return Figures(
        key=key,
        runs=len(mine),
        clean=sum(1 for r in mine if r.lost == 0),
        lost_med={n: _median([r.stream(n).lost for r in mine]) or 0.0 for n in STREAMS},
        lost_max={n: max((r.stream(n).lost for r in mine), default=0) for n in STREAMS},
        lost_mean=statistics.fmean([r.lost for r in mine]) if mine else 0.0,
        gap_med=_median(gaps) or 0.0,
        gap_max=max(gaps),
        over_bar=sum(1 for g in gaps if g > GAP_BAR_MS),
        outages=sum(1 for g in gaps if g > OUTAGE_MS),
        verified_med=_median([r.attempt.verified_ms for r in mine]),
        verified_p90=_quantile([r.attempt.verified_ms for r in mine], 0.9),
        change_med=_median([r.attempt.change_ms for r in mine]),
        ops=max((r.attempt.ops for r in mine), default=0),
        wall_med=_median([r.attempt.wall_ms for r in mine]) or 0.0,
        failed=sum(1 for r in mine if not r.attempt.ok),
    )


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _median(values: Sequence[float | None]) -> float | None:
    present = _present(values)
    return statistics.median(present) if present else None


def _quantile(values: Sequence[float | None], q: float) -> float | None:
    present = sorted(_present(values))
    if not present:
        return None
    return present[min(len(present) - 1, round(q * (len(present) - 1)))]


@dataclass(frozen=True)
class Verdict:
    met: bool
    lines: tuple[str, ...]


def verdict(agent: Figures, planned_runs: int) -> Verdict:
    """The issue's bar for the agent."""
    share = agent.clean / agent.runs if agent.runs else 0.0
    checks = [
        (
            share >= CLEAN_BAR,
            f"no lost probe on any stream in {agent.clean}/{agent.runs} runs "
            f"({share:.0%}; bar: at least {CLEAN_BAR:.0%})",
        ),
        (
            agent.over_bar == 0,
            f"longest gap {agent.gap_max:.1f} ms, {agent.over_bar} run(s) "
            f"above {GAP_BAR_MS:g} ms (bar: none)",
        ),
        (
            agent.outages == 0,
            f"{agent.outages} run(s) with a gap above {OUTAGE_MS:g} ms "
            f"(bar: none in {planned_runs})",
        ),
        (agent.failed == 0, f"{agent.failed} run(s) not verified"),
    ]
    lines = tuple(f"[{'ok' if ok else 'MISSED'}] {text}" for ok, text in checks)
    return Verdict(all(ok for ok, _ in checks) and agent.runs >= planned_runs, lines)


# -- tables ----------------------------------------------------------------------------------


def _ms(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base == 0:
        return "-"
    return f"{v / base:.2g}x"


def _label(key: str) -> str:
    return lookup(key).label


def present(records: Sequence[RunRecord]) -> list[str]:
    """The contenders that have runs, in the canonical order."""
    return [c.key for c in KNOWN if any(r.contender == c.key for r in records)]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def loss_table(figs: Sequence[Figures]) -> str:
    base = next((f for f in figs if _is_baseline(f.key)), None)
    head = ["contender", "runs", "no loss", *(f"lost {n} med/max" for n in STREAMS)]
    head += ["lost/run mean", "vs recipe", "gap med/max ms", "gap >10 ms", "gap >100 ms"]
    rows = []
    for f in figs:
        cells = [f"{f.lost_med[n]:g} / {f.lost_max[n]}" for n in STREAMS]
        rows.append(
            [
                _label(f.key),
                str(f.runs),
                f"{f.clean} ({f.clean / f.runs:.0%})" if f.runs else "-",
                *cells,
                f"{f.lost_mean:.1f}",
                _ratio(f.lost_mean, base.lost_mean if base else None),
                f"{f.gap_med:.1f} / {f.gap_max:.1f}",
                str(f.over_bar),
                str(f.outages),
            ]
        )
    return _table(head, rows)


def _is_baseline(key: str) -> bool:
    return lookup(key).baseline


@dataclass(frozen=True)
class RollbackFigures:
    key: str
    runs: int
    restored: int
    netlink_med: float | None
    total_med: float | None
    wall_med: float | None


def rollback_figures(key: str, attempts: Sequence[Attempt]) -> RollbackFigures:
    return RollbackFigures(
        key=key,
        runs=len(attempts),
        restored=sum(1 for a in attempts if a.ok),
        netlink_med=_median([a.rollback_netlink_ms for a in attempts]),
        total_med=_median([a.rollback_total_ms for a in attempts]),
        wall_med=_median([a.wall_ms for a in attempts]),
    )


def timing_table(
    figs: Sequence[Figures], rollbacks: Sequence[RollbackFigures], cold: Sequence[float]
) -> str:
    base = next((f for f in figs if _is_baseline(f.key)), None)
    head = ["contender", "start → gateway verified med (p90) ms", "vs recipe"]
    head += ["changes med ms (ops)", "process wall med ms", "rollback: inverse ops med ms"]
    head += ["rollback: total med ms", "rollback runs (restored)", "`plan` cold start ms"]
    by_key = {r.key: r for r in rollbacks}
    rows = []
    for f in figs:
        rb = by_key.get(f.key)
        cold_cell = "-"
        if f.key == "agent" and cold:
            med = statistics.median(cold)
            cold_cell = f"{cold[0]:.0f} first, {med:.0f} med, {max(cold):.0f} max"
        rows.append(
            [
                _label(f.key),
                f"{_ms(f.verified_med)} ({_ms(f.verified_p90)})",
                _ratio(f.verified_med, base.verified_med if base else None),
                f"{_ms(f.change_med, 2)} ({f.ops})",
                _ms(f.wall_med, 0),
                _ms(rb.netlink_med if rb else None, 2),
                _ms(rb.total_med if rb else None),
                f"{rb.runs} ({rb.restored})" if rb else "-",
                cold_cell,
            ]
        )
    return _table(head, rows)


def scale_table(shapes: Sequence[str], records: Sequence[RunRecord]) -> str:
    head = ["NIC carries", "contender", "runs", "ops", "changes med ms", "vs recipe"]
    head += ["lost/run med (max)", "gap med/max ms", "start → verified med ms"]
    rows = []
    for shape in shapes:
        mine = [r for r in records if r.shape == shape]
        figs = [figures(key, mine) for key in present(mine)]
        base = next((f for f in figs if _is_baseline(f.key)), None)
        for f in figs:
            if not f.runs:
                continue
            lost = [r.lost for r in mine if r.contender == f.key]
            rows.append(
                [
                    shape,
                    f.key,
                    str(f.runs),
                    str(f.ops),
                    _ms(f.change_med, 2),
                    _ratio(f.change_med, base.change_med if base else None),
                    f"{_median(lost) or 0:g} ({max(lost)})",
                    f"{f.gap_med:.1f} / {f.gap_max:.1f}",
                    _ms(f.verified_med),
                ]
            )
    return _table(head, rows)


def stream_legend() -> str:
    return "\n".join(f"- `{n}`: {STREAM_HELP[n]}" for n in STREAMS)


def worst_runs(records: Sequence[RunRecord], key: str, count: int = 5) -> list[str]:
    """The runs of `key` that lost the most, with where the loss fell."""
    mine = sorted((r for r in records if r.contender == key), key=lambda r: (-r.gap_ms, -r.lost))
    lines = []
    for r in mine[:count]:
        if r.lost == 0:
            break
        where = ", ".join(_describe_loss(s) for s in r.streams if s.lost)
        lines.append(f"run {r.index}: {r.lost} lost, gap {r.gap_ms:.1f} ms ({where})")
    return lines


def _describe_loss(s: StreamRun) -> str:
    if not s.lost_at_ms:
        return f"{s.name} {s.lost}"
    return f"{s.name} {s.lost} at {s.lost_at_ms[0]:.0f}-{s.lost_at_ms[-1]:.0f} ms"
