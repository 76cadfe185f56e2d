"""The manual pages, made from the code they describe so they cannot drift: bridge-migrate(8)
from the argparse parser and the exit codes of the contract, bridge-migrate.toml(5) from the
configuration's keys. `python -m bridge_migrate.manpage DIR` writes both; a test compares them
with the copies kept in docs/man."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import build_parser
from .config import DEFAULT_PATH, KEYS
from .contract import DEFAULT_STATE_DIR, STATE_DIR_ENV, ExitCode

EXIT_MEANINGS = {
    ExitCode.OK: "migrated and verified (with --confirm-within: verified, waiting for confirm), "
    "or nothing to do; confirm: committed; rollback: host restored",
    ExitCode.INTERNAL: "unexpected internal error (mid-transaction, the host was rolled back)",
    ExitCode.USAGE: "invalid usage or input; nothing changed",
    ExitCode.REFUSED: "refused by a pre-flight check, or the state directory or record cannot be "
    "trusted; nothing changed",
    ExitCode.ROLLED_BACK: "not verified in time, a step failed, or not confirmed in time; "
    "the host was restored to its snapshot",
    ExitCode.ROLLBACK_INCOMPLETE: "the rollback left differences; they are printed and recorded",
}
PAGES = ("bridge-migrate.8", "bridge-migrate.toml.5")


def pages() -> dict[str, str]:
    return {PAGES[0]: section_8(build_parser()), PAGES[1]: section_5()}


def section_8(parser: argparse.ArgumentParser) -> str:
    lines = [
        '.TH BRIDGE-MIGRATE 8 "" "bridge-migrate" "System Administration"',
        ".SH NAME",
        r"bridge-migrate \- move a single-NIC host onto a bridge, verified, with exact rollback",
        ".SH SYNOPSIS",
        r".B bridge-migrate",
        r"[\fIGLOBAL OPTIONS\fR] \fICOMMAND\fR [\fIOPTIONS\fR]",
        ".SH DESCRIPTION",
        _escape(parser.description or ""),
        ".SH GLOBAL OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, sub in _commands(parser):
        lines += [f".SS {name}", _escape(sub.description or ""), *_options(sub)]
    lines += [".SH EXIT STATUS"]
    for code in ExitCode:
        lines += [".TP", f".B {int(code)}", _escape(EXIT_MEANINGS[code])]
    lines += [
        ".SH FILES",
        ".TP",
        f".I {DEFAULT_STATE_DIR}",
        f"the transaction record (or ${STATE_DIR_ENV}, or --state-dir)",
        ".TP",
        f".I {DEFAULT_PATH}",
        "the configuration, see",
        ".BR bridge-migrate.toml (5)",
        ".SH SEE ALSO",
        ".BR bridge-migrate.toml (5),",
        ".BR systemd.service (5),",
        ".BR ip (8)",
    ]
    return "\n".join(lines) + "\n"


def section_5() -> str:
    lines = [
        '.TH BRIDGE-MIGRATE.TOML 5 "" "bridge-migrate" "File Formats"',
        ".SH NAME",
        r"bridge-migrate.toml \- configuration of bridge-migrate",
        ".SH DESCRIPTION",
        f"bridge-migrate reads {_escape(str(DEFAULT_PATH))} if it exists (or the file that "
        "\\-\\-config or $BRIDGE_MIGRATE_CONFIG names). Flags override it. A bad file is "
        "exit status 2, naming the file, the line and the key.",
        ".SH KEYS",
    ]
    for key, (kind, text) in KEYS.items():
        lines += [".TP", rf".B {key} \fR({kind})", _escape(text)]
    lines += [".SH SEE ALSO", ".BR bridge-migrate (8)"]
    return "\n".join(lines) + "\n"


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        flags = ", ".join(action.option_strings) or name
        value = f" {name}" if action.option_strings and action.nargs != 0 else ""
        lines += [".TP", rf"\fB{_escape(flags)}\fR{_escape(value)}", _escape(action.help or "")]
    return lines


def _escape(text: str) -> str:
    """roff: a backslash doubled; a line starting with '.' or "'" guarded."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("docs/man")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
