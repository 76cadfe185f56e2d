"""bridge-migrate-remote's entry point: parse, run, print the report."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import assert_never

from ..contract import ExitCode
from . import wheels
from .driver import Migration, Progress, Trace, Verdict, report
from .errors import RemoteError
from .options import BuildWheels, Help, Options, parse, print_usage
from .ssh import Ssh, SshTarget


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parsed = parse(sys.argv[1:] if argv is None else argv)
    except RemoteError as e:
        print(f"bridge-migrate-remote: {e.message} (see --help)", file=sys.stderr)
        return int(e.code)
    match parsed:
        case Help():
            print_usage()
            return ExitCode.OK
        case BuildWheels(target):
            return _build(target)
        case Options():
            return _migrate(parsed)
        case _:
            assert_never(parsed)


def _build(target: Path) -> int:
    try:
        wheels.build_wheels(target)
    except RemoteError as e:
        print(f"bridge-migrate-remote: {e.message}", file=sys.stderr)
        return int(e.code)
    built = " ".join(sorted(p.name for p in target.glob("*.whl")))
    print(f"bridge-migrate-remote: wheels in {target}: {built}", file=sys.stderr)
    return ExitCode.OK


def _migrate(o: Options) -> int:
    trace = Trace()
    progress = Progress(sys.stderr if o.json else sys.stdout, o.host, trace)
    # Private to this run: the control socket, and the wheels when none were given.
    with tempfile.TemporaryDirectory(prefix="bmr-") as tmp:
        target = SshTarget(o.host, o.ssh, o.connect_timeout, o.sudo, o.python)
        ssh = Ssh(target, Path(tmp) / "cm")
        try:
            if o.wheels is None:
                progress.say("building the agent's wheels from this checkout")
                o = replace(o, wheels=wheels.build_wheels(Path(tmp) / "wheels"))
            migration = Migration(o, ssh, trace, progress)
            try:
                verdict = migration.run()
            finally:
                trace.first_session = migration.first_session_state()
        except RemoteError as e:
            name = {ExitCode.USAGE: "usage", ExitCode.REFUSED: "refused"}.get(e.code, "error")
            verdict = Verdict(e.code, name, e.message)
        except KeyboardInterrupt:
            verdict = Verdict(
                ExitCode.INTERNAL,
                "interrupted",
                "interrupted here; if apply had started and was not confirmed, the host's dead "
                "man rolls it back: see `bridge-migrate status` on the host",
            )
        finally:
            ssh.close()
    progress.say(f"{verdict.result}: {verdict.message} (exit {int(verdict.code)})")
    progress.say(f"first SSH session: {trace.first_session}")
    if o.json:
        json.dump(report(o, trace, verdict), sys.stdout, indent=1)
        print(flush=True)
    return int(verdict.code)
