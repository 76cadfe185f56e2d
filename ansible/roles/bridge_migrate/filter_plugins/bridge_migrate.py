"""Filters of the bridge_migrate role: read what the agent and its unit said, and decide the
host's outcome with the exit codes of bridge-migrate (0 migrated, 1 error, 2 usage, 3 refused,
4 rolled back, 5 rollback incomplete)."""

from __future__ import annotations

import json
import re
from typing import Any

END_MARK = "BRIDGE-MIGRATE-REMOTE-END"
RESULTS = {
    0: "migrated",
    1: "error",
    2: "usage",
    3: "refused",
    4: "rolled back",
    5: "rollback incomplete",
}


def bm_marked(text: str, mark: str) -> str:
    """The rest of the last line of text that starts with `mark `."""
    for line in reversed((text or "").splitlines()):
        if line.startswith(mark + " "):
            return line[len(mark) + 1 :]
    return ""


def bm_json(text: str) -> dict[str, Any]:
    """The first JSON document in text (a login shell may print before it); {} if none."""
    text = text or ""
    start = text.find("{")
    while start != -1:
        try:
            doc = json.loads(text[start:])
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            start = text.find("{", start + 1)
    return {}


def bm_unit_end(journal: str) -> dict[str, Any]:
    """The unit's end mark (ExecStopPost): {"result", "code", "status", "exit"}; {} if none."""
    end = bm_marked(journal, END_MARK)
    if not end:
        return {}
    fields = dict(p.split("=", 1) for p in end.split() if "=" in p)
    status = fields.get("status", "")
    exited = fields.get("code") == "exited" and status.isdigit()
    return {**fields, "exit": int(status) if exited else 1}


def bm_agent_lines(journal: str, unit: str) -> list[str]:
    """The agent's own lines of the unit's journal (not systemd's about the unit)."""
    return [
        line
        for line in (journal or "").splitlines()
        if line.strip() and unit not in line and not line.startswith(END_MARK)
    ]


def bm_transaction(journal: str) -> str:
    m = re.search(r"bridge-migrate-([0-9a-f]{12})-", journal or "")
    return m.group(1) if m else ""


def bm_outcome(r: dict[str, Any]) -> dict[str, Any]:
    """The host's outcome from what the role saw (keys as set by tasks/migrate.yml)."""
    unit_exit = _int(r.get("unit_exit"))
    lines = r.get("lines") or []
    last = lines[-1].strip() if lines else ""
    status = r.get("final_status") or r.get("status") or {}
    phase = status.get("result", "") if status.get("transaction") else ""
    said = f"host says: {phase}: {status.get('message', '')}" if phase else ""
    if _true(r.get("confirmed")):
        return {
            "exit_code": 0,
            "result": "migrated",
            "message": "verified, and confirmed over a new SSH connection",
        }
    if _true(r.get("awaited_dead_man")):
        why = "not confirmed over a new SSH connection in time"
        if r.get("confirm_error"):
            why += f" ({r['confirm_error']})"
        if not status:
            return {
                "exit_code": 1,
                "result": "unknown",
                "message": why + "; the host did not answer afterwards: state unknown",
            }
        message = f"{why}; {said}"
        code = {"rolled-back": 4, "rollback-incomplete": 5, "committed": 0}.get(phase, 1)
        return {
            "exit_code": code,
            "result": RESULTS[code] if code != 1 else "unknown",
            "message": message,
        }
    if unit_exit is None:
        return {
            "exit_code": 1,
            "result": "unknown",
            "message": "the apply unit did not end in time; " + (said or last),
        }
    if unit_exit == 0:
        return {"exit_code": 0, "result": "already migrated", "message": last}
    code = unit_exit if unit_exit in RESULTS else 1
    result = RESULTS[code]
    if last.startswith(result + ":"):  # the agent's own result line: "rolled back: why"
        last = last[len(result) + 1 :].strip()
    detail = status.get("message", "") if phase else ""
    message = last if detail and detail in last else "; ".join(x for x in (last, said) if x)
    return {"exit_code": code, "result": result, "message": message}


def _true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "yes", "1")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "bm_marked": bm_marked,
            "bm_json": bm_json,
            "bm_unit_end": bm_unit_end,
            "bm_agent_lines": bm_agent_lines,
            "bm_transaction": bm_transaction,
            "bm_outcome": bm_outcome,
        }
