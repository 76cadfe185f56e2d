"""Exit codes (part of the interface: see the README) and the errors that carry them."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # migrated and verified, or already migrated; rollback: host restored
    INTERNAL = 1  # unexpected internal error
    USAGE = 2  # invalid usage or input; nothing changed
    REFUSED = 3  # refused by a pre-flight check; nothing changed
    ROLLED_BACK = 4  # not verified or a step failed; the host was restored to its snapshot
    ROLLBACK_INCOMPLETE = 5  # the restore left differences; they are printed


class Failure(Exception):
    """An error the user can act on: what was wrong, what was left unchanged, what to do."""

    code = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(Failure):
    code = ExitCode.USAGE


class Refused(Failure):
    code = ExitCode.REFUSED
