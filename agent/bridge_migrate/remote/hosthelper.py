"""The remote driver's helper on a host. Its source is sent over SSH and run there by the host's
own Python as `cd / && [sudo -n --] python3 -I -c SOURCE "$SSH_CONNECTION" COMMAND ARGS...`
(isolated: nothing from the login directory, the environment or the user's site is imported as
root; the connection is an argument because sudo resets the environment). Standard library only;
it does not import the agent (the host may not have one yet).

    probe PREFIX                      what the host has, and its agent's build identity
    install PREFIX BUILD              the agent from a tar of wheels on stdin
    start PREFIX STATE UNIT ARGS...   `apply ARGS` as a transient unit of the host's systemd;
                                      its agent's pid and the boot id (which record is its)
    outcome PREFIX STATE UNIT         the unit's events (journal fields), its state, the record
    confirm PREFIX STATE TRANSACTION  `confirm`, if that transaction waits for confirmation

Each prints one JSON document as its last line: {"ok": true, ...} or {"ok": false, "error": ...},
always with "connection" (the SSH_CONNECTION it came over: which TCP connection).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Any

FIELD_PREFIX = "BRIDGE_MIGRATE_"
# A prefix must be a directory of its own, never one the system or other software shares.
SYSTEM_DIRS = {
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/lib",
    "/usr/sbin",
    "/usr/share",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/opt",
}
_COMMAND_TIMEOUT = 120


class Failed(Exception):
    pass


def _agent_check(prefix: str) -> list[str]:
    """The agent's Python, printing its build identity once everything it needs imports."""
    code = (
        "import json, bridge_migrate.build as b, bridge_migrate.cli, systemd.journal, "
        "systemd.daemon; print(json.dumps({'build': b.identity(), 'version': b.version()}))"
    )
    return [os.path.join(prefix, "bin", "python"), "-I", "-c", code]


def _installed(prefix: str) -> dict[str, Any] | None:
    if not os.path.exists(os.path.join(prefix, "bin", "python")):
        return None
    try:
        done = subprocess.run(
            _agent_check(prefix), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"healthy": False, "error": str(e)}
    if done.returncode != 0:
        return {"healthy": False, "error": done.stderr.strip()[-500:]}
    return {"healthy": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def probe(prefix: str) -> dict[str, Any]:
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "python_ok": sys.version_info >= (3, 11),
        "uid": os.geteuid(),
        "systemd": os.path.isdir("/run/systemd/system"),
        "missing_tools": [
            t for t in ("systemd-run", "journalctl", "systemctl") if not shutil.which(t)
        ],
        "venv": importlib.util.find_spec("venv") is not None,
        "systemd_module": importlib.util.find_spec("systemd") is not None,
        "pip": importlib.util.find_spec("pip") is not None,
        "agent": _installed(prefix),
    }


def _check_prefix(prefix: str) -> None:
    """Refuse a prefix the install could damage: a system directory, or a directory that
    exists and is not an agent environment (it would be replaced)."""
    if not os.path.isabs(prefix) or os.path.normpath(prefix) != prefix:
        raise Failed(f"prefix {prefix!r}: give a normalised absolute path")
    if prefix in SYSTEM_DIRS or os.path.dirname(prefix) == "/":
        raise Failed(f"prefix {prefix}: a system directory; give one of its own")
    if os.path.lexists(prefix) and not (
        os.path.isfile(os.path.join(prefix, "pyvenv.cfg"))
        and os.path.exists(os.path.join(prefix, "bin", "bridge-migrate"))
    ):
        raise Failed(f"prefix {prefix} exists and is not bridge-migrate's environment")


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip()[-3000:]
        raise Failed(f"{' '.join(argv[:4])}...: {out}")


def _unpack(into: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read())) as tar:
        for m in tar.getmembers():
            name_ok = "/" not in m.name and not m.name.startswith(".")
            if not (m.isfile() and name_ok and m.name.endswith(".whl")):
                raise Failed(f"unexpected member {m.name!r} among the wheels")
            source = tar.extractfile(m)
            if source is None:
                raise Failed(f"cannot read {m.name!r}")
            with open(os.path.join(into, m.name), "wb") as f:
                shutil.copyfileobj(source, f)


def _pip(python: str, wheels: str, work: str) -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [python, "-m", "pip"]  # the system's, seen through --system-site-packages
    pips = sorted(n for n in os.listdir(wheels) if n.startswith("pip-"))
    if not pips:
        raise Failed("no pip here, and no pip wheel among the wheels")
    pip_dir = os.path.join(work, "pip")
    with zipfile.ZipFile(os.path.join(wheels, pips[-1])) as whl:
        whl.extractall(pip_dir)  # faster than running pip from the zip
    return [python, os.path.join(pip_dir, "pip")]


