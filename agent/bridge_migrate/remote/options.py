"""The driver's command line: its own options, then HOST and ssh options, then `--` and the
options of `bridge-migrate apply`."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..contract import DEFAULT_STATE_DIR, DEFAULT_TIMEOUT, ExitCode
from .errors import RemoteError

USAGE = """\
usage: bridge-migrate-remote [OPTIONS] HOST [SSH OPTIONS...] [-- APPLY OPTIONS...]
       bridge-migrate-remote --build-wheels DIR

Runs bridge-migrate on HOST over SSH, commit-confirmed over a NEW SSH connection:
  1. over one SSH connection (the first session): checks the host, installs the agent into its
     own virtual environment (--prefix) if it is missing, broken or a different build than this
     one (the wheels go over SSH; the host fetches nothing), and starts `bridge-migrate apply
     --confirm-within S APPLY OPTIONS` as a transient systemd unit there (a hang-up does not
     stop it), following its events;
  2. then, over NEW connections only (the first session may have died with the old path):
     reads the host's record of this run's transaction and confirms it if it waits for that.
     If no new connection gets through in the window, the host's dead man rolls back; the
     driver keeps asking until it learns the outcome, or gives up after the dead man's deadline
     plus --reconnect-within (exit 1, state unknown).

HOST and SSH OPTIONS go to ssh as given: your ssh configuration, keys and agent are used; never
a password prompt (BatchMode=yes). After `--` come options of `bridge-migrate apply` (--nic,
--bridge, --timeout, --probe, --confirm-within; default --confirm-within 60).

Options (before HOST):
  --prefix DIR          the agent's environment on the host (default /opt/bridge-migrate; a
                        directory of its own, not a system directory)
  --python PATH         the host's Python for it (default /usr/bin/python3)
  --wheels DIR          install from the wheels in DIR (made by --build-wheels)
  --build-wheels DIR    build the agent's wheel and its dependencies' into DIR, then exit
  --sudo                log in as a user with passwordless sudo; run as root through `sudo -n`
  --connect-timeout S   for every SSH connection (default 10)
  --reconnect-within S  after the dead man's deadline, keep trying this long (default 60)
  --json                print one JSON report at the end (progress goes to stderr)
  -h, --help            this text

The host needs: systemd as PID 1; Python >= 3.11 with venv and the systemd bindings
(python3-systemd); root or --sudo; sshd. Left on it: the agent in --prefix, its record in
/var/lib/bridge-migrate.

