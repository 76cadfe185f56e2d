"""The record under faults, interruption and tampering: every fault of the state directory or of
a record is a clean refusal that names the path, with the host untouched; a full or read-only
disk never leaves the host half-migrated; a planted record drives nothing.

Faults are real: tmpfs mounts of a few KiB, read-only remounts, files and symlinks owned by
`nobody`, records rewritten between runs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from bridge_migrate.deadman import GRACE
from bridge_migrate.failpoints import KILL_AT_ENV
from bridge_migrate.record import (
    BLOCK,
    HEADER_AT,
    RECORD,
    Phase,
    Store,
    Transaction,
    process_start,
)
from bridge_migrate_testlab import Lab
from conftest import Agent, Run
from hostview import read_view
from test_systemd import AGENT, SLACK, STATE, Host
from test_takeover import assert_unchanged

NOBODY = 65534


def refused(run: Run, *needles: str, code: int = 3) -> None:
    """A clean refusal: the exit code, every needle in the message, no traceback."""
    assert run.code == code, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(mode=0o700)
    options = f"size={size},mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write until the file system takes nothing more (bounded by the mount's size)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        for _ in range(1 << 16):
            try:
                f.write(b"x" * BLOCK)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return
    raise AssertionError("the file system never filled")


# A state directory that cannot hold a record ---------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("size", ["8k", "32k", "56k"])  # the record: ~58 KiB
def test_state_dir_too_small_refuses_apply_with_nothing_changed(
    lab: Lab, agent: Agent, size: str
) -> None:
    before = read_view(lab.host_ns)
    with tmpfs(agent.state_dir, size):
        run = agent("apply")
        refused(run, f"cannot write the transaction record {agent.state_dir}/{RECORD}")
        assert "No space left on device" in run.stderr and "Nothing was changed" in run.stderr
        assert list(agent.state_dir.iterdir()) == []  # no record, no temporary file
        status = agent("status")
        assert status.code == 0 and "no transaction" in status.stdout
    assert_unchanged(before, read_view(lab.host_ns))


@pytest.mark.root
def test_read_only_state_dir_refuses_apply(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    with tmpfs(agent.state_dir, "1m"):
        remount(agent.state_dir, "ro")
        refused(agent("apply"), str(agent.state_dir), "Read-only file system")
    assert_unchanged(before, read_view(lab.host_ns))


@pytest.mark.root
def test_disk_full_after_apply_rollback_restores_and_records(lab: Lab, agent: Agent) -> None:
    before = read_view(lab.host_ns)
    with tmpfs(agent.state_dir, "1m"):
        assert agent("apply").code == 0
        fill(agent.state_dir)
        run = agent("rollback")
        assert run.code == 0, run.stdout + run.stderr
        assert_unchanged(before, read_view(lab.host_ns))
        # A phase change overwrites blocks the record already holds: no new space needed.
        assert "rolled-back" in agent("status").stdout


@pytest.mark.root
def test_read_only_after_apply_rollback_restores_and_says_it_could_not_record(
    lab: Lab, agent: Agent
) -> None:
    before = read_view(lab.host_ns)
    with tmpfs(agent.state_dir, "1m"):
        assert agent("apply").code == 0
        remount(agent.state_dir, "ro")
        run = agent("rollback")
        assert run.code == 0, run.stdout + run.stderr
        assert "Traceback" not in run.stderr
        assert f"NOT recorded (cannot open {agent.state_dir}/{RECORD}" in run.stdout
        assert "Read-only file system" in run.stdout
        assert_unchanged(before, read_view(lab.host_ns))
        assert "committed" in agent("status").stdout  # the older phase, as it said


# A state directory that is not one, or that someone else prepared ------------------------------


def _as_nobody(path: Path) -> None:
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


@pytest.mark.root
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("regular-file", "is not a directory"),
        ("dangling-symlink", "is a symbolic link"),
        ("symlink-by-nobody", "is a symbolic link"),
        ("symlink-above", "is a symbolic link"),
        ("owned-by-nobody", "is owned by uid 65534, not root"),
        ("group-writable", "is writable by group or others (mode 0770)"),
        ("world-writable-above", "is writable by group or others (mode 0777)"),
    ],
)
def test_untrusted_state_dir_is_refused_by_every_command(
    lab: Lab, tmp_path: Path, case: str, message: str
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    where = {
        "regular-file": tmp_path / "file",
        "dangling-symlink": tmp_path / "dangling",
        "symlink-by-nobody": tmp_path / "link",
        "symlink-above": tmp_path / "up" / "real",
        "owned-by-nobody": real,
        "group-writable": real,
        "world-writable-above": tmp_path / "open" / "state",
    }[case]
    culprit = where.parent if case.endswith("above") else where
    match case:
        case "regular-file":
            where.write_text("not a directory\n")
        case "dangling-symlink":
            where.symlink_to(tmp_path / "nowhere")
        case "symlink-by-nobody":
            where.symlink_to(real)
            _as_nobody(where)
        case "symlink-above":
            culprit.symlink_to(tmp_path)
        case "owned-by-nobody":
            _as_nobody(where)
        case "group-writable":
            where.chmod(0o770)
        case "world-writable-above":
            culprit.mkdir()
            culprit.chmod(0o777)  # not sticky: anyone could replace what root made there
            where.mkdir(mode=0o700)
    agent = Agent(lab, where)
    before = read_view(lab.host_ns)
    for command in ("apply", "status", "rollback", "confirm"):
        refused(agent(command), str(culprit), message)
    assert_unchanged(before, read_view(lab.host_ns))
    assert list(real.iterdir()) == []


@pytest.mark.root
def test_state_dir_under_a_sticky_directory_is_trusted(lab: Lab, tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add entries, not replace root's
    agent = Agent(lab, sticky / "state")
    assert agent("apply").code == 0
    assert "committed" in agent("status").stdout


@pytest.mark.root
def test_planted_lock_symlink_is_never_written_through(
    lab: Lab, agent: Agent, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    agent.state_dir.mkdir(mode=0o700)
    (agent.state_dir / "lock").symlink_to(victim)  # where older agents kept their lock
    _as_nobody(agent.state_dir / "lock")
    assert agent("apply").code == 0
    assert agent("rollback").code == 0
    assert victim.read_text() == "precious\n"
    # The same in a directory nobody prepared: refused before anything is opened in it.
    _as_nobody(agent.state_dir)
    refused(agent("apply"), "is owned by uid 65534")
    assert victim.read_text() == "precious\n"


@pytest.mark.root
def test_relative_state_dir_is_made_absolute(lab: Lab, agent: Agent, tmp_path: Path) -> None:
    command = " ".join(agent.argv("apply")).replace(str(agent.state_dir), "state")
    done = lab.run(lab.host_ns, ["sh", "-c", f"cd {tmp_path} && exec {command}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert (agent.state_dir / RECORD).exists()
    assert "committed" in agent("status").stdout


# Records that are not ours, or no longer ------------------------------------------------------


def _not_root(agent: Agent, *args: str) -> Run:
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *agent.argv(*args)]
    started = time.monotonic()
    done = agent.lab.run(agent.lab.host_ns, argv, env={"PYTHONDONTWRITEBYTECODE": "1"})
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


@pytest.mark.root
def test_not_root_is_a_clean_refusal(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0
    refused(_not_root(agent, "status"), f"the transaction record in {agent.state_dir} needs root")
    for command in ("rollback", "confirm"):
        refused(_not_root(agent, command), "not running as root")


def _write_raw(path: Path, data: bytes) -> None:
    """Rewrite the record in place (root's, 0600): what a damaged disk or an editor leaves."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _forge(state_dir: Path, change: Callable[[Transaction], Transaction]) -> None:
    """A record this agent never wrote, written as a whole with its own writer."""
    store = Store(state_dir)
    tx = store.load()
    assert tx is not None
    store.create(change(tx))


def _sideways(tx: Transaction) -> Transaction:
    """A plan in no direction the agent knows: the recipe it is made from cannot be read."""
    return replace(tx, plan=replace(tx.plan, direction="sideways"))  # type: ignore[arg-type]


def _glob_dead_man(tx: Transaction) -> Transaction:
    return replace(tx, phase=Phase.CONFIRMING, deadline=time.time() + 60, dead_man="bridge-*")


def _bad_device(tx: Transaction) -> Transaction:
    nic = replace(tx.snapshot.nic, name="eth0 lo")
    return replace(tx, snapshot=replace(tx.snapshot, nic=nic))


RAW: dict[str, Callable[[bytes], bytes]] = {
    "random-bytes": lambda data: os.urandom(len(data)),
    "cut-at-4096": lambda data: data[:4096],
    "cut-at-8192": lambda data: data[:8192],
    "cut-in-the-transaction": lambda data: data[: HEADER_AT + 100],
    "nested-10000-deep": lambda data: data[:HEADER_AT] + b"[" * 10000 + b"]" * 10000,
    "format-4": lambda data: data.replace(b"bridge-migrate record 3", b"bridge-migrate record 4"),
}
TAMPERED = {
    "random-bytes": "not a bridge-migrate record",
    "cut-at-4096": "cut short",
    "cut-at-8192": "cut short",
    "cut-in-the-transaction": "the transaction cannot be read",
    "nested-10000-deep": "nested deeper than 32",
    "format-4": "format '4'; this bridge-migrate reads format 3",
    "plan-in-no-direction": "the transaction cannot be read",
    "dead-man-glob": "dead man 'bridge-*' is not a unit bridge-migrate makes",
    "bad-device-name": "device 'eth0 lo': an interface name has no '/', ':' or white space",
    "larger-than-16-MiB": "larger than 16777216 bytes",
    "owned-by-nobody": "is owned by uid 65534, not root: it was not read",
    "readable-by-others": "is readable or writable by others (mode 0644): it was not read",
    "a-fifo": "is not a regular file",
}
FORGED = {
    "plan-in-no-direction": _sideways,
    "dead-man-glob": _glob_dead_man,
    "bad-device-name": _bad_device,
}


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_record_drives_nothing(lab: Lab, agent: Agent, case: str) -> None:
    lab.ip_batch(lab.host_ns, ["link add victim0 type bridge"])
    assert agent("apply").code == 0
    record = agent.state_dir / RECORD
    tx_id = Store(agent.state_dir).load().id  # type: ignore[union-attr]
    if case in RAW:
        _write_raw(record, RAW[case](record.read_bytes()))
    elif case in FORGED:
        _forge(agent.state_dir, FORGED[case])
    elif case == "larger-than-16-MiB":
        os.truncate(record, 17 * 1024 * 1024)
    elif case == "owned-by-nobody":
        _as_nobody(record)
    elif case == "readable-by-others":
        record.chmod(0o644)
    else:
        record.unlink()
        os.mkfifo(record, 0o600)
    migrated = read_view(lab.host_ns)
    for command in ("status", "rollback", "confirm", "apply", f"expire {tx_id}"):
        run = agent(*command.split())
        refused(run, str(record), TAMPERED[case])
        if case in RAW or case in FORGED:
            assert "bridge-migrate undo" in run.stderr
    after = read_view(lab.host_ns)
    assert after.link("victim0") is not None and after.link("br0") is not None
    assert after.links == migrated.links
    # br0's link-local address may finish DAD meanwhile, adding its local route.
    assert _not_link_local(after.routes) == _not_link_local(migrated.routes)


def _not_link_local(routes: frozenset[tuple[object, ...]]) -> set[tuple[object, ...]]:
    return {r for r in routes if not str(r[2]).startswith("fe80")}


@pytest.mark.root
def test_torn_status_slot_leaves_the_one_before(lab: Lab, agent: Agent) -> None:
    assert agent("apply").code == 0  # slots: applying, verifying, committed
    record = agent.state_dir / RECORD
    data = bytearray(record.read_bytes())
    data[BLOCK * 3 + 40] ^= 0x01  # a bit of the newest slot, as a crash mid-write leaves it
    _write_raw(record, bytes(data))
    status = agent("status")
    assert status.code == 0 and "verifying" in status.stdout


# A planted PID -------------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.root
@pytest.mark.parametrize("pid", ["the-hung-agent", "reused-pid", "pid-1"])
def test_expire_kills_only_the_agent_that_wrote_the_record(
    lab: Lab, agent: Agent, pid: str
) -> None:
    before = read_view(lab.host_ns)
    assert agent("apply").code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(agent.state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        start = process_start(holder.pid)
        assert start is not None
        planted = {
            "the-hung-agent": (holder.pid, start),
            "reused-pid": (holder.pid, start - 1),  # an earlier process with the same PID
            "pid-1": (1, start),
        }[pid]

        def hung(tx: Transaction) -> Transaction:
            past = time.time() - 1
            pid, start = planted
            return replace(tx, phase=Phase.VERIFYING, pid=pid, pid_start=start, deadline=past)

        # Written while the holder has the lock: the test stands in for the agent here.
        _forge(agent.state_dir, hung)
        run = agent("expire", Store(agent.state_dir).load().id)  # type: ignore[union-attr]
        if pid == "the-hung-agent":
            assert run.code == 4, run.stdout + run.stderr
            assert holder.wait(timeout=10) == -9
            assert_unchanged(before, read_view(lab.host_ns))
        else:
            refused(
                run, f"another bridge-migrate (pid {holder.pid}) is working on {agent.state_dir}"
            )
            assert holder.poll() is None  # not signalled
            assert read_view(lab.host_ns).link("br0") is not None
    finally:
        holder.kill()
        holder.wait(timeout=10)


# The dead man under a real systemd -------------------------------------------------------------


@pytest.mark.root
def test_relative_state_dir_reaches_the_dead_man(tmp_path: Path) -> None:
    host = Host(tmp_path)
    with host.booted:
        before = host.view()
        apply = f"cd /var/lib && exec {AGENT} --state-dir bridge-migrate apply --timeout 2"
        run = host.booted.host.run(["sh", "-c", apply], env={KILL_AT_ENV: "verifying"})
        assert run.returncode in (137, -9), run.stdout + run.stderr
        tx = host.record()
        assert tx is not None and tx.dead_man is not None
        command = host.booted.host.show(f"{tx.dead_man}.service", "ExecStart")
        assert f"--state-dir {STATE} expire {tx.id}" in command
        assert host.wait_phase({"rolled-back"}, 2 + GRACE + SLACK) == "rolled-back"
        assert_unchanged(before, host.view())


# Pure: no root needed ------------------------------------------------------------------------


@pytest.mark.parametrize("tx_id", ["*", "-1", "0123456789ab*", "../../x", ""])
def test_expire_takes_only_a_transaction_id(tx_id: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge_migrate", "--state-dir", str(tmp_path), "expire", tx_id],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "expected 12 hex digits" in done.stderr and "Traceback" not in done.stderr
