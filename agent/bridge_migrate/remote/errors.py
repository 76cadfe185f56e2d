"""The remote driver's failures: an exit code (contract.ExitCode) and what to tell the user."""

from __future__ import annotations

from ..contract import ExitCode


class RemoteError(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
