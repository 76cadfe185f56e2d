"""ssh to the host: the first session (a control master of its own) and new connections, each
a fresh TCP connection that shares nothing with the first. Uses the user's ssh, configuration
and agent as they are; never asks for a password (BatchMode)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..contract import ExitCode
from .errors import RemoteError

COMMAND_TIMEOUT = 120.0  # one helper command (an install takes longest)
_ALIVE_TIMEOUT = 10.0
# The first session counts as dead after 3 unanswered keep-alives a second apart: a path that
# died (a firewall dropping everything on br0) is noticed in seconds, not after TCP's minutes.
_KEEPALIVE = ("ServerAliveInterval=1", "ServerAliveCountMax=3")
HELPER = resources.files(__package__).joinpath("hosthelper.py").read_text()


@dataclass(frozen=True)
class Answer:
    """A helper's answer over one connection: what it said, or why there was none."""

    reached: bool  # the command ran on the host (the connection worked)
    doc: dict[str, Any]  # the helper's JSON document ({} if not reached)
    error: str  # why not reached, or the helper's error

    @property
    def ok(self) -> bool:
        return self.reached and bool(self.doc.get("ok"))


@dataclass(frozen=True)
class SshTarget:
    host: str
    options: tuple[str, ...]  # ssh options, as given after HOST
    connect_timeout: float
    sudo: bool
    python: str


class Ssh:
    def __init__(self, target: SshTarget, control: Path) -> None:
        self.t = target
        self.control = control
        self.master: subprocess.Popen[bytes] | None = None

    def _base(self, connect_timeout: float) -> list[str]:
        seconds = max(1, math.ceil(connect_timeout))
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={seconds}"]

    def _mux(self) -> list[str]:
        # Through the master only: were it gone, ssh would quietly connect anew, and the
        # ProxyCommand that cannot work stops that.
        return [
            *self._base(self.t.connect_timeout),
            *("-o", f"ControlPath={self.control}", "-o", "ControlMaster=no"),
            *("-o", "ProxyCommand=false"),
        ]

    def _fresh(self, connect_timeout: float) -> list[str]:
        return [
            *self._base(connect_timeout),
            *("-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ControlPersist=no"),
        ]

    def helper_command(self, *args: str) -> str:
        """The helper, isolated, from / (a login directory's modules are never imported)."""
        sudo = ["sudo", "-n", "--"] if self.t.sudo else []
        argv = shlex.join([*sudo, self.t.python, "-I", "-c", HELPER])
        return f'cd / && exec {argv} "$SSH_CONNECTION" {shlex.join(args)}'

    def open(self) -> None:
        argv = [
            *self._base(self.t.connect_timeout),
            *("-o", "ControlMaster=yes", "-o", f"ControlPath={self.control}"),
            *("-o", "ControlPersist=no", "-o", _KEEPALIVE[0], "-o", _KEEPALIVE[1]),
            "-N",
            *self.t.options,
            self.t.host,
        ]
        self.master = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + self.t.connect_timeout + 10
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                err = (
                    self.master.stderr.read().decode(errors="replace") if self.master.stderr else ""
                )
                raise RemoteError(
                    ExitCode.REFUSED, f"cannot connect to {self.t.host}: {err.strip() or 'failed'}"
                )
            if self.alive():
                return
            time.sleep(0.05)
        raise RemoteError(ExitCode.REFUSED, f"cannot connect to {self.t.host}: no answer in time")

    def alive(self) -> bool:
        if self.master is None or self.master.poll() is not None:
            return False
        argv = [*self._mux(), "-O", "check", *self.t.options, self.t.host]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=_ALIVE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def close(self) -> None:
        if self.master is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            argv = [*self._mux(), "-O", "exit", *self.t.options, self.t.host]
            subprocess.run(argv, capture_output=True, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.master.wait(timeout=5)
        if self.master.poll() is None:
            self.master.kill()
            self.master.wait(timeout=5)
        if self.master.stderr is not None:
            self.master.stderr.close()
        self.master = None

    def helper(
        self,
        *args: str,
        fresh: bool,
        stdin: bytes | None = None,
        connect_timeout: float | None = None,
    ) -> Answer:
        """Run the helper over the first session or (fresh) a new connection."""
        seconds = self.t.connect_timeout if connect_timeout is None else connect_timeout
        how = self._fresh(seconds) if fresh else self._mux()
        argv = [*how, *self.t.options, self.t.host, self.helper_command(*args)]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            return Answer(False, {}, f"no answer within {COMMAND_TIMEOUT:g} s")
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        err = _last_line(done.stderr.decode(errors="replace"))
        if done.returncode == 255 or not lines:  # ssh's own failure: nothing ran
            return Answer(False, {}, err or f"ssh exit {done.returncode}")
        try:
            doc = json.loads(lines[-1])  # a login shell may have printed before it
        except json.JSONDecodeError:
            return Answer(False, {}, err or f"{self.t.python} printed no answer")
        return Answer(True, doc, str(doc.get("error", "")))

    def follow(self, unit: str, bound: float) -> Iterator[dict[str, Any]]:
        """The unit's journal entries (`journalctl -o json`) over the first session, as they
        come, until the caller stops, the bound passes or the session drops."""
        journal = ["journalctl", "-b", "-u", f"{unit}.service", "-f", "-o", "json", "-n", "all"]
        sudo = ["sudo", "-n", "--"] if self.t.sudo else []
        command = shlex.join([*sudo, "timeout", f"{math.ceil(bound)}", *journal])
        argv = [*self._mux(), *self.t.options, self.t.host, command]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + bound + 5
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    with contextlib.suppress(json.JSONDecodeError):
                        yield json.loads(raw)
        finally:
            if proc.poll() is None:
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            proc.stdout.close()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
