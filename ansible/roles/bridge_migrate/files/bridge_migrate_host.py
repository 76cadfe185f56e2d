"""bridge-migrate's helper on a host, run there by the host's own Python (standard library only)
for scripts/bridge-migrate-remote and the Ansible role:

    python3 -c "$(cat bridge_migrate_host.py)" probe PREFIX
    python3 -c "$(cat bridge_migrate_host.py)" install PREFIX VERSION REINSTALL(0|1) TAR
                          (TAR "-": a tar on stdin; "-b64": in base64 on stdin; else a file,
                           removed afterwards)

probe: what the host has (Python, systemd as PID 1, tools, root, venv, the systemd bindings, the
agent in PREFIX and whether it imports), and the SSH connection it was reached by.
install: the agent into its own virtual environment PREFIX, from a tar of wheels (the agent's,
its pure-Python dependencies', pip's): no index, no compiler; the system's pip if it has one,
else pip from its wheel. A new
environment is made with --system-site-packages, so that a distribution's python3-systemd
serves. The unpacked wheels are removed afterwards; an environment this run made is removed
again if the install fails.

Either prints one last line: `BRIDGE-MIGRATE-HOST {json}`.
"""

import base64
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

MARK = "BRIDGE-MIGRATE-HOST"
CHECK = "import bridge_migrate.cli, systemd.journal, systemd.daemon"


def probe(prefix):
    r = {
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
        "connection": os.environ.get("SSH_CONNECTION", ""),
        "installed": None,
        "healthy": False,
    }
    agent = os.path.join(prefix, "bin", "bridge-migrate")
    if os.access(agent, os.X_OK):
        try:
            out = subprocess.run([agent, "--version"], capture_output=True, text=True, timeout=60)
            r["installed"] = (out.stdout.split() or ["unknown"])[-1]
            python = os.path.join(prefix, "bin", "python")
            r["healthy"] = (
                subprocess.run([python, "-c", CHECK], capture_output=True).returncode == 0
            )
        except (OSError, subprocess.SubprocessError):
            r["installed"] = "unknown"
    return r


class Failed(Exception):
    pass


def _run(argv, env):
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip()[-3000:]
        raise Failed(f"{' '.join(argv[:4])}...: {out}")


def _unpack(source, into):
    data = None
    if source == "-":
        data = sys.stdin.buffer.read()
    elif source == "-b64":
        data = base64.b64decode(sys.stdin.buffer.read())
    with (
        tarfile.open(fileobj=io.BytesIO(data)) if data is not None else tarfile.open(source) as tar
    ):
        for m in tar.getmembers():
            if (
                not m.isfile()
                or "/" in m.name
                or m.name.startswith(".")
                or not m.name.endswith(".whl")
            ):
                raise Failed(f"unexpected member {m.name!r} in the wheels")
            with open(os.path.join(into, m.name), "wb") as f:
                shutil.copyfileobj(tar.extractfile(m), f)


def install(prefix, version, reinstall, source):
    tmp = tempfile.mkdtemp(prefix="bridge-migrate-wheels-")
    fresh = not os.path.exists(os.path.join(prefix, "bin", "python"))
    env = {
        **os.environ,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONNOUSERSITE": "1",
    }
    try:
        _unpack(source, tmp)
        if fresh:
            _run(
                [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", prefix],
                env,
            )
        python = os.path.join(prefix, "bin", "python")
        if importlib.util.find_spec("pip") is not None:
            pip = [python, "-m", "pip"]  # the system's (seen through the environment): compiled
        else:
            pips = sorted(n for n in os.listdir(tmp) if n.startswith("pip-"))
            if not pips:
                raise Failed("no pip here, and no pip wheel among the wheels")
            pip_dir = os.path.join(tmp, "pip")
            with zipfile.ZipFile(os.path.join(tmp, pips[-1])) as whl:
                whl.extractall(pip_dir)  # faster than running pip from the zip
            pip = [python, os.path.join(pip_dir, "pip")]
        pip += ["install", "-q", "--no-index", "--find-links", tmp, "--no-cache-dir"]
        _run([*pip, "--upgrade", "bridge-migrate==" + version], env)
        if reinstall:
            _run([*pip, "--force-reinstall", "--no-deps", "bridge-migrate==" + version], env)
        done = subprocess.run([python, "-c", CHECK], capture_output=True, text=True)
        if done.returncode != 0:
            raise Failed(
                f"the agent cannot import the systemd bindings (install python3-systemd for "
                f"{sys.executable}): {done.stderr.strip()[-500:]}"
            )
    except BaseException:
        if fresh:
            shutil.rmtree(prefix, ignore_errors=True)
            if os.path.isdir(prefix):  # a mount point, say: leave it empty
                for name in os.listdir(prefix):
                    path = os.path.join(prefix, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not source.startswith("-"):
            os.unlink(source)
    return {"installed": version, "fresh": fresh}


def main(argv):
    try:
        if len(argv) == 2 and argv[0] == "probe":
            result = probe(argv[1])
        elif len(argv) == 5 and argv[0] == "install":
            result = install(argv[1], argv[2], argv[3] == "1", argv[4])
        else:
            result = {"error": "usage: probe PREFIX | install PREFIX VERSION 0|1 TAR"}
    except (Failed, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        result = {"error": str(e)}
    print(MARK + " " + json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
