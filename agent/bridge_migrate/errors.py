"""The errors that carry exit codes (contract.ExitCode, part of the interface: see the README)."""

from __future__ import annotations

from .contract import ExitCode


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
