"""A real SSH path into a booted lab host (docs/lab.md): sshd from the machine's openssh-server,
started by the host's systemd, with throwaway keys; and an ssh client configuration owned by the
test, that reaches the host through a lab namespace.

Nothing here touches the machine's own SSH setup:
- The host key and sshd's settings are files of the test, bind-mounted over paths inside the
  boot; sshd loads only that host key (never the machine's, which the boot's overlay shows).
- /root/.ssh inside the boot is a bind of a test directory holding authorized_keys.
- The client configuration (-F FILE) names the test's key, a test known_hosts file and no
  global one; nothing reads or writes ~/.ssh.
- sshd listens inside the boot's network namespace only.

The client reaches a host either from a lab namespace directly (`lab.run(lab.peer_ns, ["ssh",
...])`), or from the machine through `ProxyCommand` (`proxy_command`), which starts a relay
inside a lab namespace for each connection: one TCP connection per ssh process, as usual.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge_migrate_testlab.lab import Lab
from bridge_migrate_testlab.systemd import Bind, BootSpec

SSHD_UNIT = "ssh.service"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/bridge_migrate_testlab.conf"
SSHD_CONFIG = f"""\
# netlab: a throwaway sshd inside a lab host; keys only, this host key only.
HostKey {HOST_KEY}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""
_KEYGEN_TIMEOUT = 30.0


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if path is None:
        raise FileNotFoundError(f"{name} not found (install openssh-client and openssh-server)")
    return path


def _keygen(path: Path, comment: str) -> None:
    argv = [_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
    subprocess.run(argv, check=True, capture_output=True, timeout=_KEYGEN_TIMEOUT)


@dataclass(frozen=True)
class SshKeys:
    """A client key and a host key, made for one test in `directory` (removed with it)."""

    directory: Path
    client_key: Path
    host_key: Path
    root_ssh: Path  # bound at /root/.ssh inside the hosts: authorized_keys
    sshd_config: Path

    @classmethod
    def make(cls, directory: Path) -> SshKeys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        client, host = directory / "id_ed25519", directory / "host_ed25519"
        _keygen(client, "netlab-client")
        _keygen(host, "netlab-host")
        root_ssh = directory / "root-ssh"
        root_ssh.mkdir(mode=0o700)
        authorized = root_ssh / "authorized_keys"
        authorized.write_text(client.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        sshd_config = directory / "sshd-bridge_migrate_testlab.conf"
        sshd_config.write_text(SSHD_CONFIG)
        return cls(directory, client, host, root_ssh, sshd_config)

    def binds(self) -> tuple[Bind, ...]:
        """What a booted host needs for sshd with these keys (all read-only)."""
        return (
            Bind(self.root_ssh, "/root/.ssh", read_only=True),
            Bind(self.host_key, HOST_KEY, read_only=True),
            Bind(self.host_key.with_suffix(".pub"), f"{HOST_KEY}.pub", read_only=True),
            Bind(self.sshd_config, SSHD_DROP_IN, read_only=True),
        )

    def host_public_key(self) -> str:
        return self.host_key.with_suffix(".pub").read_text().split()[1]


def ssh_spec(keys: SshKeys, base: BootSpec | None = None) -> BootSpec:
    """`base` plus sshd: ssh.service pulled in by the lab target, the keys bound in."""
    base = base if base is not None else BootSpec()
    return BootSpec(
        hostname=base.hostname,
        units=base.units,
        requires=(*base.requires, SSHD_UNIT),
        binds=(*base.binds, *keys.binds()),
        mask=(*base.mask, "ssh.socket"),
        machine_id=base.machine_id,
    )


def proxy_command(lab: Lab, ns: str, address: str, port: int = 22) -> str:
    """A ProxyCommand reaching address:port from inside lab namespace `ns` (a new TCP connection
    for every ssh process that uses it)."""
    if ns not in lab.namespaces:
        raise ValueError(f"{ns!r} is not a namespace of this lab")
    argv = [_tool("nsenter"), f"--net={lab.netns_path(ns)}", "--"]
    argv += [sys.executable, "-m", "bridge_migrate_testlab.relay", address, str(port)]
    return shlex.join(argv)


@dataclass(frozen=True)
class ClientHost:
    """One `Host` block of the client configuration."""

    alias: str
    address: str
    proxy_command: str | None = None  # None: connect directly (run ssh inside a lab namespace)
    options: Mapping[str, str] = field(default_factory=dict)


def write_client_config(
    path: Path, keys: SshKeys, hosts: Sequence[ClientHost], *, known_hosts: Path | None = None
) -> Path:
    """An ssh_config for `ssh -F path`: the test's key only, its own known_hosts
    (accept-new), no agent, never a prompt."""
    known = known_hosts if known_hosts is not None else path.with_name("known_hosts")
    lines: list[str] = []
    for h in hosts:
        lines += [f"Host {h.alias}", f"    HostName {h.address}"]
        if h.proxy_command:
            lines.append(f"    ProxyCommand {h.proxy_command}")
        lines += [f"    {k} {v}" for k, v in h.options.items()]
    lines += [
        "Host *",
        "    User root",
        f"    IdentityFile {keys.client_key}",
        "    IdentitiesOnly yes",
        "    IdentityAgent none",
        f"    UserKnownHostsFile {known}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking accept-new",
        "    BatchMode yes",
        "    ConnectTimeout 5",
        "    LogLevel ERROR",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def drop_new_ssh(lab: Lab, device: str, port: int = 22) -> None:
    """Inside the lab's host namespace: drop new TCP connections to `port` that arrive on
    `device` (matched by name, so the rule may come before the device exists). Connections
    already established keep working. Needs nft (nftables); affects that namespace only."""
    rules = f"""\
table inet netlab_ssh {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{device}" tcp dport {port} tcp flags & (syn | ack) == syn drop
    }}
}}
"""
    lab.run(lab.host_ns, [_tool("nft"), "-f", "-"], input=rules, check=True, timeout=10)


def tree_digest(directory: Path) -> str:
    """A digest of every file's path, mode and content under `directory` (e.g. the machine's
    /etc/ssh before and after a test)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            p = Path(root, name)
            st = p.lstat()
            h.update(f"{p}\0{st.st_mode:o}\0".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
            elif p.is_symlink():
                h.update(os.readlink(p).encode())
    return h.hexdigest()
