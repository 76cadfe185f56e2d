"""The bridge_migrate role's one filter: the command line of bridge-migrate-remote for a host,
from its inventory variables (how Ansible would reach it becomes ssh options) and the role's
variables. The driver does everything else; the role only runs it and reads its JSON report."""

from __future__ import annotations

import shlex
from typing import Any


def bm_remote_argv(
    python: str,
    *,
    host: str,
    port: Any = None,
    user: Any = None,
    key: Any = None,
    ssh_args: str = "",
    become: Any = False,
    prefix: str,
    host_python: str,
    wheels: str,
    connect_timeout: Any,
    reconnect_within: Any,
    timeout: Any,
    confirm_within: Any,
    apply_args: list[str],
) -> list[str]:
    argv = [python, "-m", "bridge_migrate.remote", "--json", "--wheels", wheels]
    argv += ["--prefix", prefix, "--python", host_python]
    argv += ["--connect-timeout", str(connect_timeout), "--reconnect-within", str(reconnect_within)]
    if _true(become):
        argv.append("--sudo")
    argv.append(host)
    for flag, value in (("-p", port), ("-l", user), ("-i", key)):
        if value not in (None, ""):
            argv += [flag, str(value)]
    argv += shlex.split(ssh_args)
    argv += ["--", "--timeout", str(timeout), "--confirm-within", str(confirm_within)]
    return [*argv, *map(str, apply_args)]


def _true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "yes", "1")


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"bm_remote_argv": bm_remote_argv}
