"""Guests: whose network namespace `attach` wires into the bridge, and how to act inside it.

A GUEST is `netns:NAME` (a namespace named by `ip netns add`), `pid:PID` or a bare number (the
namespace of that process), or a Docker container's name or id (its main process, asked of the
Docker Engine API: the `docker` Python SDK, else the `docker` CLI). Once resolved, the namespace is
held open by a descriptor for the whole command, so a process that exits (and a PID that is reused)
cannot swap the namespace under it. The namespace's inode is its identity in the record.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar, assert_never

from pyroute2.iproute.linux import IPRoute

from .errors import Refused, UsageError

GuestKind = Literal["netns", "pid", "docker"]
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,254}")
# Docker's container names ([a-zA-Z0-9][a-zA-Z0-9_.-]+) and ids (hex), with its optional '/'.
_CONTAINER = re.compile(r"/?[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_DOCKER_TIMEOUT = 10.0
T = TypeVar("T")


@dataclass(frozen=True)
class GuestSpec:
    """GUEST as given on the command line."""

    kind: GuestKind
    name: str  # the namespace name, the PID, or the container

    def __str__(self) -> str:
        return self.name if self.kind == "docker" else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Guest:
    """A resolved guest: its namespace, held open by `fd`."""

    spec: GuestSpec
    fd: int
    inode: int  # the namespace's identity (st_ino of its nsfs file)
    pid: int | None  # the process it was found through (pid:, Docker), for messages


def parse_guest(text: str) -> GuestSpec:
    kind, sep, rest = text.partition(":")
    if sep:
        if kind == "netns":
            if not _NETNS_NAME.fullmatch(rest) or rest in (".", ".."):
                raise UsageError(f"GUEST {text!r}: not a network namespace name")
            return GuestSpec("netns", rest)
        if kind == "pid":
            return GuestSpec("pid", _pid(text, rest))
        raise UsageError(
            f"GUEST {text!r}: unknown form; give netns:NAME, pid:PID (or a bare PID), "
            "or a Docker container's name or id"
        )
    if text.isdigit():
        return GuestSpec("pid", _pid(text, text))
    if not _CONTAINER.fullmatch(text):
        raise UsageError(f"GUEST {text!r}: not a Docker container name or id")
    return GuestSpec("docker", text.lstrip("/"))


def _pid(text: str, digits: str) -> str:
    if not digits.isdigit() or int(digits) < 1:
        raise UsageError(f"GUEST {text!r}: a PID is a positive number")
    return str(int(digits))


@contextmanager
def resolved(spec: GuestSpec) -> Iterator[Guest]:
    """The guest's namespace, held open until the block ends. Refused if it is not found."""
    path, pid = _namespace_path(spec)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"guest {spec} not found: {path}: {e.strerror}") from None
    try:
        inode = os.fstat(fd).st_ino
        if inode == os.stat("/proc/self/ns/net").st_ino:
            raise Refused(
                f"guest {spec} is in the host's own network namespace",
                "a guest is a container, a VM's helper or a namespace of its own",
            )
        yield Guest(spec, fd, inode, pid)
    finally:
        os.close(fd)


def _namespace_path(spec: GuestSpec) -> tuple[str, int | None]:
    match spec.kind:
        case "netns":
            return f"{NETNS_DIR}/{spec.name}", None
        case "pid":
            return f"/proc/{spec.name}/ns/net", int(spec.name)
        case "docker":
            pid = container_pid(spec.name)
            return f"/proc/{pid}/ns/net", pid
        case _:
            assert_never(spec.kind)


def container_pid(name: str) -> int:
    """The main process of running container `name`, from the Docker Engine API."""
    try:
        import docker  # the SDK is optional: the CLI speaks the same API
    except ImportError:
        state = _inspect_with_cli(name)
    else:
        state = _inspect_with_sdk(docker, name)
    pid = state.get("Pid")
    if not state.get("Running") or not isinstance(pid, int) or pid < 1:
        raise Refused(f"Docker container {name} is not running", f"start it: `docker start {name}`")
    return pid


def _inspect_with_sdk(docker: object, name: str) -> dict[str, object]:
    try:
        client = docker.from_env(timeout=int(_DOCKER_TIMEOUT))  # type: ignore[attr-defined]
        try:
            attrs = client.containers.get(name).attrs
        finally:
            client.close()
    except docker.errors.NotFound:  # type: ignore[attr-defined]
        raise Refused(f"guest {name}: no such Docker container") from None
    except docker.errors.DockerException as e:  # type: ignore[attr-defined]
        raise _no_docker(str(e)) from None
    state: dict[str, object] = attrs.get("State") or {}
    return state


def _inspect_with_cli(name: str) -> dict[str, object]:
    cli = shutil.which("docker")
    if cli is None:
        raise _no_docker("neither the docker Python SDK nor the docker CLI is installed")
    try:
        done = subprocess.run(
            [cli, "container", "inspect", "--format", "{{json .State}}", "--", name],
            capture_output=True,
            text=True,
            timeout=_DOCKER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _no_docker(f"the Docker daemon did not answer within {_DOCKER_TIMEOUT:g} s") from None
    if done.returncode != 0:
        error = done.stderr.strip()
        if "No such container" in error or "no such container" in error:
            raise Refused(f"guest {name}: no such Docker container")
        raise _no_docker(error or f"docker exited with {done.returncode}")
    state: dict[str, object] = json.loads(done.stdout)
    return state


def _no_docker(why: str) -> Refused:
    return Refused(
        f"GUEST names a Docker container, but Docker cannot be asked: {why}",
        "start the Docker daemon (or set DOCKER_HOST), or name the guest as netns:NAME or pid:PID",
    )


# -- acting inside the guest ----------------------------------------------------------------------


def in_namespace(fd: int, work: Callable[[], T]) -> T:
    """Run `work` in a thread of its own that has entered namespace `fd` first: sockets made
    there (and threads started from there) belong to the guest, the rest of the process stays.
    setns(2) changes only the calling thread's namespace."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            _setns(fd)
            result.append(work())
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    thread = threading.Thread(target=body, name="in-guest")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@contextmanager
def entered(guest: Guest) -> Iterator[None]:
    """This thread in the guest's namespace for the block, then back: the probes run in the
    main thread, where a signal interrupts them at once (threads they start are the guest's)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(guest.fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def with_netlink(guest: Guest, work: Callable[[IPRoute], T]) -> T:
    """`work` with a netlink socket of the guest's namespace. Not pyroute2's netns=, which forks
    a helper: a child of this process would run the agent's signal handlers."""

    def run() -> T:
        with IPRoute() as ipr:  # its socket is made on first use, in this thread
            return work(ipr)

    return in_namespace(guest.fd, run)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
