"""attach with a real Docker engine, and the Docker-native ways onto br0, side by side.

dockerd runs inside the lab's host namespace (after the takeover), in a mount namespace of its
own with a tmpfs on /run and its data, exec root and socket in the test's directory: its
iptables rules, its sysctls and its bridges are the lab host's, never the machine's. The image is
made here from Debian's static busybox (`docker import`): nothing is pulled. Skipped, saying why,
where dockerd or busybox is not installed (scripts/bootstrap installs both).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate import guest
from bridge_migrate.errors import Refused
from bridge_migrate_testlab import Lab
from conftest import Agent

docker = pytest.importorskip("docker", reason="the docker Python SDK is not installed")

pytestmark = pytest.mark.root

IMAGE = "bridge-migrate-test/busybox:1"
START_TIMEOUT = 30.0


def _busybox_tar() -> bytes:
    busybox = shutil.which("busybox")
    assert busybox is not None
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for name in ("sh", "sleep", "ip", "ping"):
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return out.getvalue()


@dataclass(frozen=True)
class Engine:
    client: Any  # docker.DockerClient
    host: str  # DOCKER_HOST for the agent


@pytest.fixture
def engine(lab: Lab, agent: Agent) -> Iterator[Engine]:
    """A Docker engine in the lab host (on br0 already), and a client of it."""
    for tool in ("dockerd", "busybox"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"{tool} is not installed (Debian docker.io, busybox-static)")
    assert agent("apply").code == 0
    # Short: containerd's socket path under it must fit a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="bm-docker.", dir="/tmp"))
    sock = root / "docker.sock"
    script = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/docker /run/containerd && "
        f"exec dockerd --data-root {root}/data --exec-root {root}/exec "
        f"--pidfile {root}/dockerd.pid -H unix://{sock} --bridge=none"
    )
    log = (root / "dockerd.log").open("w")
    daemon = lab.popen(
        lab.host_ns,
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = None
    try:
        client = _connect(sock, daemon, root)
        client.api.import_image_from_data(_busybox_tar(), repository=IMAGE)
        yield Engine(client, f"unix://{sock}")
    finally:
        if client is not None:
            for container in client.containers.list(all=True):
                container.remove(force=True)  # its processes live outside the lab's namespaces
            client.close()
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _connect(sock: Path, daemon: subprocess.Popen[str], root: Path) -> Any:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            pytest.fail(f"dockerd exited: {(root / 'dockerd.log').read_text()[-2000:]}")
        if sock.exists():
            try:  # the socket is there a moment before the API answers on it
                return docker.DockerClient(base_url=f"unix://{sock}", timeout=20)
            except docker.errors.DockerException:
                pass
        time.sleep(0.1)
    pytest.fail(f"dockerd not ready in {START_TIMEOUT} s: {(root / 'dockerd.log').read_text()}")


def _run(client: Any, name: str, network: str = "none") -> Any:
    container = client.containers.run(
        IMAGE, ["sleep", "300"], name=name, network=network, detach=True
    )
    container.reload()
    return container


def _reaches(pid: int, target: str) -> bool:
    """One ping from the container's namespace (the lab's meter needs a namespace name)."""
    probe = ["nsenter", "-t", str(pid), "-n", "-m", "ping", "-c", "1", "-W", "1", target]
    return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0


def test_attach_a_running_container(lab: Lab, agent: Agent, engine: Engine):
    a = lab.addrs
    container = _run(engine.client, "web")
    env = {"DOCKER_HOST": engine.host}

    def bm(*args: str) -> subprocess.CompletedProcess[str]:
        return lab.run(lab.host_ns, agent.argv(*args), env=env, timeout=60)

    # Docker set FORWARD's policy to drop and br_netfilter passes bridged frames to it.
    refused = bm("attach", "web", "198.18.0.70/24@198.18.0.1")
    assert refused.returncode == 3, refused
    assert "policy drop" in refused.stderr and "DOCKER-USER" in refused.stderr
    fix = ["iptables", "-I", "DOCKER-USER", "-i", "br0", "-o", "br0", "-j", "ACCEPT"]
    assert lab.run(lab.host_ns, fix).returncode == 0
    done = bm("attach", "web", "198.18.0.70/24@198.18.0.1")
    assert done.returncode == 0, done
    pid = container.attrs["State"]["Pid"]
    for target in (a.host_v4, a.peer_v4, a.far_v4):
        assert _reaches(pid, target), target
    lab.wait_reachable(lab.peer_ns, ["198.18.0.70"])
    assert bm("attach", container.id, "198.18.0.70/24@198.18.0.1").returncode == 0  # same, by id
    assert bm("detach", "web").returncode == 0
    assert not _reaches(pid, a.peer_v4)
    gone = bm("attach", "nosuch", "198.18.0.71/24")
    assert gone.returncode == 3 and "no such Docker container" in gone.stderr, gone


def test_container_found_through_the_cli_without_the_sdk(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    container = _run(engine.client, "cli")
    monkeypatch.setitem(sys.modules, "docker", None)  # `import docker` fails: the CLI is asked
    monkeypatch.setenv("DOCKER_HOST", engine.host)
    assert guest.container_pid("cli") == container.attrs["State"]["Pid"]
    with pytest.raises(Refused, match="no such Docker container"):
        guest.container_pid("nosuch")
    container.stop(timeout=0)
    with pytest.raises(Refused, match="is not running"):
        guest.container_pid("cli")


def test_docker_bridge_network_on_br0(lab: Lab, engine: Engine):
    """The Docker-native way: a bridge network on the existing br0 reaches host, LAN and far
    host; Docker leaves br0 in place when the network goes."""
    a, client = lab.addrs, engine.client
    lan = client.networks.create(
        "lan",
        driver="bridge",
        options={"com.docker.network.bridge.name": "br0"},
        ipam=_ipam("198.18.0.0/24", a.host_v4, "198.18.0.128/28"),
    )
    guest = _run(client, "on-bridge", network="lan")
    pid = guest.attrs["State"]["Pid"]
    for target in (a.host_v4, a.peer_v4, a.far_v4):
        assert _reaches(pid, target), target
    guest.remove(force=True)
    lan.remove()
    assert "br0" in lab.run(lab.host_ns, ["ip", "-br", "link"]).stdout


@pytest.mark.parametrize(("driver", "mode"), [("macvlan", "bridge"), ("ipvlan", "l2")])
def test_docker_macvlan_and_ipvlan_never_reach_their_host(
    lab: Lab, engine: Engine, driver: str, mode: str
):
    """On br0 as their parent, they reach the LAN and beyond, but not the host (moby #21735)."""
    a, client = lab.addrs, engine.client
    client.networks.create(
        driver,
        driver=driver,
        options={"parent": "br0", f"{driver}_mode": mode},
        ipam=_ipam("198.18.0.0/24", a.gw_v4, "198.18.0.144/28"),
    )
    try:
        guest = _run(client, f"on-{driver}", network=driver)
    except docker.errors.APIError as e:
        if "not supported" in str(e):
            pytest.skip(f"this kernel has no {driver}: {e.explanation}")
        raise
    pid = guest.attrs["State"]["Pid"]
    assert _reaches(pid, a.peer_v4) and _reaches(pid, a.far_v4)
    assert not _reaches(pid, a.host_v4), f"{driver} reached its host"


def _ipam(subnet: str, gateway: str, ip_range: str) -> Any:
    pool = docker.types.IPAMPool(subnet=subnet, gateway=gateway, iprange=ip_range)
    return docker.types.IPAMConfig(pool_configs=[pool])