Exit codes (the agent's, see its README):
  0  migrated, verified and confirmed over a new SSH connection; or the agent said the host
     was already migrated before this run
  1  unexpected error, or the host's final state could not be learnt ("unknown")
  2  invalid usage (of this command, or of the apply options); nothing changed
  3  refused: unreachable, a missing requirement, or the agent's pre-flight check; nothing
     changed
  4  rolled back (not verified, not confirmed in time, or cut short by a restart of the host)
  5  the rollback left differences (see `bridge-migrate status` on the host)"""

DEFAULT_WINDOW = 60.0
_LIMIT = 3600.0
# The agent's apply options that take a value, to find --timeout and --confirm-within.
_APPLY_VALUE_FLAGS = {"--nic", "--bridge", "--timeout", "--probe", "--confirm-within"}
# The driver reads the outcome itself; the agent's output options are its own business.
_APPLY_OUTPUT_FLAGS = {"--json", "--events"}
_OWN_VALUE_FLAGS = {
    "--prefix",
    "--python",
    "--wheels",
    "--build-wheels",
    "--connect-timeout",
    "--reconnect-within",
}
_SSH_VALUE_FLAGS = set("BbcDEeFIiJLlmOoPpQRSWw")  # ssh(1) options that take an argument


@dataclass(frozen=True)
class Options:
    host: str
    ssh: tuple[str, ...]
    apply: tuple[str, ...]  # with --confirm-within
    prefix: str
    python: str
    wheels: Path | None
    sudo: bool
    connect_timeout: float
    reconnect_within: float
    json: bool
    window: float  # --confirm-within
    timeout: float  # --timeout
    state_dir: str = DEFAULT_STATE_DIR


@dataclass(frozen=True)
class BuildWheels:
    target: Path


@dataclass(frozen=True)
class Help:
    pass


def parse(argv: Sequence[str]) -> Options | BuildWheels | Help:
    args, own, i = list(argv), dict[str, str](), 0
    flags: set[str] = set()
    while i < len(args) and args[i].startswith("-"):
        flag, eq, inline = args[i].partition("=")
        if flag in ("-h", "--help"):
            return Help()
        if flag in ("--sudo", "--json") and not eq:
            flags.add(flag)
        elif flag in _OWN_VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(args):
                    raise _usage(f"{flag} needs a value")
                inline = args[i]
            own[flag] = inline
        else:
            raise _usage(f"unknown option {args[i]} (options of this command come before HOST)")
        i += 1
    if "--build-wheels" in own:
        if i < len(args) or len(own) > 1 or flags:
            raise _usage("--build-wheels DIR takes nothing else")
        return BuildWheels(Path(own["--build-wheels"]))
    if i >= len(args):
        raise _usage("no HOST given")
    rest = args[i + 1 :]
    cut = rest.index("--") if "--" in rest else len(rest)
    ssh, apply = tuple(rest[:cut]), tuple(rest[cut + 1 :])
    _check_ssh_options(ssh)
    timeout, window = _apply_times(apply)
    if window is None:
        window, apply = DEFAULT_WINDOW, (*apply, "--confirm-within", f"{DEFAULT_WINDOW:g}")
    return Options(
        host=args[i],
        ssh=ssh,
        apply=apply,
        prefix=_prefix(own.get("--prefix", "/opt/bridge-migrate")),
        python=own.get("--python", "/usr/bin/python3"),
        wheels=Path(own["--wheels"]) if "--wheels" in own else None,
        sudo="--sudo" in flags,
        connect_timeout=_seconds("--connect-timeout", own.get("--connect-timeout", "10")),
        reconnect_within=_seconds("--reconnect-within", own.get("--reconnect-within", "60")),
        json="--json" in flags,
        window=window,
        timeout=timeout,
    )


def _usage(message: str) -> RemoteError:
    return RemoteError(ExitCode.USAGE, message)


def _prefix(value: str) -> str:
    if not value.startswith("/") or os.path.normpath(value) != value:
        raise _usage(f"--prefix {value!r}: give a normalised absolute path")
    return value


def _seconds(flag: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise _usage(f"{flag} {value!r}: not a number") from None
    if not (0 < seconds <= _LIMIT and math.isfinite(seconds)):
        raise _usage(f"{flag} {value}: must be > 0 and <= {_LIMIT:g}")
    return seconds


def _check_ssh_options(opts: Sequence[str]) -> None:
    i = 0
    while i < len(opts):
        arg = opts[i]
        if not arg.startswith("-") or arg == "-":
            raise _usage(f"{arg!r} after HOST: only ssh options may follow it (then `--`)")
        if arg[1] in _SSH_VALUE_FLAGS and len(arg) == 2:
            i += 1
            if i >= len(opts):
                raise _usage(f"ssh option {arg} needs a value")
        i += 1


def _apply_times(apply: Sequence[str]) -> tuple[float, float | None]:
    """apply's --timeout (the agent's default if not given) and --confirm-within."""
    timeout, window, i = DEFAULT_TIMEOUT, None, 0
    while i < len(apply):
        flag, eq, value = apply[i].partition("=")
        if flag in _APPLY_OUTPUT_FLAGS:
            raise _usage(f"{flag} is not for apply here: the driver's --json comes before HOST")
        if flag in _APPLY_VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(apply):
                    raise _usage(f"apply option {flag} needs a value")
                value = apply[i]
            if flag == "--confirm-within":
                window = _seconds(flag, value)
            elif flag == "--timeout":
                timeout = _seconds(flag, value)
        i += 1
    return timeout, window


def print_usage() -> None:
    print(USAGE, file=sys.stdout)
