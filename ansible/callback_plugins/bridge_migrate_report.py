"""Writes each host's bridge_migrate_result (set by the bridge_migrate role) to its report_file
as JSON, and prints a per-host summary at the end of the playbook -- also when the rollout
stopped, where the hosts it never reached keep the "not attempted" report the playbook wrote
first."""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bridge_migrate_report
type: aggregate
short_description: per-host JSON reports and a summary of a bridge-migrate rollout
description:
  - Writes the fact bridge_migrate_result of each host to its report_file, and prints one line
    per host of the report directory at the end.
"""


class CallbackModule(CallbackBase):  # type: ignore[misc]  # ansible-core is untyped
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bridge_migrate_report"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self) -> None:
        super().__init__()
        self.directories: set[str] = set()

    def v2_runner_on_ok(self, result: Any) -> None:
        facts = result._result.get("ansible_facts") or {}
        report = facts.get("bridge_migrate_result")
        if not isinstance(report, dict) or not report.get("report_file"):
            return
        path = str(report["report_file"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
        self.directories.add(os.path.dirname(path))

    def v2_playbook_on_stats(self, stats: Any) -> None:
        for directory in sorted(self.directories):
            self._display.banner(f"BRIDGE-MIGRATE REPORT ({directory})")
            for name in sorted(os.listdir(directory)):
                if not name.endswith(".json"):
                    continue
                try:
                    with open(os.path.join(directory, name)) as f:
                        r = json.load(f)
                except (OSError, ValueError):
                    continue
                code = r.get("exit_code")
                self._display.display(
                    f"{r.get('host', name[:-5])}: {r.get('result')}"
                    f"{'' if code is None else f' (exit {code})'}: {r.get('message', '')}"
                )
