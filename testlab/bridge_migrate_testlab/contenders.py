"""The benchmark's contenders, as the bench runs them in the lab's host namespace, and what each
one's own report says about the takeover (or the rollback after a failed verification)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge_migrate.contract import Stage, StageName
from bridge_migrate_testlab.lab import Lab

RUN_TIMEOUT_S = 120.0  # bounds one contender run (1000 routes as separate `ip` processes: ~10 s)


@dataclass(frozen=True)
class Attempt:
    """One contender run, from its own report. Times in ms; None where it does not apply."""

    ok: bool  # verified, or (in a rollback run) restored to the snapshot
    started: float  # wall clock (time.time()) when the bench started the process
    wall_ms: float  # the whole process, interpreter start included
    verified_ms: float | None  # first read of the host -> gateways answered on the bridge
    change_ms: float | None  # the disruptive operations (agent: its one batch)
    ops: int
    rollback_netlink_ms: float | None  # the inverse operations
    rollback_total_ms: float | None  # with reading back and comparing with the snapshot
    detail: str


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # "agent" (bridge-migrate apply), "recipe" or "unbatched" (stepwise.py)
    baseline: bool = False  # the others are compared with this one
    pythonpath: str | None = None  # run the agent from this checkout's agent/ instead

    def argv(self, state_dir: Path, timeout: float) -> list[str]:
        if self.kind == "agent":
            cli = [sys.executable, "-m", "bridge_migrate", "--state-dir", str(state_dir)]
            return [*cli, "apply", "--json", "--timeout", f"{timeout:g}"]
        return [
            sys.executable,
            "-m",
            "bridge_migrate_testlab.stepwise",
            self.kind,
            "--timeout",
            f"{timeout:g}",
        ]

    def run(self, lab: Lab, state_dir: Path, timeout: float) -> Attempt:
        started, t0 = time.time(), time.perf_counter()
        env = {"PYTHONPATH": self.pythonpath} if self.pythonpath else None
        # stdin is a pipe, not the terminal: the agent must not detach into a systemd unit.
        argv = self.argv(state_dir, timeout)
        done = lab.run(lab.host_ns, argv, input="", timeout=RUN_TIMEOUT_S, env=env)
        wall = (time.perf_counter() - t0) * 1000
        doc = _json_doc(done.stdout)
        if doc is None:
            why = f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
            return Attempt(False, started, wall, None, None, 0, None, None, why)
        parse = _parse_agent if self.kind == "agent" else _parse_stepwise
        return parse(doc, started, wall)


CONTENDERS = (
    Contender("agent", "bridge-migrate apply (one batch)", "agent"),
    Contender("recipe", "classic recipe (ip commands)", "recipe", baseline=True),
    Contender("unbatched", "same operations, one netlink call each", "unbatched"),
)
# `scripts/bench --candidate DIR`: the agent from another checkout, e.g. a proposed fix.
CANDIDATE = Contender("candidate", "candidate agent (--candidate)", "agent")
KNOWN = (*CONTENDERS, CANDIDATE)


def lookup(key: str) -> Contender:
    return next(c for c in KNOWN if c.key == key)


def _json_doc(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        doc = json.loads(text[start:])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _parse_agent(doc: dict[str, Any], started: float, wall: float) -> Attempt:
    stages = {s.name: s for s in map(Stage.from_data, doc.get("phases", []))}
    names = list(stages)
    verified = doc.get("exit_code") == 0 and StageName.VERIFY in stages
    # The stages follow each other without gaps: up to "gateway verified", they add up to the
    # time from the agent's start (after its imports) to the gateway answering on the bridge.
    upto = names[: names.index(StageName.VERIFY) + 1] if StageName.VERIFY in names else []
    batch, rollback = stages.get(StageName.BATCH), stages.get(StageName.ROLLBACK)
    return Attempt(
        ok=verified or (rollback is not None and doc.get("result") == "rolled back"),
        started=started,
        wall_ms=wall,
        verified_ms=sum(stages[n].ms for n in upto) if verified else None,
        change_ms=batch.kernel_ms if batch else None,
        ops=batch.total or 0 if batch else 0,
        rollback_netlink_ms=rollback.kernel_ms if rollback else None,
        rollback_total_ms=rollback.ms if rollback else None,
        detail=f"{doc.get('result')}: {doc.get('message', '')}",
    )


def _parse_stepwise(doc: dict[str, Any], started: float, wall: float) -> Attempt:
    undo = doc.get("undo")
    failed = doc.get("failed_ops") or []
    restored = undo is not None and not undo["differences"] and not undo["failed"]
    return Attempt(
        ok=bool(doc["verified"]) or restored,
        started=started,
        wall_ms=wall,
        verified_ms=doc.get("verified_ms"),
        change_ms=float(doc["change_ms"]),
        ops=int(doc["ops"]),
        rollback_netlink_ms=float(undo["netlink_ms"]) if undo else None,
        rollback_total_ms=float(undo["total_ms"]) if undo else None,
        detail="; ".join(failed[:3]) or ("verified" if doc["verified"] else "not verified"),
    )
