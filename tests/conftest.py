"""Fixtures: a throwaway lab per test, and the agent run inside its host namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate_testlab import Lab

AGENT_TIMEOUT = 60.0  # bounds every agent run; the longest test deadline is a few seconds


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: builds network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass(frozen=True)
class Agent:
    """bridge-migrate, run as a process inside the lab's host namespace."""

    lab: Lab
    state_dir: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bridge_migrate", "--state-dir", str(self.state_dir), *args]

    def __call__(self, *args: str, timeout: float = AGENT_TIMEOUT) -> Run:
        started = time.monotonic()
        done = self.lab.run(self.lab.host_ns, self.argv(*args), timeout=timeout)
        return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return self.lab.popen(
            self.lab.host_ns,
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as built:
        yield built


@pytest.fixture
def agent(lab: Lab, tmp_path: Path) -> Agent:
    return Agent(lab, tmp_path / "state")
