"""The sandbox of every unit bridge-migrate runs in: the installed units (units/*.service) and the
transient ones the agent starts itself (the dead man's service, the apply detached from a
terminal); a remote driver that starts an apply unit takes APPLY from here too. One list;
tests/test_units.py holds the installed units to it, so that they cannot drift apart.

What stays open is what the agent uses: netlink with CAP_NET_ADMIN (links, addresses, routes,
and nftables through libnftables in process); for the apply's probes CAP_NET_RAW with packet,
raw and TCP sockets; /proc/sys/net, for the IPv6 per-device settings that have no netlink way in;
the network managers' files (MANAGED_PATHS) and the system bus, for the hand-over; systemd's
private socket and the journal (AF_UNIX), to arm and disarm the dead man and to log.
Both roles run as root: the record is root's, and netlink on the host's namespace needs the
capabilities of its owner.
"""

from __future__ import annotations

from pathlib import Path

# Where the managers keep what a hand-over changes: their configuration, their runtime state
# (netplan generates into /run), their DHCP clients' leases.
MANAGED_PATHS = (
    "/etc/systemd/network",
    "/run/systemd/network",
    "/etc/netplan",
    "/etc/NetworkManager",
    "/run/NetworkManager",
    "/etc/network",
    "/run/network",
    "/var/lib/dhcp",
    "/var/lib/dhcpcd",
    "/run/dhcpcd",
    "/etc/cloud/cloud.cfg.d",
    # the drop-in that has a manager's unit restore its files after a restart mid-transaction
    "/etc/systemd/system",
)

HARDENING: tuple[str, ...] = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    # read-only, not hidden: the Python the agent runs on may live under a home (pyenv)
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateMounts=yes",
    "ProtectKernelTunables=yes",
    # ... except the network's per-device settings, which the bridge gets from the NIC (IPv6
    # ones have no netlink way in).
    "ReadWritePaths=/proc/sys/net",
    # ... and the network managers' own files, which the hand-over rewrites and the rollback
    # (the dead man's too) restores: "-" for those this host does not have.
    "ReadWritePaths=" + " ".join(f"-{d}" for d in MANAGED_PATHS),
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    # hidepid=invisible hides nothing from members of /proc's group (gid 0), and the agent is
    # root: the dead man still reads a hung agent's start time in /proc/PID/stat.
    "ProtectProc=invisible",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    # libnftables is called through ctypes without callbacks: no executable memory is made.
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    # pidfd_open and pidfd_send_signal (the dead man's kill) are in @system-service.
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    # A call outside the filter fails instead of killing the process: a rollback cut short by
    # SIGSYS would leave the host half-way; an error is reported and the rest still runs.
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
)

# The transaction: netlink, the probes (ARP on a packet socket, ICMP and ICMPv6 on raw sockets,
# TCP), and systemd's socket to arm the dead man.
APPLY: tuple[str, ...] = (
    *HARDENING,
    "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
    "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_PACKET AF_INET AF_INET6",
)

# The rollback: netlink only, no probes. Killing an agent that hangs past its deadline needs no
# CAP_KILL: both processes are root's.
DEAD_MAN: tuple[str, ...] = (
    *HARDENING,
    "CapabilityBoundingSet=CAP_NET_ADMIN",
    "RestrictAddressFamilies=AF_UNIX AF_NETLINK",
)


def run_properties(role: tuple[str, ...], state_dir: Path) -> list[str]:
    """`systemd-run` arguments for a transient unit in `role`'s sandbox. The state directory
    (which must exist) is bound in writable: a transient unit has no StateDirectory=, and under
    ProtectSystem= and PrivateTmp= only a bind mount reaches it wherever it lives."""
    return [f"--property={p}" for p in (*role, f"BindPaths={state_dir}")]