def _relocate(built: str, prefix: str) -> None:
    """Scripts in bin/ name the directory they were installed in: name the final one."""
    bin_dir = os.path.join(built, "bin")
    for name in os.listdir(bin_dir):
        path = os.path.join(bin_dir, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if built.encode() in data:
            with open(path, "wb") as f:
                f.write(data.replace(built.encode(), prefix.encode()))


def install(prefix: str, build: str) -> dict[str, Any]:
    """A new environment built beside PREFIX, checked, then renamed into place; the old one
    (an agent environment: checked first) is removed only once the new one is there."""
    _check_prefix(prefix)
    parent = os.path.dirname(prefix)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    base = os.path.basename(prefix)
    work = tempfile.mkdtemp(prefix=f".{base}.install-", dir=parent)  # only this run's
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONNOUSERSITE": "1",
    }
    try:
        wheels, built = os.path.join(work, "wheels"), os.path.join(work, "venv")
        os.mkdir(wheels)
        _unpack(wheels)
        venv = [sys.executable, "-I", "-m", "venv", "--system-site-packages", "--without-pip"]
        _run([*venv, built], env)
        python = os.path.join(built, "bin", "python")
        pip = _pip(python, wheels, work)
        pip += ["install", "-q", "--no-index", "--find-links", wheels, "--no-cache-dir"]
        _run([*pip, "bridge-migrate"], env)
        _relocate(built, prefix)
        old = os.path.join(work, "old")
        if os.path.lexists(prefix):
            os.rename(prefix, old)
        os.rename(built, prefix)
        agent = _installed(prefix)
        if agent is None or not agent["healthy"] or agent["build"] != build:
            os.rename(prefix, built)  # back out: the old agent, if any, returns
            if os.path.lexists(old):
                os.rename(old, prefix)
            why = (agent or {}).get("error") or f"found build {(agent or {}).get('build')}"
            raise Failed(f"the new agent does not work (python3-systemd missing?): {why}")
        return {"ok": True, "agent": agent}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_argv(prefix: str, state: str, unit: str, args: list[str]) -> list[str]:
    if "--" not in args:
        raise Failed("usage: start PREFIX STATE UNIT --property=... -- APPLY-OPTIONS")
    cut = args.index("--")
    properties, apply = args[:cut], args[cut + 1 :]
    if not all(p.startswith("--property=") for p in properties):
        raise Failed(f"usage: not a unit property: {properties!r}")
    return [
        "systemd-run",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        "--description=bridge-migrate apply (bridge-migrate-remote)",
        "--property=Type=exec",
        *properties,
        "--",
        *_agent(prefix, state, "apply", *apply),
    ]


def _agent(prefix: str, state: str, *args: str) -> list[str]:
    return [os.path.join(prefix, "bin", "bridge-migrate"), "--state-dir", state, *args]


def start(prefix: str, state: str, unit: str, args: list[str]) -> dict[str, Any]:
    """Not tied to this SSH session: a hang-up does not stop it. `args`: the unit's sandbox
    (--property=..., from bridge_migrate.sandbox on the controller), `--`, apply's options."""
    argv = start_argv(prefix, state, unit, args)
    # The sandbox binds the state directory in: it must exist (the agent's own mode).
    os.makedirs(state, mode=0o700, exist_ok=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    if done.returncode != 0:
        raise Failed(f"systemd-run: {done.stderr.strip()}")
    # Type=exec: systemd-run returned once the agent was executed, so its pid is known (0 if
    # it has ended already: then its events say what happened).
    show = subprocess.run(
        ["systemctl", "show", "--property=MainPID", "--value", f"{unit}.service"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
    )
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    return {"ok": True, "pid": int(show.stdout.strip() or 0), "boot_id": boot_id}


def _status(prefix: str, state: str) -> dict[str, Any] | None:
    """The summary of `status --json` (contract.Summary's data); None: no record."""
    done = subprocess.run(
        _agent(prefix, state, "status", "--json"),
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
    )
    if done.returncode != 0:
        raise Failed(f"status: {done.stderr.strip()[-500:]}")
    summary: dict[str, Any] | None = json.loads(done.stdout).get("summary")
    return summary


def outcome(prefix: str, state: str, unit: str) -> dict[str, Any]:
    journal = subprocess.run(
        ["journalctl", "-b", "-u", f"{unit}.service", "-o", "json", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
    )
    events = []
    for line in journal.stdout.splitlines():
        entry = json.loads(line)
        fields = {k: v for k, v in entry.items() if k.startswith(FIELD_PREFIX)}
        if fields:
            events.append(fields)
    show = subprocess.run(
        ["systemctl", "show", "--property=ActiveState", "--value", f"{unit}.service"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
    )
    return {
        "ok": True,
        "events": events,
        "unit_active": show.stdout.strip() in ("active", "activating", "deactivating"),
        "summary": _status(prefix, state),
    }


def confirm(prefix: str, state: str, transaction: str) -> dict[str, Any]:
    summary = _status(prefix, state)
    if summary is None or summary["transaction"] != transaction:
        raise Failed(f"transaction {transaction} is not the recorded one")
    if summary["phase"] != "confirming" or summary["boot_id"] != summary["current_boot_id"]:
        raise Failed(f"transaction {transaction} does not wait for confirmation")
    done = subprocess.run(
        _agent(prefix, state, "confirm", "--json"),
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
    )
    doc = json.loads(done.stdout) if done.stdout.strip() else {}
    return {
        "ok": done.returncode == 0,
        "exit_code": done.returncode,
        "error": doc.get("message", done.stderr.strip()[-500:]),
    }


def dispatch(argv: list[str]) -> dict[str, Any]:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "probe" and len(args) == 1:
        return {"ok": True, **probe(args[0])}
    if command == "install" and len(args) == 2:
        return install(args[0], args[1])
    if command == "start" and len(args) >= 3:
        return start(args[0], args[1], args[2], args[3:])
    if command == "outcome" and len(args) == 3:
        return outcome(args[0], args[1], args[2])
    if command == "confirm" and len(args) == 3:
        return confirm(args[0], args[1], args[2])
    raise Failed(f"usage: unknown command {argv!r}")


def main(argv: list[str]) -> int:
    connection, argv = (argv[0], argv[1:]) if argv else ("", [])
    try:
        result = dispatch(argv)
    except (Failed, OSError, ValueError, subprocess.SubprocessError, tarfile.TarError) as e:
        result = {"ok": False, "error": str(e)}
    except zipfile.BadZipFile as e:
        result = {"ok": False, "error": f"bad wheel: {e}"}
    result["connection"] = connection
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
