"""bridge-migrate: the command line. Parses, validates, dispatches; exit codes in errors.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pyroute2 import IPRoute

from .errors import ExitCode, Failure, UsageError
from .preflight import check_name, check_timeout
from .record import Store, StoreError, Transaction
from .report import Report
from .transaction import ApplyRequest, apply, read_plan, rollback
from .verify import ProbeSyntaxError, parse_probe

DEFAULT_STATE_DIR = "/run/bridge-migrate"
STATE_DIR_ENV = "BRIDGE_MIGRATE_STATE_DIR"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"bridge-migrate: {message}. Nothing was changed", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bridge-migrate",
        description="Move a single-NIC host's addresses and routes onto a bridge, verified, "
        "with exact rollback.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)),
        help=f"transaction record and lock (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (
        ("plan", "show what was read and the operations, with their inverses; change nothing"),
        ("apply", "take over: one netlink batch, verify, commit or roll back"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--nic", help="the NIC to take over (default: the default route's)")
        sub.add_argument("--bridge", default="br0", help="the bridge to create (default: br0)")
        if name == "apply":
            sub.add_argument(
                "--timeout",
                type=float,
                default=10.0,
                help="seconds for the gateway to answer before rolling back (default: 10)",
            )
            sub.add_argument(
                "--probe",
                action="append",
                default=[],
                metavar="TARGET",
                help="also require icmp:ADDR or tcp:ADDR:PORT to answer (repeatable)",
            )
        sub.add_argument("--json", action="store_true", help="print one JSON document")
    for name, text in (
        ("rollback", "restore the snapshot of the recorded transaction"),
        ("status", "show the recorded transaction"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = Report(as_json=args.json)
    store = Store(args.state_dir)
    try:
        return int(_dispatch(args, store, report))
    except Failure as e:
        return _fail(report, e.code, e.message, e.hint)
    except StoreError as e:
        return _fail(report, ExitCode.REFUSED, str(e.strerror), "")
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return _fail(report, ExitCode.INTERNAL, f"internal error: {e!r}", "")


def _dispatch(args: argparse.Namespace, store: Store, report: Report) -> ExitCode:
    if args.command == "plan":
        return _plan(_request(args), report)
    if args.command == "apply":
        return apply(_request(args), store, report)
    if args.command == "rollback":
        return rollback(store, report)
    return _status(store, report)


def _request(args: argparse.Namespace) -> ApplyRequest:
    if args.nic is not None:
        check_name("--nic", args.nic)
    check_name("--bridge", args.bridge)
    timeout = getattr(args, "timeout", 10.0)
    check_timeout(timeout)
    try:
        probes = tuple(parse_probe(p) for p in getattr(args, "probe", []))
    except ProbeSyntaxError as e:
        raise UsageError(str(e)) from None
    return ApplyRequest(nic=args.nic, bridge=args.bridge, timeout=timeout, probes=probes)


def _plan(req: ApplyRequest, report: Report) -> ExitCode:
    with IPRoute() as ipr:
        prepared = read_plan(ipr, req, report)
    if prepared is None:
        report.finish(ExitCode.OK, "already migrated", "nothing to do")
        return ExitCode.OK
    plan, state = prepared.plan, prepared.snapshot
    nic = plan.nic
    for what, items in (
        ("address", state.addresses_on(nic)),
        ("route", state.routes_on(nic)),
        ("neighbour", state.neighbours_on(nic)),
    ):
        for item in items:
            report.note(f"read    {what} {item}")
    steps = [("prepare", plan.prepare), *((f"{i:>7}", s) for i, s in enumerate(plan.batch, 1))]
    for label, step in steps:
        report.note(f"{label} {step.do!s:<60}  undo: {step.undo}")
    report.note("verify  " + ", ".join(str(p) for p in prepared.probes))
    report.finish(ExitCode.OK, "plan", "nothing was changed")
    return ExitCode.OK


def _status(store: Store, report: Report) -> ExitCode:
    tx = store.load()
    if tx is None:
        report.finish(ExitCode.OK, "no transaction", f"no record in {store.directory}")
        return ExitCode.OK
    report.attach("transaction", tx)
    for line in _describe(tx):
        report.note(line)
    report.finish(ExitCode.OK, str(tx.phase), tx.detail)
    return ExitCode.OK


def _describe(tx: Transaction) -> list[str]:
    def when(t: float) -> str:
        return datetime.fromtimestamp(t).isoformat(timespec="seconds")

    lines = [
        f"transaction {tx.id}: {tx.plan.nic} -> {tx.plan.bridge}, {tx.phase}",
        f"started {when(tx.started)} by pid {tx.pid}, updated {when(tx.updated)}",
    ]
    if tx.phase.pending:
        left = tx.deadline - time.time()
        lines.append(f"deadline {when(tx.deadline)} ({left:.1f} s left)")
    return lines


def _fail(report: Report, code: ExitCode, message: str, hint: str) -> int:
    text = f"{message}. {hint}" if hint else message
    if code in (ExitCode.USAGE, ExitCode.REFUSED):
        text += ". Nothing was changed"
    if report.as_json:
        report.finish(code, "error", text)
    else:
        print(f"bridge-migrate: {text}", file=sys.stderr)
    return int(code)
