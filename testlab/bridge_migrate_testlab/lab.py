"""A disposable single-NIC host on a LAN, built from network namespaces.

    host ns            lan ns                                       peer ns / far ns
    eth0 (veth) ---- p-host -+- lan0 (bridge: gateway, router2)
                             +- p-peer ------------------------------ eth0 (peer)
                        p-far (198.19.1.1, 2001:db8:0:2::1) --------- eth0 (far)
                        lo: 198.19.5.1/32 (what the host's static route leads to)

Every device is created inside a namespace this lab made (`ip` runs there through nsenter, or
creates the far end of a veth directly in its target namespace), so the machine's own interfaces
are never touched and no packet can leave the lab.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge_migrate_testlab.results import MeterResult

log = logging.getLogger(__name__)

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_LAN_MAC = "02:b0:00:00:00:01"  # fixed, so that the bridge keeps it whatever its ports are
_EXTRA_ADDR_NET = ipaddress.IPv4Network("198.18.128.0/17")
_EXTRA_ROUTE_NET = ipaddress.IPv4Network("198.19.128.0/17")
_CMD_TIMEOUT = 10.0
# A new namespace copies the machine's IPv4 "all"/"default" settings (IPv6 starts from kernel
# defaults): pin the ones this project depends on to the kernel defaults, so a lab behaves the
# same on every machine. Note promote_secondaries=0: deleting the primary deletes secondaries.
_V4_KERNEL_DEFAULTS: dict[str, str | int] = {
    f"net.ipv4.conf.{scope}.{key}": value
    for scope in ("all", "default")
    for key, value in {
        "rp_filter": 0,
        "arp_ignore": 0,
        "arp_announce": 0,
        "arp_filter": 0,
        "promote_secondaries": 0,
        "accept_redirects": 1,
    }.items()
}
METER = "bridge_migrate_testlab.meter"
_KILL_ROUNDS = 10  # processes may fork while we kill them
# What Lab(dhcp=True) leases: beside the fixed addresses of LabAddresses, never overlapping.
DHCP_V4_FIRST, DHCP_V4_LAST = "198.18.0.100", "198.18.0.149"
DHCP_V6_FIRST, DHCP_V6_LAST = 0x1000, 0x1FFF  # host parts in the host's /64
DHCP_LEASE_SECONDS = 120  # short, so that tests and soaks see renewals


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        raise FileNotFoundError(f"{name} not found (needed by netlab)")
    return path


@dataclass(frozen=True)
class DhcpLease:
    expiry: int  # seconds since the epoch
    mac: str  # for DHCPv6 lines, the IAID
    address: str
    client_id: str


@dataclass(frozen=True)
class LabAddresses:
    """Lab addresses: benchmarking range 198.18.0.0/15 and documentation prefix 2001:db8::/32."""

    host_v4: str = "198.18.0.10"  # primary
    host_v4_secondary: str = "198.18.0.11"
    host_v6: str = "2001:db8:0:1::10"
    gw_v4: str = "198.18.0.1"
    gw_v6: str = "2001:db8:0:1::1"
    router2_v4: str = "198.18.0.2"
    static_net: str = "198.19.5.0/24"  # host route: static_net via router2_v4 dev eth0
    static_v4: str = "198.19.5.1"  # answers inside static_net (on the LAN namespace's lo)
    peer_v4: str = "198.18.0.20"
    peer_v6: str = "2001:db8:0:1::20"
    far_v4: str = "198.19.1.20"
    far_v6: str = "2001:db8:0:2::20"
    far_gw_v4: str = "198.19.1.1"
    far_gw_v6: str = "2001:db8:0:2::1"
    v4_prefixlen: int = 24
    v6_prefixlen: int = 64


def _random_mac() -> str:
    octets = [0x02, *secrets.token_bytes(5)]  # locally administered, unicast
    return ":".join(f"{o:02x}" for o in octets)


class MeterHandle:
    """A running `bridge_migrate_testlab.meter` process; stop() ends it and returns its result."""

    def __init__(self, proc: subprocess.Popen[str], ready_timeout: float) -> None:
        self._proc = proc
        self._stderr = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> str:
        # Raw os.read on the pipe: select() cannot see data buffered in the text wrapper.
        assert self._proc.stderr is not None
        fd, buf, deadline = self._proc.stderr.fileno(), b"", time.monotonic() + timeout
        while b"ready\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._proc.kill()
                raise TimeoutError(f"meter not ready after {timeout} s: {buf!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                self._proc.wait(timeout=5)
                raise RuntimeError(f"meter exited at start: {buf.decode(errors='replace')}")
            buf += chunk
        return buf.decode(errors="replace").replace("ready\n", "", 1)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self, timeout: float = 5.0) -> MeterResult:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate(timeout=5)
            raise TimeoutError(f"meter did not stop within {timeout} s") from None
        if self._proc.returncode not in (0, 1) or not out.strip():
            raise RuntimeError(f"meter failed ({self._proc.returncode}): {self._stderr}{err}")
        return MeterResult.from_json(out)


class Lab:
    """Context manager: builds the lab on entry, removes every namespace it made on exit."""

    nic = "eth0"
    lan_bridge = "lan0"

    def __init__(
        self,
        prefix: str | None = None,
        *,
        host_sysctls: Mapping[str, str | int] | None = None,
        host_pid: int | None = None,
        configure_host: bool = True,
        dhcp: bool = False,
    ) -> None:
        """host_sysctls: set in the host namespace once eth0 exists, before it gets addresses
        (e.g. {"net.ipv4.conf.eth0.promote_secondaries": 1} to try the systemd default).
        host_pid: use that process's network namespace as the host (`ip netns attach`), e.g.
        a systemd.BootedHost's PID 1; the lab never kills processes there, and on close
        only detaches the name. See plug_host/unplug_host for reboots.
        configure_host=False: the host's eth0 is plugged in but left down, without addresses or
        routes, for a network manager in a booted host to configure (managed.py); entering
        then does not wait for the host to reach the LAN.
        dhcp: the LAN serves DHCPv4 (2-minute leases, the gateway as router) and router
        advertisements with SLAAC and DHCPv6 on the host's prefix (dnsmasq, docs/lab.md)."""
        prefix = prefix if prefix is not None else "bm" + secrets.token_hex(3)
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.host_ns, self.lan_ns = f"{prefix}-host", f"{prefix}-lan"
        self.peer_ns, self.far_ns = f"{prefix}-peer", f"{prefix}-far"
        self.addrs = LabAddresses()
        self._ip, self._nsenter, self._sysctl = _tool("ip"), _tool("nsenter"), _tool("sysctl")
        self._created: list[str] = []  # only these are ever deleted
        self._procs: list[subprocess.Popen[str]] = []
        self._extra_addrs = self._extra_routes = 0
        self._host_sysctls = dict(host_sysctls or {})
        self._nic_mac = f"address {_random_mac()}"
        self._host_pid = host_pid
        self._configure_host = configure_host
        self._dhcp = dhcp
        self._leases: str | None = None  # dnsmasq's lease directory, removed on close
        self._attached: set[str] = set()  # names of namespaces the lab attached, not made
        self._proc_ns: dict[int, str] = {}  # id(proc) -> namespace it was started in

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.host_ns, self.lan_ns, self.peer_ns, self.far_ns)

    def netns_path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if self._created:
            raise RuntimeError("lab already entered")
        atexit.register(self.close)
        try:
            self._build()
            if self._configure_host:
                self.wait_reachable(self.host_ns, self._ready_targets())
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failing cleanup must not hide the exception that ended the body.
        self.close(raise_errors=exc_type is None)

    def close(self, raise_errors: bool = True) -> None:
        """Kill every process in the lab's namespaces, then delete them. Idempotent."""
        atexit.unregister(self.close)
        failed = []
        for ns in reversed(self._created):
            if ns in self._attached:
                self._kill_own(ns)  # never the processes of whoever owns that namespace
            else:
                self._kill_all(ns)
            done = subprocess.run(
                [self._ip, "netns", "del", ns], capture_output=True, text=True, timeout=_CMD_TIMEOUT
            )
            if done.returncode != 0 and os.path.exists(self.netns_path(ns)):
                failed.append(f"{ns}: {done.stderr.strip()}")
        self._created.clear()
        self._attached.clear()
        for proc in self._procs:  # already killed above; reap them
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                failed.append(f"pid {proc.pid} did not exit")
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._procs.clear()
        self._proc_ns.clear()
        if self._leases is not None:
            shutil.rmtree(self._leases, ignore_errors=True)
            self._leases = None
        if failed:
            log.error("netlab cleanup failed: %s", "; ".join(failed))
            if raise_errors:
                raise RuntimeError("netlab cleanup failed: " + "; ".join(failed))

    def _kill_all(self, ns: str) -> None:
        for _ in range(_KILL_ROUNDS):
            done = subprocess.run(
                [self._ip, "netns", "pids", ns],
                capture_output=True,
                text=True,
                timeout=_CMD_TIMEOUT,
            )
            pids = [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        log.warning("processes still alive in %s after %d rounds", ns, _KILL_ROUNDS)

    def _kill_own(self, ns: str) -> None:
        for proc in self._procs:
            if self._proc_ns.get(id(proc)) == ns and proc.poll() is None:
                proc.kill()

    # -- running things inside the lab -------------------------------------------------------

    def add_namespace(self, suffix: str) -> str:
        """One more namespace of this lab (a guest to attach), empty but for a down lo, deleted
        with the lab; returns its name."""
        ns = f"{self.prefix}-{suffix}"
        done = subprocess.run([self._ip, "netns", "add", ns], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip netns add {ns} failed: {done.stderr.strip()}")
        self._created.append(ns)
        return ns

    def _argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        # Never run anything in a namespace that is not ours.
        if ns not in self.namespaces and ns not in self._created:
            raise ValueError(f"{ns!r} is not a namespace of this lab")
        return [self._nsenter, f"--net={self.netns_path(ns)}", "--", *argv]

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 60,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside ns; env entries are added to (not replacing) os.environ."""
        done = subprocess.run(
            self._argv(ns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **env} if env is not None else None,
            input=input,
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            )
        return done

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start argv inside ns (text mode); the lab kills and reaps it on exit at the latest."""
        proc: subprocess.Popen[str] = subprocess.Popen(self._argv(ns, argv), text=True, **kwargs)
        self._procs.append(proc)
        self._proc_ns[id(proc)] = ns
        return proc

    def ip_batch(self, ns: str, lines: Sequence[str]) -> None:
        """Run `ip -batch -` in ns; stops at and raises on the first failing line."""
        done = self.run(ns, [self._ip, "-batch", "-"], input="\n".join(lines) + "\n", timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"ip -batch in {ns} failed: {done.stderr.strip()}")

    def sysctl(self, ns: str, settings: Mapping[str, str | int]) -> None:
        """Set sysctls inside ns: /proc/sys/net belongs to the namespace of the writer."""
        kvs = [f"{k}={v}" for k, v in settings.items()]
        self.run(ns, [self._sysctl, "-q", "-w", *kvs], check=True, timeout=_CMD_TIMEOUT)

    def start_meter(
        self,
        ns: str,
        targets: Sequence[str],
        interval_ms: float = 1.0,
        *,
        late_ms: float = 100.0,
        duration_s: float | None = None,
        ready_timeout: float = 5.0,
    ) -> MeterHandle:
        argv = [
            sys.executable,
            "-m",
            METER,
            "--interval-ms",
            str(interval_ms),
        ]
        argv += ["--late-ms", str(late_ms)]
        if duration_s is not None:
            argv += ["--duration", str(duration_s)]
        proc = self.popen(
            ns, [*argv, "--", *targets], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return MeterHandle(proc, ready_timeout)

    def wait_reachable(self, ns: str, targets: Sequence[str], timeout: float = 5.0) -> MeterResult:
        """Ping every target from ns until each answered once; TimeoutError after `timeout` s."""
        argv = [
            sys.executable,
            "-m",
            METER,
            "--until-reply",
            "--interval-ms",
            "10",
        ]
        argv += ["--late-ms", str(timeout * 1000), "--duration", str(timeout), "--", *targets]
        done = self.run(ns, argv, timeout=timeout + 10)
        if done.returncode not in (0, 1) or not done.stdout.strip():
            raise RuntimeError(f"meter failed in {ns}: {done.stderr.strip()}")
        result = MeterResult.from_json(done.stdout)
        silent = [s.target for s in result.streams if s.received + s.late == 0]
        if silent:
            raise TimeoutError(f"no reply in {timeout} s from {silent} (probing from {ns})")
        return result

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> None:
        for ns in self.namespaces:
            if ns == self.host_ns and self._host_pid is not None:
                self._attach(ns, self._host_pid)
                continue
            done = subprocess.run([self._ip, "netns", "add", ns], capture_output=True, text=True)
            if done.returncode != 0:  # e.g. the name is taken: never adopt (or delete) it
                raise RuntimeError(f"ip netns add {ns} failed: {done.stderr.strip()}")
            self._created.append(ns)
        for ns in self.namespaces:
            self.sysctl(ns, self._sysctls(ns))
        # Created first in both namespaces, eth0 and p-host both get ifindex 2: each one's iflink
        # equals its own ifindex, as on a physical NIC, and the kernel's link-event code treats
        # such carrier changes as non-urgent (batched, up to 1 s late). Measured: an admin flap
        # of p-host costs 0.5-1 s (6 ms with unequal ifindexes), one of host eth0 its own length.
        self.ip_batch(
            self.host_ns,
            [f"link add {self.nic} {self._nic_mac} type veth peer name p-host netns {self.lan_ns}"],
        )
        self.ip_batch(self.lan_ns, self._lan_links())
        # DAD stays on in the host (a bridge made there sees real DAD) except on eth0, which
        # behaves as on a host that has long settled. The caller's settings come last.
        self.sysctl(self.host_ns, {f"net.ipv6.conf.{self.nic}.accept_dad": 0, **self._host_sysctls})
        a = self.addrs
        self.ip_batch(self.lan_ns, self._lan_config())
        self.ip_batch(self.peer_ns, self._leaf_config(a.peer_v4, a.peer_v6, a.gw_v4, a.gw_v6))
        self.ip_batch(self.far_ns, self._leaf_config(a.far_v4, a.far_v6, a.far_gw_v4, a.far_gw_v6))
        if self._dhcp:
            self._serve_dhcp()
        self.ip_batch(self.host_ns, self._host_config())

    def dhcp_leases(self) -> tuple[DhcpLease, ...]:
        """dnsmasq's leases as its lease file has them now (IPv4: expiry, MAC, address)."""
        if self._leases is None:
            return ()
        try:
            text = Path(self._leases, "leases").read_text()
        except FileNotFoundError:
            return ()
        words = (line.split() for line in text.splitlines())
        return tuple(
            DhcpLease(int(w[0]), w[1], w[2], w[4]) for w in words if len(w) >= 5 and w[0].isdigit()
        )

    def _serve_dhcp(self) -> None:
        """dnsmasq on the LAN bridge; returns once it listens (the host may be asking already)."""
        a, br = self.addrs, self.lan_bridge
        self._leases = tempfile.mkdtemp(prefix=f"netlab-{self.prefix}-dhcp-")
        v6_net = ipaddress.ip_network(f"{a.gw_v6}/{a.v6_prefixlen}", strict=False)
        argv = [_tool("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--port=0"]
        argv += [f"--interface={br}", "--bind-interfaces", "--user=root", "--log-facility=-"]
        argv += [f"--dhcp-leasefile={self._leases}/leases", f"--pid-file={self._leases}/pid"]
        argv += [
            f"--dhcp-range={DHCP_V4_FIRST},{DHCP_V4_LAST},{DHCP_LEASE_SECONDS}",
            f"--dhcp-option=3,{a.gw_v4}",
        ]
        argv += ["--dhcp-authoritative", "--enable-ra"]
        first, last = v6_net[DHCP_V6_FIRST], v6_net[DHCP_V6_LAST]
        argv += [f"--dhcp-range={first},{last},slaac,{a.v6_prefixlen},{DHCP_LEASE_SECONDS}"]
        self.popen(self.lan_ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listening = f"{self._leases}/pid"
        deadline = time.monotonic() + _CMD_TIMEOUT
        while not os.path.exists(listening):  # written once its sockets are bound
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq did not start in {_CMD_TIMEOUT} s")
            time.sleep(0.01)

    def _attach(self, ns: str, pid: int) -> None:
        argv = [self._ip, "netns", "attach", ns, str(pid)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"ip netns attach {ns} {pid} failed: {done.stderr.strip()}")
        self._created.append(ns)
        self._attached.add(ns)

    # -- a host that reboots (systemd.py) ----------------------------------------------------

    def unplug_host(self) -> None:
        """Pull the host's cable and forget its namespace: the veth pair goes (the LAN sees the
        port vanish) and the name is detached, so a powered-off boot's namespace is freed."""
        if self.host_ns not in self._attached:
            raise RuntimeError("unplug_host: the host namespace was not attached (host_pid)")
        self._kill_own(self.host_ns)
        self.run(self.lan_ns, [self._ip, "link", "del", "p-host"], timeout=_CMD_TIMEOUT)
        argv = [self._ip, "netns", "del", self.host_ns]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"ip netns del {self.host_ns} failed: {done.stderr.strip()}")
        self._created.remove(self.host_ns)
        self._attached.discard(self.host_ns)

    def plug_host(self, pid: int, *, timeout: float = 5.0, wait: bool = True) -> None:
        """Make pid's network namespace the host (e.g. a fresh boot) with a new eth0 on the
        LAN, configured as at build time; returns once the host reaches every lab address
        (unless not `wait`)."""
        if self.host_ns in self._created:
            raise RuntimeError("plug_host: unplug the current host first")
        self._attach(self.host_ns, pid)
        self.sysctl(self.host_ns, self._sysctls(self.host_ns))
        # Same ifindex (2) on both ends as at build time (see _build); p-host's old one is free.
        # The same MAC as before, as a real NIC keeps it: the LAN's neighbour caches stay right.
        nic = (
            f"link add {self.nic} index 2 {self._nic_mac} type veth"
            f" peer name p-host netns {self.lan_ns} index 2"
        )
        self.ip_batch(self.host_ns, [nic])
        br = self.lan_bridge
        self.ip_batch(self.lan_ns, [f"link set p-host master {br}", "link set p-host up"])
        self.sysctl(self.host_ns, {f"net.ipv6.conf.{self.nic}.accept_dad": 0, **self._host_sysctls})
        self.ip_batch(self.host_ns, self._host_config())
        if wait and self._configure_host:
            self.wait_reachable(self.host_ns, self._ready_targets(), timeout=timeout)

    def _ready_targets(self) -> list[str]:
        a = self.addrs
        gateways = [a.gw_v4, a.gw_v6, a.router2_v4, a.static_v4]
        return [*gateways, a.peer_v4, a.peer_v6, a.far_v4, a.far_v6]

    def _sysctls(self, ns: str) -> dict[str, str | int]:
        """Settings made before any device exists in ns (new devices copy "default")."""
        if ns == self.host_ns:
            return {**_V4_KERNEL_DEFAULTS, "net.ipv4.ip_forward": 0}
        nodad = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
        if ns != self.lan_ns:
            return {**_V4_KERNEL_DEFAULTS, **nodad, "net.ipv4.ip_forward": 0}
        return {
            **_V4_KERNEL_DEFAULTS,
            **nodad,
            "net.ipv4.ip_forward": 1,
            "net.ipv6.conf.all.forwarding": 1,
            "net.ipv4.conf.all.send_redirects": 0,
            "net.ipv4.conf.default.send_redirects": 0,
            # answer ARP only for addresses on the asking interface (kill_gateway "silent")
            "net.ipv4.conf.default.arp_ignore": 1,
            # deleting the gateway (primary) must keep router2 (secondary)
            "net.ipv4.conf.default.promote_secondaries": 1,
        }

    def _lan_links(self) -> list[str]:
        return [
            f"link add {self.lan_bridge} address {_LAN_MAC} type bridge"
            " stp_state 0 forward_delay 0 mcast_snooping 0",  # a dumb switch, forwarding at once
            f"link add p-peer type veth peer name eth0 netns {self.peer_ns}",
            f"link add p-far type veth peer name eth0 netns {self.far_ns}",
        ]

    def _lan_config(self) -> list[str]:
        a, br = self.addrs, self.lan_bridge
        return [
            f"link set p-host master {br}",
            f"link set p-peer master {br}",
            f"addr add {a.gw_v4}/{a.v4_prefixlen} dev {br}",
            f"addr add {a.router2_v4}/{a.v4_prefixlen} dev {br}",
            f"addr add {a.gw_v6}/{a.v6_prefixlen} dev {br} nodad",
            f"addr add {a.far_gw_v4}/{a.v4_prefixlen} dev p-far",
            f"addr add {a.far_gw_v6}/{a.v6_prefixlen} dev p-far nodad",
            f"addr add {a.static_v4}/32 dev lo",
            *(f"link set {dev} up" for dev in ("lo", br, "p-host", "p-peer", "p-far")),
        ]

    def _leaf_config(self, v4: str, v6: str, gw4: str, gw6: str) -> list[str]:
        a = self.addrs
        return [
            f"addr add {v4}/{a.v4_prefixlen} dev eth0",
            f"addr add {v6}/{a.v6_prefixlen} dev eth0 nodad",
            "link set lo up",
            "link set eth0 up",
            f"route add default via {gw4} dev eth0",
            f"route add default via {gw6} dev eth0",
        ]

    def _host_config(self) -> list[str]:
        a, nic = self.addrs, self.nic
        if not self._configure_host:
            return ["link set lo up"]
        return [
            f"addr add {a.host_v4}/{a.v4_prefixlen} dev {nic}",
            f"addr add {a.host_v4_secondary}/{a.v4_prefixlen} dev {nic}",
            f"addr add {a.host_v6}/{a.v6_prefixlen} dev {nic} nodad",
            "link set lo up",
            f"link set {nic} up",
            f"route add default via {a.gw_v4} dev {nic}",
            f"route add default via {a.gw_v6} dev {nic}",
            f"route add {a.static_net} via {a.router2_v4} dev {nic}",
        ]

    # -- disturbances and scale --------------------------------------------------------------

    def kill_gateway(self, how: str, *, rotate_mac: bool = True) -> None:
        """Make gw_v4 and gw_v6 unreachable; the LAN namespace and router2 stay.

        "addr":   remove both addresses from lan0.
        "silent": the LAN namespace keeps both addresses but stops answering ARP and ND for them:
                  they move from lan0 to its lo (/32, /128). lan0 has arp_ignore=1 (answer only
                  for addresses on the receiving interface) and the kernel answers a neighbour
                  solicitation only for an address on the receiving interface (proxy_ndp is
                  off). Needs no nft/tc: this kernel has neither dummy links nor tc flower.
        rotate_mac: also give lan0 a new MAC, so frames the host still sends to the gateway's
                  old MAC from its neighbour cache are lost as with a dead box. Without it the
                  LAN keeps routing those frames (v4 to far still works after "addr"; "silent"
                  even keeps answering pings) until the host's NUD gives up, tens of seconds
                  later. router2 shares lan0: the host's cached entry for it goes stale too.
        """
        a, br = self.addrs, self.lan_bridge
        v4, v6 = f"{a.gw_v4}/{a.v4_prefixlen}", f"{a.gw_v6}/{a.v6_prefixlen}"
        if how == "addr":
            lines = [f"addr del {v4} dev {br}", f"addr del {v6} dev {br}"]
        elif how == "silent":
            v6_net = ipaddress.ip_interface(v6).network
            lines = [
                f"addr add {a.gw_v4}/32 dev lo",
                f"addr add {a.gw_v6}/128 dev lo nodad",
                f"addr del {v4} dev {br}",
                f"addr del {v6} dev {br}",
                f"route add {v6_net} dev {br}",  # keep routing to the LAN as before
            ]
        else:
            raise ValueError(f"unknown kill_gateway mode {how!r}: use 'addr' or 'silent'")
        if rotate_mac:
            lines.append(f"link set {br} address {_random_mac()}")
        self.ip_batch(self.lan_ns, lines)

    def add_host_addresses(self, n: int) -> list[str]:
        """Add n more /32 addresses from 198.18.128.0/17 to the host NIC; returns them."""
        hosts = self._take(_EXTRA_ADDR_NET, self._extra_addrs, n)
        self.ip_batch(self.host_ns, [f"addr add {h}/32 dev {self.nic}" for h in hosts])
        self._extra_addrs += n
        return hosts

    def add_host_routes(self, n: int) -> list[str]:
        """Add n more /32 routes from 198.19.128.0/17 via router2 on the host NIC; returns them."""
        nets = [f"{h}/32" for h in self._take(_EXTRA_ROUTE_NET, self._extra_routes, n)]
        gw = self.addrs.router2_v4
        self.ip_batch(self.host_ns, [f"route add {p} via {gw} dev {self.nic}" for p in nets])
        self._extra_routes += n
        return nets

    @staticmethod
    def _take(net: ipaddress.IPv4Network, used: int, n: int) -> list[str]:
        if n < 1 or used + n > net.num_addresses - 2:
            raise ValueError(f"n must be 1..{net.num_addresses - 2 - used}")
        first = int(net.network_address) + 1 + used
        return [str(ipaddress.IPv4Address(first + i)) for i in range(n)]
