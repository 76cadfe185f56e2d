"""A real systemd as PID 1 of its own namespaces: a disposable host for testing units, timers,
sd_notify, journald and reboots (docs/lab.md), hardened so that the boot cannot touch the machine.

    unshare --pid --mount --net --uts --ipc --cgroup      (own cgroup2 subtree, made by us)
      sh BOOT_SCRIPT -> overlay root -> pivot_root -> exec /lib/systemd/systemd --unit=lab.target

Isolation, and why:
- The root is an overlay: the machine's / below, a tmpfs above. Everything the boot writes
  (/etc/passwd by sysusers, /var/log/journal by journald, timer stamps in /var/lib/systemd/timers,
  __pycache__) lands in that tmpfs and vanishes with the boot. Only caller-given binds persist.
- /sys and /proc/sys are read-only (except /proc/sys/net, which is per network namespace), /dev is
  a tmpfs with a few harmless nodes: a unit that writes kernel-wide knobs or real devices fails
  instead. (Everything inside is still root with every capability: this stops accidents of
  ordinary units, not hostile code.)
- The boot gets its own cgroup namespace rooted at a fresh cgroup2 directory, so its systemd
  manages only that subtree (two boots in parallel would otherwise share /system.slice and kill
  each other's services) and never sees the machine's v1 controllers.
- Units that act on the machine (udev, network managers, module loading, sysctl, pstore, fsck,
  remount, time) are masked; so are the units the machine's administrator enabled in /etc.

Commands run inside with `nsenter -t PID -a` (all namespaces, so systemctl finds /run/systemd).
A "reboot" is poweroff and a new BootedHost from the same BootSpec: caller-owned bind mounts
carry state across; BootedLab does that and re-plugs the lab's host NIC into the new boot.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bridge_migrate_testlab.lab import Lab

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SYSTEMD = "/lib/systemd/systemd"
TARGET = "lab.target"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BOOT_TIMEOUT = 20.0
# This checkout (the agent's sources and its virtual environment), shown inside at the same path
# even where the boot mounts its own file system over it (a CI clone under /tmp, say).
CHECKOUT = Path(__file__).resolve().parents[2]
_CMD_TIMEOUT = 30.0
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.@\\-]+(\.d/[A-Za-z0-9:_.@\\-]+\.conf)?")
_BOOT_ID = "run/netlab-boot-id"  # under the boot's root
_EXPOSURE_RE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d)")

# Masked in every boot: each one acts on the machine rather than on the boot's namespaces.
MASKED: tuple[str, ...] = (
    # udev: coldplug rewrote owners and modes of the machine's /dev (docs/lab.md)
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    # network managers: the lab owns the host's network (networking.service ran `ifup -a`)
    "networking.service",
    "ifupdown-pre.service",
    "ifupdown-wait-online.service",
    "NetworkManager.service",
    "NetworkManager-wait-online.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    # kernel-wide state: modules, sysctls (net.* would also override the lab's pinned host
    # settings: pass Lab(host_sysctls=...) instead), binfmt, the entropy pool, the clock
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "modprobe@.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-random-seed.service",
    "systemd-timesyncd.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    # the machine's disks and firmware: remount of /, fsck, pstore (it deletes what it archives)
    "systemd-remount-fs.service",
    "systemd-fsck-root.service",
    "systemd-fsck@.service",
    "systemd-pstore.service",
    "e2scrub_reap.service",
)
# Units the machine's administrator enabled (apt-daily.timer, postgresql.service, ...) are the
# machine's, not the lab host's: mask those wanted by the targets that lab.target pulls in.
_MACHINE_WANTS = Path("/etc/systemd/system")
_PULLED_TARGETS = ("sysinit", "basic", "sockets", "timers", "paths", "local-fs", "slices")

# Runs as PID 1 of the new namespaces until it execs systemd. Arguments: stage dir, seed dir,
# hostname, then (source, target, ro|rw) per bind. `set -e`: any failure ends the boot.
_BOOT_SCRIPT = r"""
set -eu
stage=$1 seed=$2 name=$3
shift 3
mount --make-rprivate /
mount -t tmpfs -o mode=755,size=2g netlab-stage "$stage"
mkdir "$stage/upper" "$stage/work" "$stage/root"
r=$stage/root
mount -t overlay -o "lowerdir=/,upperdir=$stage/upper,workdir=$stage/work" netlab-root "$r"
mount -t proc proc "$r/proc"
mount --bind "$r/proc/sys" "$r/proc/sys"
mount -o remount,bind,ro "$r/proc/sys"
mount --bind "$r/proc/sys/net" "$r/proc/sys/net"
mount -o remount,bind,rw "$r/proc/sys/net"
mount --bind "$seed/boot_id" "$r/proc/sys/kernel/random/boot_id"
mount -t sysfs -o ro sysfs "$r/sys"
mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
mount -t tmpfs -o mode=755,size=64m,nosuid dev "$r/dev"
mknod -m 666 "$r/dev/null" c 1 3
mknod -m 666 "$r/dev/zero" c 1 5
mknod -m 666 "$r/dev/full" c 1 7
mknod -m 666 "$r/dev/random" c 1 8
mknod -m 666 "$r/dev/urandom" c 1 9
mknod -m 666 "$r/dev/tty" c 5 0
mkdir "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m shm "$r/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev,size=256m run "$r/run"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=1g tmp "$r/tmp"
cp -a "$seed/root/." "$r/"
while [ $# -ge 3 ]; do
  if [ -d "$1" ]; then mkdir -p "$r$2"; else mkdir -p "$(dirname "$r$2")"; touch "$r$2"; fi
  mount --bind "$1" "$r$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$r$2"; fi
  shift 3
done
hostname "$name"
cd "$r"
mkdir .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec /lib/systemd/systemd --system --unit=lab.target
"""


@dataclass(frozen=True)
class Bind:
    """A caller-owned file or directory of the machine, bind-mounted at `target` inside."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class BootSpec:
    """What to boot. The same spec booted again is a reboot of the same host."""

    hostname: str = "labhost"
    units: Mapping[str, str] = field(default_factory=dict)  # name -> text, in /run/systemd/system
    requires: tuple[str, ...] = ()  # pulled in (Requires= + After=) by lab.target; unmasked
    binds: tuple[Bind, ...] = ()
    mask: tuple[str, ...] = ()  # masked in addition to MASKED
    machine_id: str | None = None  # default: derived from the hostname, so stable across boots
    # path inside -> (text, mode), root's, written over the boot's root before systemd starts:
    # a network manager's files, say
    files: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def masked(self) -> list[str]:
        mask = {*MASKED, *_machine_enabled(), *self.mask}
        return sorted(mask - set(self.requires) - set(self.units))

    def effective_machine_id(self) -> str:
        return self.machine_id or hashlib.sha256(self.hostname.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class UnitFailure:
    """A failed unit of a degraded boot, with its Result= (e.g. "exit-code", "timeout")."""

    unit: str
    result: str


def _machine_enabled() -> list[str]:
    wants = (_MACHINE_WANTS / f"{target}.target.wants" for target in _PULLED_TARGETS)
    return [p.name for d in wants if d.is_dir() for p in d.iterdir()]


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([INSIDE_PATH, os.environ.get("PATH", "")]))
    if path is None:
        raise FileNotFoundError(f"{name} not found (needed by bridge_migrate_testlab.systemd)")
    return path


def cgroup_base() -> Path:
    """Our own cgroup in the cgroup2 hierarchy: boots get their subtrees below it."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [m.split()[4] for m in mounts if m.split(" - ")[1].split()[0] == "cgroup2"]
    cgroups = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:] for line in cgroups if line.startswith("0::")), None)
    if not points or own is None:
        raise RuntimeError("no cgroup2 hierarchy mounted: systemd cannot track a boot")
    return Path(points[0] + own.rstrip("/"))


def _check_spec(spec: BootSpec) -> None:
    if not _HOSTNAME_RE.fullmatch(spec.hostname):
        raise ValueError(f"bad hostname {spec.hostname!r}")
    for name in [*spec.units, *spec.requires, *spec.mask]:
        if not _UNIT_RE.fullmatch(name):
            raise ValueError(f"bad unit name {name!r}")
    for b in spec.binds:
        # The script mounts before pivot_root, where an absolute symlink (/var/run -> /run)
        # would resolve on the machine's own tree: demand a path without symlinks.
        if not os.path.isabs(b.target) or os.path.realpath(b.target) != b.target or b.target == "/":
            raise ValueError(f"bind target {b.target!r}: use an absolute path without symlinks")
        if not b.source.exists():
            raise FileNotFoundError(f"bind source {b.source} does not exist")
    for path in spec.files:
        if not os.path.isabs(path) or os.path.normpath(path) != path or path == "/":
            raise ValueError(f"file {path!r}: use a normalised absolute path")


def _lab_target(requires: Sequence[str]) -> str:
    deps = " ".join(["basic.target", *requires])
    return f"[Unit]\nDescription=netlab host\nRequires={deps}\nAfter={deps}\nAllowIsolate=yes\n"


def _write_seed(seed: Path, spec: BootSpec) -> None:
    """The tree copied over the boot's root before systemd starts, plus files to bind."""
    units = seed / "root/run/systemd/system"
    units.mkdir(parents=True)
    (units / TARGET).write_text(_lab_target(spec.requires))
    for name in spec.masked():
        (units / name).symlink_to("/dev/null")
    for name, text in spec.units.items():
        (units / name).parent.mkdir(parents=True, exist_ok=True)
        (units / name).write_text(text)
    (seed / "root/run/lock").mkdir()
    etc = seed / "root/etc"
    etc.mkdir()
    (etc / "hostname").write_text(spec.hostname + "\n")
    (etc / "machine-id").write_text(spec.effective_machine_id() + "\n")
    for path, (text, mode) in spec.files.items():
        target = seed / "root" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    # Every boot of a kernel shares its boot ID: give each lab boot its own, as nspawn does,
    # so that a persistent journal tells the boots apart (journalctl --list-boots).
    boot_id = str(uuid.uuid4()) + "\n"
    (seed / "boot_id").write_text(boot_id)
    # A service with ProtectKernelTunables=, ProtectControlGroups= or ProtectProc= gets a /proc
    # of its own, without the bind mount above: bind the boot's ID into every service too.
    (seed / "root" / _BOOT_ID).write_text(boot_id)
    (units / "service.d").mkdir(exist_ok=True)
    (units / "service.d/netlab-boot-id.conf").write_text(
        f"[Service]\nBindReadOnlyPaths=/{_BOOT_ID}:/proc/sys/kernel/random/boot_id\n"
    )


class BootedHost:
    """Context manager: a systemd booted to lab.target in new namespaces; removed on exit."""

    def __init__(
        self,
        spec: BootSpec | None = None,
        *,
        boot_timeout: float = _BOOT_TIMEOUT,
        before_wait: Callable[[int], None] | None = None,
    ) -> None:
        """before_wait(pid): called once PID 1 runs, before waiting for the boot to finish
        (e.g. to plug in the NIC that units ordered before network.target wait for)."""
        self.spec = spec if spec is not None else BootSpec()
        self.before_wait = before_wait
        _check_spec(self.spec)
        self.name = "nl" + secrets.token_hex(4)
        self.boot_timeout = boot_timeout
        self.state = ""  # is-system-running once booted: "running" or "degraded"
        self.failed: tuple[UnitFailure, ...] = ()
        self.boot_seconds = 0.0
        self._nsenter, self._unshare = _tool("nsenter"), _tool("unshare")
        self._cgroup: Path | None = None
        self._work: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1 = 0
        self._procs: list[subprocess.Popen[str]] = []

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> BootedHost:
        if self._proc is not None:
            raise RuntimeError("already booted")
        atexit.register(self.close)
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """PID 1 of the boot, as seen from the machine."""
        if not self._pid1 or not self.alive:  # a stale PID may be any process of the machine
            raise RuntimeError(f"boot {self.name} is not running")
        return self._pid1

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def console(self) -> str:
        """The boot's stdout and stderr: errors of the boot script, or of systemd before its
        journal runs. (No /dev/console inside: systemd writes status only to a terminal.)"""
        out = self._work / "console" if self._work is not None else None
        return out.read_text(errors="replace") if out is not None and out.exists() else ""

    def _boot(self) -> None:
        started = time.monotonic()
        self._work = Path(tempfile.mkdtemp(prefix=f"netlab-{self.name}-"))
        (self._work / "stage").mkdir()
        _write_seed(self._work / "seed", self.spec)
        self._cgroup = cgroup_base() / f"netlab-{self.name}"
        self._cgroup.mkdir()
        self._proc = self._spawn()
        self._pid1 = self._wait_pid1(started + self.boot_timeout)
        if self.before_wait is not None:
            self.before_wait(self._pid1)
        self.state = self._wait_booted(started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started
        if self.state == "degraded":
            self.failed = self.failed_units()
            log.warning("boot %s degraded: %s", self.name, self.failed)

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._work is not None and self._cgroup is not None
        checkout = Bind(CHECKOUT, str(CHECKOUT), read_only=True)
        binds = [x for b in (checkout, *self.spec.binds) for x in _bind_args(b)]
        unshare = [self._unshare, "--fork", "--pid", "--mount", "--net", "--uts", "--ipc"]
        unshare += ["--cgroup", "--mount-proc", "--", "sh", "-c", _BOOT_SCRIPT, "netlab-boot"]
        unshare += [str(self._work / "stage"), str(self._work / "seed"), self.spec.hostname]
        # Join the boot's cgroup before unshare: the new cgroup namespace is rooted there.
        join = 'echo $$ > "$1" && shift && exec "$@"'
        argv = ["sh", "-c", join, "netlab-join", str(self._cgroup / "cgroup.procs")]
        with open(self._work / "console", "wb") as err:
            return subprocess.Popen(
                [*argv, *unshare, *binds],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env={"PATH": INSIDE_PATH, "container": "other", "LANG": "C.UTF-8"},
                start_new_session=True,  # our terminal's signals must not reach the boot
            )

    def _wait_pid1(self, deadline: float) -> int:
        assert self._proc is not None
        unshare = self._proc.pid
        children = Path(f"/proc/{unshare}/task/{unshare}/children")
        first = _until(lambda: children.read_text().split()[:1], deadline, self._check_alive)
        if not first:
            raise TimeoutError(f"unshare did not fork: {self.console()}")
        self._leave_cgroup(unshare)  # the child's cgroup namespace is fixed by now
        comm = Path(f"/proc/{first[0]}/comm")
        if not _until(lambda: comm.read_text() == "systemd\n", deadline, self._check_alive):
            raise TimeoutError(f"systemd did not start: {self.console()}")
        return int(first[0])

    def _wait_booted(self, deadline: float) -> str:
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            left = max(deadline - time.monotonic(), 0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self.systemctl("is-system-running", "--wait", timeout=left)
                state = done.stdout.strip()
                if state in ("running", "degraded"):
                    return state
            time.sleep(0.01)  # not listening yet, or still "initializing"
        jobs = self.systemctl("list-jobs", timeout=5).stdout
        raise TimeoutError(f"boot not finished in {self.boot_timeout} s ({state!r}): {jobs}")

    def _leave_cgroup(self, pid: int) -> None:
        """Move unshare out of the boot's cgroup (its cgroup namespace keeps that root), so
        that cgroup.kill spares it: it must outlive and reap PID 1, or the machine's init
        inherits PID 1 as a zombie."""
        assert self._cgroup is not None
        (self._cgroup.parent / "cgroup.procs").write_text(str(pid))

    def _check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(f"boot {self.name} ended: {self.console()}")

    def poweroff(self, timeout: float = 10.0) -> float:
        """Shut down cleanly (`systemctl poweroff`); kill if it takes longer than timeout.
        Returns the seconds until the boot's last process was gone; then removes everything."""
        assert self._proc is not None
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.systemctl("poweroff", timeout=timeout)
        try:
            self._proc.wait(timeout=max(timeout - (time.monotonic() - started), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("boot %s did not power off in %s s: killed", self.name, timeout)
            self.close()
            raise TimeoutError(f"boot {self.name} did not power off in {timeout} s") from None
        seconds = time.monotonic() - started
        self.close()
        return seconds

    def close(self) -> None:
        """Kill whatever is left of the boot and remove what we made. Idempotent."""
        atexit.unregister(self.close)
        self._pid1 = 0
        if self._cgroup is not None:
            _kill_cgroup(self._cgroup)  # PID 1 and the rest; unshare is outside, to reap it
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)  # unshare exits once PID 1 is gone
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                _reap(self._proc)
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _reap(proc)
        self._procs.clear()
        if self._cgroup is not None:
            _remove_cgroup(self._cgroup)
            self._cgroup = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)  # its mounts died with the boot
            self._work = None

    # -- running things inside --------------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside the boot: all its namespaces, its root and cwd."""
        return [self._nsenter, "-t", str(self.pid), "-a", "-r", "-w", "--", *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A host's environment, not ours (no VIRTUAL_ENV, NOTIFY_SOCKET, ... from outside)."""
        return {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "HOME": "/root", **(extra or {})}

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = _CMD_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self.env(env),
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            )
        return done

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start argv inside (text mode); killed and reaped when the boot ends at the latest."""
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv(argv), text=True, env=self.env(env), **kwargs
        )
        self._procs.append(proc)
        return proc

    def systemctl(
        self, *args: str, timeout: float = _CMD_TIMEOUT, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], timeout=timeout, check=check)

    def path(self, inside: str) -> Path:
        """An absolute path inside the boot, reachable from the machine (via /proc/PID/root).
        Careful: absolute symlinks found on the way resolve on the machine, not inside."""
        if not os.path.isabs(inside):
            raise ValueError(f"{inside!r} is not absolute")
        return Path(f"/proc/{self.pid}/root{inside}")

    def install_unit(self, name: str, text: str, *, reload: bool = True) -> None:
        """Put a unit (or "NAME.d/x.conf" drop-in) into /run/systemd/system for this boot."""
        if not _UNIT_RE.fullmatch(name):
            raise ValueError(f"bad unit name {name!r}")
        target = self.path(f"/run/systemd/system/{name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a mask is a symlink to /dev/null: never write through it
        target.write_text(text)
        if reload:
            self.systemctl("daemon-reload", check=True)

    def failed_units(self) -> tuple[UnitFailure, ...]:
        done = self.systemctl("list-units", "--failed", "--plain", "--no-legend", "--all")
        units = [line.split()[0] for line in _lines(done)]
        return tuple(UnitFailure(u, self.show(u, "Result")) for u in units)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (`systemctl show -P`), e.g. show("x.service", "StatusText")."""
        return self.systemctl("show", "-P", prop, unit, check=True).stdout.rstrip("\n")

    def exposure(self, unit: str) -> float:
        """`systemd-analyze security` of a loaded unit (transient ones too), 0.0 to 10.0."""
        done = self.run(["systemd-analyze", "security", "--no-pager", unit], check=True)
        return exposure(done.stdout, unit)

    def journal(self, unit: str | None = None, *, args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """This boot's journal entries (journalctl -o json), after journald wrote what it got."""
        self.run(["journalctl", "--sync"], check=True)
        argv = ["journalctl", "-o", "json", "--no-pager", "-b", *args]
        done = self.run([*argv, *(["-u", unit] if unit else [])], check=True)
        return [json.loads(line) for line in _lines(done)]

    def wait_journal(
        self, match: Mapping[str, str], *, unit: str | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first entry whose fields include `match`; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.journal(unit):
                if all(entry.get(k) == v for k, v in match.items()):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"no journal entry with {dict(match)} in {timeout} s")
            time.sleep(0.05)


def exposure(analysis: str, unit: str) -> float:
    """The overall exposure level that `systemd-analyze security` printed for `unit` (its
    --json output leaves the overall figure out)."""
    found = {m[1]: float(m[2]) for m in _EXPOSURE_RE.finditer(analysis)}
    if unit not in found:
        raise ValueError(f"no overall exposure level for {unit} in: {analysis[-500:]}")
    return found[unit]


def _until(probe: Callable[[], _T], deadline: float, check: Callable[[], None]) -> _T | None:
    """probe() until it returns something true (check() first each time) or the deadline."""
    while time.monotonic() < deadline:
        check()
        with contextlib.suppress(OSError):  # /proc entries come and go
            if result := probe():
                return result
        time.sleep(0.005)
    return None


def _bind_args(b: Bind) -> list[str]:
    return [str(b.source), b.target, "ro" if b.read_only else "rw"]


def _lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.strip()]


def _reap(proc: subprocess.Popen[Any]) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("pid %d did not exit after SIGKILL", proc.pid)


def _kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every process of the boot's cgroup subtree (cgroup.kill, Linux 5.14+)."""
    with contextlib.suppress(FileNotFoundError):
        (cgroup / "cgroup.kill").write_text("1")


def _remove_cgroup(cgroup: Path, timeout: float = 5.0) -> None:
    """rmdir the subtree bottom-up; a cgroup is busy until its killed processes are gone."""
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        dirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, cgroup]:
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()
        if cgroup.exists() and time.monotonic() > deadline:
            log.error("cgroup %s still busy after %s s", cgroup, timeout)
            return
        if cgroup.exists():
            time.sleep(0.02)


class BootedLab:
    """A netlab Lab whose host namespace is a booted systemd (the lab is built around it).

    poweroff() also unplugs the host from the LAN (its network namespace and NIC vanish, as
    with a real machine); boot() starts the same spec again and plugs a fresh NIC into it;
    reboot() is both. The LAN, gateway, peer and far namespaces stay across reboots.
    lab.run(lab.host_ns, ...) enters the host's network namespace only (the machine's /run: no
    systemd there); host.run(...) enters all of the boot's namespaces.
    """

    def __init__(
        self,
        spec: BootSpec | None = None,
        prefix: str | None = None,
        *,
        plug_first: bool = False,
        **lab_kwargs: Any,
    ) -> None:
        """plug_first: the lab (and the host's NIC) is built while the first boot runs, as
        on a real machine, so that a network manager configures the NIC at boot."""
        self.spec = spec if spec is not None else BootSpec()
        self._plug_first = plug_first
        self._prefix = prefix
        self._lab_kwargs = lab_kwargs
        self._lab: Lab | None = None
        self._host: BootedHost | None = None

    @property
    def lab(self) -> Lab:
        if self._lab is None:
            raise RuntimeError("not entered")
        return self._lab

    @property
    def host(self) -> BootedHost:
        if self._host is None:
            raise RuntimeError("the host is powered off")
        return self._host

    def __enter__(self) -> BootedLab:
        try:
            first = self._build_lab if self._plug_first else None
            self._host = BootedHost(self.spec, before_wait=first).__enter__()
            if self._lab is None:
                self._build_lab(self._host.pid)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc_type is None)

    def _build_lab(self, pid: int) -> None:
        self._lab = Lab(self._prefix, host_pid=pid, **self._lab_kwargs).__enter__()

    def close(self, raise_errors: bool = False) -> None:
        try:
            if self._lab is not None:
                self._lab.close(raise_errors=raise_errors)
        finally:
            self._lab = None
            if self._host is not None:
                self._host.close()
                self._host = None

    def poweroff(self, timeout: float = 10.0) -> float:
        host, self._host = self.host, None
        try:
            return host.poweroff(timeout)
        finally:  # also after a kill: the attach alone would keep the namespace alive
            self.lab.unplug_host()

    def boot(self, *, plug_first: bool = False) -> BootedHost:
        """Boot again. plug_first: the NIC is there while the boot runs (as on a real machine),
        so that units ordered after it can use it; the boot then does not wait for the host to
        reach the LAN (its gateway may be dead on purpose)."""
        if self._host is not None:
            raise RuntimeError("the host is still running")
        if plug_first:
            host = BootedHost(
                self.spec, before_wait=lambda pid: self.lab.plug_host(pid, wait=False)
            )
            self._host = host.__enter__()
        else:
            self._host = BootedHost(self.spec).__enter__()
            self.lab.plug_host(self._host.pid)
        return self._host

    def crash(self) -> None:
        """Power cut: every process of the boot is killed at once, nothing shuts down."""
        host, self._host = self.host, None
        try:
            host.close()
        finally:
            self.lab.unplug_host()

    def reboot(self, timeout: float = 10.0) -> BootedHost:
        self.poweroff(timeout)
        return self.boot()
