"""bridge-migrate: the command line. Parses, validates, dispatches; exit codes in contract.py."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import assert_never

from . import detach, guestbook
from .config import DEFAULT_PATH, Config, load_config, where
from .contract import (
    CONFIG_ENV,
    DEFAULT_STATE_DIR,
    DEFAULT_TIMEOUT,
    STATE_DIR_ENV,
    ExitCode,
    Summary,
)
from .errors import Failure, UsageError
from .events import printable
from .plan import RewriteFirewall, WriteConfig
from .preflight import check_name, check_timeout
from .prepare import ApplyRequest, read_plan
from .probes import Probe, ProbeSyntaxError, parse_probe
from .progress import Output, Progress
from .record import Store, Transaction, check_id, current_boot_id


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"bridge-migrate: {message}. Nothing was changed", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


class _Version(argparse.Action):
    """The build identity hashes the package's files: only when asked, not at every start."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import build

        print(f"bridge-migrate {build.version()} (build {build.identity()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bridge-migrate",
        description="Move a single-NIC host's addresses and routes onto a bridge, verified, "
        "with exact rollback.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and build")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)),
        help=f"transaction record and lock (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: ${CONFIG_ENV} or {DEFAULT_PATH}, if it exists)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (
        ("plan", "show what was read and the operations, with their inverses; change nothing"),
        ("apply", "take over: one netlink batch, verify, commit or roll back"),
        ("boot", "what the boot-time unit runs: apply, unless a restart interrupted the last one"),
        (
            "undo",
            "move the host back from the bridge onto its one port, verified; no record needed",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        if name == "undo":
            sub.add_argument("--bridge", help="the bridge to leave (default: br0)")
            sub.add_argument(
                "--detach",
                action="append",
                metavar="PORT",
                help="another port (a guest) to release from the bridge first (repeatable)",
            )
        else:
            sub.add_argument("--nic", help="the NIC to take over (default: the default route's)")
            sub.add_argument("--bridge", help="the bridge to create (default: br0)")
        if name != "plan":
            sub.add_argument(
                "--timeout",
                type=float,
                help="seconds for the gateway to answer before rolling back "
                f"(default: {DEFAULT_TIMEOUT:g})",
            )
            sub.add_argument(
                "--probe",
                action="append",
                metavar="TARGET",
                help="also require icmp:ADDR or tcp:ADDR:PORT to answer (repeatable)",
            )
            sub.add_argument(
                "--confirm-within",
                type=float,
                metavar="S",
                help="after verifying, roll back in S seconds unless `confirm` is run",
            )
        output = sub.add_mutually_exclusive_group()
        output.add_argument("--json", action="store_true", help="print one JSON document")
        if name in ("apply", "undo"):
            output.add_argument(
                "--events", action="store_true", help="print a JSON line per event, as it happens"
            )
    _add_guest_commands(commands)
    for name, text in (
        ("confirm", "commit the transaction that waits for confirmation"),
        ("rollback", "restore the snapshot of the recorded transaction"),
        ("status", "show the recorded transaction"),
        ("expire", "what the dead man runs: roll transaction ID back if it is still pending"),
        (
            "recover",
            "what a network manager's unit runs first while a transaction is pending: after a "
            "restart, put the manager's files back",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        if name == "expire":
            sub.add_argument("transaction", metavar="ID")
        sub.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def _add_guest_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    text = "give GUEST an interface on the bridge with these addresses, verified from inside it"
    sub = commands.add_parser("attach", help=text, description=text)
    sub.add_argument("guest", metavar="GUEST", help="netns:NAME, pid:PID (or PID), or a container")
    sub.add_argument(
        "addresses", nargs="+", metavar="ADDRESS/PREFIX[@GATEWAY]", help="IPv4 or IPv6"
    )
    sub.add_argument("--bridge", default="br0", help="the bridge (default: br0)")
    sub.add_argument("--ifname", default="eth1", help="the guest's interface (default: eth1)")
    sub.add_argument("--mac", help="the guest interface's MAC (default: a random one)")
    sub.add_argument("--mtu", type=int, help="the guest interface's MTU (default: the bridge's)")
    sub.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for the gateway to answer (default: {DEFAULT_TIMEOUT:g})",
    )
    sub.add_argument(
        "--force-prefix", action="store_true", help="allow a prefix the host is not on"
    )
    sub.add_argument("--replace", action="store_true", help="replace another attach of --ifname")
    sub.add_argument("--json", action="store_true", help="print one JSON document")
    text = "remove what `attach` added to GUEST"
    sub = commands.add_parser("detach", help=text, description=text)
    sub.add_argument("guest", metavar="GUEST", help="as given to attach")
    sub.add_argument("--ifname", default="eth1", help="the guest's interface (default: eth1)")
    sub.add_argument("--json", action="store_true", help="print one JSON document")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Absolute before anything uses it: the dead man and the apply unit run in /. Not
    # resolved: the store refuses a path through a symbolic link rather than follow it.
    args.state_dir = Path(os.path.abspath(args.state_dir))
    _import_for(args.command)
    progress = Progress(_output(args))  # the run's clock starts: its stages add up from here
    store = Store(args.state_dir)
    try:
        if args.command in ("apply", "undo") and detach.wanted():
            request = _request(args)  # bad input is refused here, before any unit starts
            return detach.run_as_unit(store, _unit_argv(args, request))
        return int(_dispatch(args, store, progress))
    except Failure as e:
        return _fail(progress, e.code, e.message, e.hint)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return _fail(progress, ExitCode.INTERNAL, f"internal error: {e!r}", "")


def _import_for(command: str) -> None:
    """What the command runs, imported before its clock starts. `plan` and `status` need none
    of what changes the host, and start faster without it."""
    if command in ("attach", "detach"):
        importlib.import_module(".attach", __package__)
    elif command not in ("plan", "status"):
        importlib.import_module(".transaction", __package__)


def _output(args: argparse.Namespace) -> Output:
    if args.json:
        return Output.JSON
    return Output.EVENTS if getattr(args, "events", False) else Output.TEXT


def _dispatch(args: argparse.Namespace, store: Store, progress: Progress) -> ExitCode:
    match args.command:
        case "plan":
            return _plan(_request(args), progress)
        case "attach" | "detach":
            return _guest(args, store, progress)
        case "status":
            return _status(store, progress)
    # What changes the host, imported only by the commands that do: `plan` starts faster.
    from . import transaction

    match args.command:
        case "apply" | "boot":
            boot = args.command == "boot"
            return transaction.apply(_request(args), store, progress, at_boot=boot)
        case "undo":
            return transaction.undo(_request(args), store, progress)
        case "confirm":
            return transaction.confirm(store, progress)
        case "rollback":
            return transaction.rollback(store, progress)
        case "expire":
            check_id(args.transaction)
            return transaction.expire(store, progress, args.transaction)
    return transaction.recover(store, progress)


def _guest(args: argparse.Namespace, store: Store, progress: Progress) -> ExitCode:
    from .attach import AttachRequest, attach, detach
    from .attachment import parse_spec
    from .guest import parse_guest

    if args.command == "detach":
        check_name("--ifname", args.ifname)
        return detach(parse_guest(args.guest), args.ifname, store, progress)
    check_timeout("--timeout", args.timeout)
    spec = parse_spec(args.bridge, args.ifname, args.addresses, args.mtu, args.mac)
    request = AttachRequest(
        parse_guest(args.guest), spec, args.timeout, args.force_prefix, args.replace
    )
    return attach(request, store, progress)


def _request(args: argparse.Namespace) -> ApplyRequest:
    """Flags over the configuration file over defaults; every value checked, and a bad one
    named by where it came from."""
    path = args.config or Path(os.environ.get(CONFIG_ENV, DEFAULT_PATH))
    config = load_config(path, required=args.config is not None)

    def source(key: str, flag: str, given: object) -> str:
        return flag if given is not None else where(path, key)

    given_nic = getattr(args, "nic", None)  # undo has none: the bridge's port is the NIC
    nic = given_nic if given_nic is not None else config.nic if args.command != "undo" else None
    if nic is not None:
        check_name(source("nic", "--nic", given_nic), nic)
    bridge = next(b for b in (args.bridge, config.bridge, "br0") if b is not None)
    check_name(source("bridge", "--bridge", args.bridge), bridge)
    timeout = _pick(getattr(args, "timeout", None), config.timeout, DEFAULT_TIMEOUT) or 0.0
    check_timeout(source("timeout", "--timeout", getattr(args, "timeout", None)), timeout)
    confirm_within = _pick(getattr(args, "confirm_within", None), config.confirm_within, None)
    if confirm_within is not None:
        flag = getattr(args, "confirm_within", None)
        check_timeout(source("confirm_within", "--confirm-within", flag), confirm_within)
    detach = tuple(getattr(args, "detach", None) or ())
    for port in detach:
        check_name("--detach", port)
    return ApplyRequest(
        nic=nic,
        bridge=bridge,
        timeout=timeout,
        probes=_probes(args, config, path),
        confirm_within=confirm_within,
        detach=detach,
    )


def _pick(flag: float | None, configured: float | None, default: float | None) -> float | None:
    return flag if flag is not None else configured if configured is not None else default


def _probes(args: argparse.Namespace, config: Config, path: Path) -> tuple[Probe, ...]:
    given = getattr(args, "probe", None)
    texts = given if given is not None else list(config.probes)
    what = "--probe" if given is not None else where(path, "probes")
    try:
        return tuple(parse_probe(p, what) for p in texts)
    except ProbeSyntaxError as e:
        raise UsageError(str(e)) from None


def _unit_argv(args: argparse.Namespace, req: ApplyRequest) -> list[str]:
    """The same command, spelled out, for the unit (which has none of this shell's
    environment)."""
    argv = ["--state-dir", str(args.state_dir), args.command, "--bridge", req.bridge]
    argv += ["--timeout", f"{req.timeout:g}"]
    for port in req.detach:
        argv += ["--detach", port]
    if req.nic:
        argv += ["--nic", req.nic]
    for probe in req.probes:
        argv += ["--probe", probe.spec]
    if req.confirm_within is not None:
        argv += ["--confirm-within", f"{req.confirm_within:g}"]
    if args.json:
        argv.append("--json")
    if args.events:
        argv.append("--events")
    return argv


def _plan(req: ApplyRequest, progress: Progress) -> ExitCode:
    prepared = read_plan(req, progress)
    if prepared is None:
        progress.finish(ExitCode.OK, "already migrated", "nothing to do")
        return ExitCode.OK
    plan, state = prepared.plan, prepared.snapshot
    nic = plan.nic
    for what, items in (
        ("address", state.addresses_on(nic)),
        ("route", state.routes_on(nic)),
        ("neighbour", state.neighbours_on(nic)),
        ("policy", state.rules),
        ("nftables rule", state.firewall),
    ):
        for item in items:
            progress.note(f"read    {what} {item}")
    steps = [
        ("prepare", plan.prepare),
        *((f"tune {i:>2}", s) for i, s in enumerate(plan.tune, 1)),
        *((f"make {i:>2}", s) for i, s in enumerate(plan.make, 1)),
        *((f"batch{i:>2}", s) for i, s in enumerate(plan.batch, 1)),
        *((f"hand {i:>2}", s) for i, s in enumerate(plan.handover, 1)),
    ]
    for label, step in steps:
        progress.note(f"{label} {step.do!s:<60}  undo: {step.undo}")
        if isinstance(step.do, RewriteFirewall):
            for rewrite in step.do.change.rewrites:
                progress.note(f"        nftables {rewrite}")
        if isinstance(step.do, WriteConfig):
            for change in step.do.files:
                progress.note(f"        {change}")
    progress.note("verify  " + ", ".join(str(p) for p in prepared.probes))
    progress.finish(ExitCode.OK, "plan", "nothing was changed")
    return ExitCode.OK


def _status(store: Store, progress: Progress) -> ExitCode:
    tx = store.load()
    guests = guestbook.load(store)
    progress.attach("guests", guests)
    for guest in guests:
        progress.note(f"attached: {guest}")
    if tx is None:
        progress.finish(ExitCode.OK, "no transaction", f"no record in {store.directory}")
        return ExitCode.OK
    progress.attach("transaction", tx)
    left = tx.deadline - time.time() if tx.phase.pending else None
    progress.attach("seconds_left", left)
    summary = Summary(tx.id, tx.phase, tx.detail, left, tx.pid, tx.boot_id, current_boot_id())
    progress.attach("summary", summary.to_data())
    for line in _describe(tx):
        progress.note(line)
    progress.finish(ExitCode.OK, str(tx.phase), tx.detail)
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
        lines.append(f"deadline {when(tx.deadline)} ({max(0.0, left):.1f} s left)")
    if tx.dead_man:
        lines.append(f"dead man: {tx.dead_man}.timer")
    return lines


def _fail(progress: Progress, code: ExitCode, message: str, hint: str) -> int:
    text = f"{message}. {hint}" if hint else message
    if code in (ExitCode.USAGE, ExitCode.REFUSED):
        text += ". Nothing was changed"
    match progress.output:
        case Output.JSON | Output.EVENTS:
            progress.finish(code, "error", text)
        case Output.TEXT:
            progress.events.result(code, "error", text)
            print(f"bridge-migrate: {printable(text)}", file=sys.stderr)
        case _:
            assert_never(progress.output)
    return int(code)
