"""How long is the host unreachable? bridge-migrate beside the classic recipe, in one run.

    sudo scripts/bench [--runs N] [--agent-runs M] [--quick] [--docs DIR | --no-docs]

In a throwaway lab, every run starts three 1 ms probe meters (peer -> host IPv4 and IPv6,
far host -> host IPv4 through the host's default route, host -> peer IPv4 and IPv6), runs one
contender in the host namespace, keeps probing for a while, then puts the host back exactly as it
was. Contenders alternate run by run, so machine noise hits all of them. Then: rollback after a
failed verification, the `plan` cold start, and the same takeover on NICs carrying more
addresses and routes. Prints Markdown tables; writes docs/benchmarks.md and a timeline PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TypeVar

import bridge_migrate
from bridge_migrate_testlab import benchdoc
from bridge_migrate_testlab.benchlab import BASE, SCALE_SHAPES, BenchLab, Shape
from bridge_migrate_testlab.benchstats import RunRecord, run_record
from bridge_migrate_testlab.contenders import CANDIDATE, CONTENDERS, Attempt, Contender
from bridge_migrate_testlab.lab import Lab
from bridge_migrate_testlab.timeline import draw

DOCS = Path(__file__).resolve().parents[2] / "docs"
MAX_RUNS = 1000  # per contender: bounds every loop
MAX_MINUTES = 60.0
MAX_BROKEN_RUNS = 5  # measurements that broke (a meter died, ...) before the bench gives up
_T = TypeVar("_T")


@dataclass(frozen=True)
class Config:
    runs: int = 30  # per step-by-step contender
    agent_runs: int = 100  # enough to claim "no ~1 s outage in 100 runs"
    scale_runs: int = 3  # per contender and NIC load
    rollback_runs: int = 5  # per contender
    cold_runs: int = 10
    interval_ms: float = 1.0
    lead_s: float = 0.2  # probing before the contender starts
    tail_s: float = 1.2  # probing after it ended: long enough to see a ~1 s hole whole
    # Quiet after putting the host back. With the meters' start-up and the lead, the next
    # change comes > 1 s after the last link event, past the kernel's link-event batching.
    settle_s: float = 0.5
    verify_timeout_s: float = 10.0
    rollback_timeout_s: float = 1.0
    shapes: tuple[Shape, ...] = SCALE_SHAPES
    budget_minutes: float = 30.0  # no new run starts after this
    docs: Path | None = None
    raw: Path | None = None
    quick: bool = False
    candidate: Path | None = None  # the agent from another checkout, as a fourth contender


QUICK = Config(runs=5, agent_runs=10, scale_runs=1, rollback_runs=2, cold_runs=3, quick=True)


@dataclass(frozen=True)
class BenchResult:
    config: Config
    machine: dict[str, str]
    started: str
    seconds: float
    records: tuple[RunRecord, ...]  # the standard lab shape
    scale: tuple[RunRecord, ...]
    rollbacks: dict[str, tuple[Attempt, ...]]
    cold_ms: tuple[float, ...]
    recipe_commands: tuple[str, ...]
    notes: tuple[str, ...]


def interleave(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(contender, run index) in rounds; each contender's runs spread evenly over the rounds,
    the order within a round rotating, so no contender always follows the same one."""
    rounds = max(counts.values(), default=0)
    order: list[tuple[str, int]] = []
    done = dict.fromkeys(counts, 0)
    for r in range(rounds):
        due = [k for k, n in counts.items() if (r + 1) * n // rounds > r * n // rounds]
        shift = r % len(due) if due else 0
        for key in due[shift:] + due[:shift]:
            order.append((key, done[key]))
            done[key] += 1
    return order


@dataclass
class Bench:
    cfg: Config
    tmp: Path
    deadline: float = 0.0
    notes: list[str] = field(default_factory=list)
    done: int = 0
    total: int = 0
    failed: int = 0

    @property
    def contenders(self) -> tuple[Contender, ...]:
        if self.cfg.candidate is None:
            return CONTENDERS
        return (*CONTENDERS, replace(CANDIDATE, pythonpath=str(self.cfg.candidate)))

    def contender(self, key: str) -> Contender:
        return next(c for c in self.contenders if c.key == key)

    def counts(self, runs: int) -> dict[str, int]:
        return {c.key: runs for c in self.contenders}

    def run(self) -> BenchResult:
        started, t0, info = datetime.now(UTC), time.monotonic(), machine()
        self.deadline = t0 + self.cfg.budget_minutes * 60
        counts = self.counts(self.cfg.runs) | {"agent": self.cfg.agent_runs}
        if self.cfg.candidate is not None:
            counts["candidate"] = self.cfg.agent_runs
        per_shape = len(self.contenders) * self.cfg.scale_runs
        self.total = sum(counts.values()) + per_shape * len(self.cfg.shapes)
        with Lab() as lab:
            bl = BenchLab(lab, BASE)
            bl.settle()
            commands = self._recipe_commands(lab)
            cold = self._cold_starts(bl)
            records = self._interleaved(bl, counts)
            rollbacks = self._rollbacks(bl)
        scale: list[RunRecord] = []
        for shape in self.cfg.shapes:
            if self._over_budget(f"scale runs from {shape.name} on"):
                break
            with Lab() as lab:
                bl = BenchLab(lab, shape)
                bl.settle()
                scale += self._interleaved(bl, self.counts(self.cfg.scale_runs))
        return BenchResult(
            config=self.cfg,
            machine={**info, "load_end": machine()["load"]},
            started=started.isoformat(timespec="seconds"),
            seconds=time.monotonic() - t0,
            records=tuple(records),
            scale=tuple(scale),
            rollbacks=rollbacks,
            cold_ms=tuple(cold),
            recipe_commands=commands,
            notes=tuple(self.notes),
        )

    def _over_budget(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.notes.append(f"time budget ({self.cfg.budget_minutes:g} min) spent: skipped {what}")
        return True

    def _interleaved(self, bl: BenchLab, counts: dict[str, int]) -> list[RunRecord]:
        records = []
        for key, index in interleave(counts):
            if self._over_budget(f"the remaining runs on '{bl.shape.name}'"):
                break
            self.done += 1
            try:
                record = self._measure(bl, self.contender(key), index)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
                self._lost_run(bl, f"{bl.shape.name} {key} #{index}", e)
                continue
            records.append(record)
            _progress(self.done, self.total, record)
        return records

    def _measure(self, bl: BenchLab, contender: Contender, index: int) -> RunRecord:
        cfg = self.cfg
        state = self.tmp / f"state-{bl.shape.name.replace(' ', '')}-{contender.key}-{index}"
        probes = bl.start_probes(cfg.interval_ms)
        try:
            time.sleep(cfg.lead_s)
            attempt = contender.run(bl.lab, state, cfg.verify_timeout_s)
            time.sleep(cfg.tail_s)
        finally:
            meters = probes.stop()
        bl.restore()
        bl.wait_ready(cfg.settle_s)
        return run_record(contender.key, bl.shape.name, index, attempt, meters)

    def _lost_run(self, bl: BenchLab, what: str, e: Exception) -> None:
        """A run whose measurement broke (not the contender's fault) is left out, and said so."""
        self.failed += 1
        self.notes.append(f"run {what} not counted: {type(e).__name__}: {str(e)[:200]}")
        _say(f"run {what} not counted: {e}")
        if self.failed > MAX_BROKEN_RUNS:
            raise RuntimeError(f"{self.failed} runs could not be measured; giving up") from e
        bl.restore()
        bl.wait_ready(self.cfg.settle_s)

    def _rollbacks(self, bl: BenchLab) -> dict[str, tuple[Attempt, ...]]:
        """The gateway's addresses gone, each contender fails to verify and undoes its work."""
        found: dict[str, list[Attempt]] = {c.key: [] for c in self.contenders}
        for key, index in interleave(self.counts(self.cfg.rollback_runs)):
            if self._over_budget("the remaining rollback runs"):
                break
            bl.kill_gateway()
            try:
                state = self.tmp / f"rollback-{key}-{index}"
                attempt = self.contender(key).run(bl.lab, state, self.cfg.rollback_timeout_s)
            finally:
                bl.revive_gateway()
            bl.restore()
            bl.wait_ready(self.cfg.settle_s)
            found[key].append(attempt)
            total = attempt.rollback_total_ms or 0.0
            _say(f"rollback run {key} {index}: restored={attempt.ok} total {total:.1f} ms")
        return {k: tuple(v) for k, v in found.items()}

    def _cold_starts(self, bl: BenchLab) -> list[float]:
        """`bridge-migrate plan` as a user types it: a fresh interpreter every time."""
        script = Path(sys.executable).parent / "bridge-migrate"
        cli = [str(script)] if script.exists() else [sys.executable, "-m", "bridge_migrate"]
        argv = [*cli, "--state-dir", str(self.tmp / "plan"), "plan", "--json"]
        # Byte-compiled first, as an installed agent is (pip and dpkg compile at installation):
        # a checkout run with PYTHONDONTWRITEBYTECODE would compile every module at every start.
        package = Path(bridge_migrate.__file__).parent
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
        times = []
        for _ in range(min(self.cfg.cold_runs, MAX_RUNS)):
            t0 = time.perf_counter()
            done = bl.lab.run(bl.lab.host_ns, argv, input="", timeout=60)
            ms = (time.perf_counter() - t0) * 1000
            if done.returncode != 0:
                self.notes.append(f"`plan` failed ({done.returncode}): {done.stderr.strip()[:200]}")
                break
            times.append(ms)
        return times

    def _recipe_commands(self, lab: Lab) -> tuple[str, ...]:
        argv = [sys.executable, "-m", "bridge_migrate_testlab.stepwise", "recipe", "--print"]
        done = lab.run(lab.host_ns, argv, timeout=60)
        return tuple(done.stdout.splitlines())


def _progress(done: int, total: int, r: RunRecord) -> None:
    a = r.attempt
    verified = f"{a.verified_ms:.0f} ms" if a.verified_ms is not None else f"NOT ({a.detail})"
    _say(
        f"[{done}/{total}] {r.shape} {r.contender} #{r.index}: lost {r.lost}, "
        f"gap {r.gap_ms:.1f} ms, verified {verified}, meter lag {r.meter_lag_ms:.1f} ms"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    debian = Path("/etc/debian_version")
    return {
        "cpu": f"{cpu}, {os.cpu_count()} CPUs",
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "python": platform.python_version(),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' with uncommitted changes' if dirty else ''}"


# -- command line ----------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> Config:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few runs of everything (~2 min)")
    p.add_argument("--runs", type=int, help="runs per contender (default: 30, the agent 100)")
    p.add_argument("--agent-runs", type=int, help="runs of the agent (default: 100, or --runs)")
    p.add_argument("--scale-runs", type=int, help="runs per contender and NIC load (default 3)")
    p.add_argument("--no-scale", action="store_true", help="skip the runs with more load")
    p.add_argument("--rollback-runs", type=int, help="per contender (default 5)")
    p.add_argument("--cold-runs", type=int, help="`bridge-migrate plan` starts (default 10)")
    p.add_argument("--interval-ms", type=float, help="probe interval (default 1)")
    p.add_argument("--tail-ms", type=float, help="probing after each contender (default 1500)")
    p.add_argument("--budget-minutes", type=float, help="start no run after this (default 30)")
    p.add_argument("--docs", type=Path, help="write benchmarks.md and the PNG here")
    p.add_argument("--no-docs", action="store_true", help="write no files")
    p.add_argument("--raw", type=Path, help="also write every run as JSON here")
    p.add_argument(
        "--candidate",
        type=Path,
        metavar="DIR",
        help="also run the agent from DIR (a directory holding a bridge_migrate package, e.g. "
        "a proposed fix) as a fourth contender, as often as the agent",
    )
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else Config()
    runs = cfg.runs if a.runs is None else a.runs
    # --runs alone sets every contender's count; the agent's default is its own.
    agent_runs = _pick(a.agent_runs, cfg.agent_runs if a.runs is None else runs)
    numbers = (runs, agent_runs, a.scale_runs, a.rollback_runs, a.cold_runs)
    if any(n is not None and not 0 <= n <= MAX_RUNS for n in numbers):
        p.error(f"run counts must be 0..{MAX_RUNS}")
    if a.interval_ms is not None and not 0.2 <= a.interval_ms <= 10:
        p.error("--interval-ms must be 0.2..10")
    docs = None if a.no_docs else a.docs or (None if a.quick else DOCS)
    return replace(
        cfg,
        runs=runs,
        agent_runs=agent_runs,
        scale_runs=_pick(a.scale_runs, cfg.scale_runs),
        rollback_runs=_pick(a.rollback_runs, cfg.rollback_runs),
        cold_runs=_pick(a.cold_runs, cfg.cold_runs),
        interval_ms=_pick(a.interval_ms, cfg.interval_ms),
        tail_s=cfg.tail_s if a.tail_ms is None else max(0.1, min(a.tail_ms, 10_000)) / 1000,
        shapes=() if a.no_scale else cfg.shapes,
        budget_minutes=min(_pick(a.budget_minutes, cfg.budget_minutes), MAX_MINUTES),
        docs=docs,
        raw=a.raw,
        candidate=_candidate(p, a.candidate),
    )


def _candidate(p: argparse.ArgumentParser, where: Path | None) -> Path | None:
    if where is not None and not (where / "bridge_migrate" / "__main__.py").is_file():
        p.error(f"--candidate {where}: no bridge_migrate package there")
    return where.resolve() if where is not None else None


def _pick(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="netlab-bench.") as tmp:
            result = Bench(cfg, Path(tmp)).run()
    except KeyboardInterrupt:
        print("\nbench: interrupted; lab removed", file=sys.stderr)
        return 130
    return publish(result)


def publish(result: BenchResult) -> int:
    cfg = result.config
    text, met = benchdoc.tables(result)
    print(text, flush=True)
    if cfg.raw is not None:
        cfg.raw.parent.mkdir(parents=True, exist_ok=True)
        cfg.raw.write_text(json.dumps(asdict(result), default=str) + "\n")
    if cfg.docs is not None:
        png = cfg.docs / "bench-timeline.png"
        note = draw(result.records, png, benchdoc.picture_title(result))
        _say(note)
        cfg.docs.mkdir(parents=True, exist_ok=True)
        md = cfg.docs / "benchmarks.md"
        old = md.read_text() if md.exists() else None
        md.write_text(benchdoc.document(result, text, note, old))
        _say(f"written: {cfg.docs / 'benchmarks.md'}")
    _say(f"bench took {result.seconds / 60:.1f} min")
    return 0 if met else 1


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
