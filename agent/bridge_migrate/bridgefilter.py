"""Would the host's firewall drop what its bridge forwards? (docker/docs #7370, moby #48365)

With br_netfilter loaded and `net.bridge.bridge-nf-call-iptables=1`, every IPv4 frame the bridge
forwards between two of its ports (a guest and the uplink) also traverses the IP forward hook:
a FORWARD chain whose policy is drop (Docker sets it) silently drops the guest's traffic, though
ARP, and so the gateway check, still passes. Refused unless a rule accepts the bridge's own
traffic first (`iifname BRIDGE`, optionally with `oifname BRIDGE`), in the chain or a chain it
jumps to. Read through libnftables (iptables-nft's rules are nftables rules); legacy iptables'
tables through iptables-legacy-save, as netfilter.py does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import netfilter

SYSCTLS = {4: "bridge-nf-call-iptables", 6: "bridge-nf-call-ip6tables"}
FAMILIES = {4: ("ip", "inet"), 6: ("ip6", "inet")}
_LEGACY = {
    4: ("ip_tables_names", "iptables-legacy-save"),
    6: ("ip6_tables_names", "ip6tables-legacy-save"),
}
_TIMEOUT = 10.0
Json = Any


def refusals(bridge: str, versions: set[int]) -> list[str]:
    """Why the host's netfilter would drop the guest's traffic of these IP versions."""
    found = []
    for version in sorted(versions):
        sysctl = f"net.bridge.{SYSCTLS[version]}"
        if _read_sysctl(version) != "1":
            continue  # br_netfilter not loaded, or not passing this family to iptables
        for chain in _dropping_chains(bridge, version):
            found.append(_message(bridge, version, sysctl, chain))
    return found


def _read_sysctl(version: int) -> str | None:
    # /proc/sys/net is the reader's network namespace's: the host's, where the bridge is.
    try:
        return Path(f"/proc/sys/net/bridge/{SYSCTLS[version]}").read_text().strip()
    except OSError:
        return None


def _message(bridge: str, version: int, sysctl: str, chain: str) -> str:
    tool = "iptables" if version == 4 else "ip6tables"
    return (
        f"the host's netfilter would drop the guest's IPv{version} traffic: br_netfilter passes "
        f"bridged frames to it ({sysctl}=1) and {chain} drops by default (Docker sets it so). "
        f"Let {bridge}'s own traffic through (`{tool} -I FORWARD -i {bridge} -o {bridge} -j "
        f"ACCEPT`, with Docker `{tool} -I DOCKER-USER -i {bridge} -o {bridge} -j ACCEPT`), or "
        f"stop passing bridged frames to {tool} (`sysctl -w {sysctl}=0`)"
    )


def _dropping_chains(bridge: str, version: int) -> list[str]:
    found = []
    if netfilter.available():
        objects = netfilter.list_ruleset()
        chains = [o["chain"] for o in objects if "chain" in o]
        rules = [o["rule"] for o in objects if "rule" in o]
        for c in chains:
            forward = c["family"] in FAMILIES[version] and c.get("hook") == "forward"
            if forward and c.get("policy") == "drop" and not _lets_through(c, rules, bridge, set()):
                found.append(f"chain {c['name']} of table {c['family']} {c['table']} (policy drop)")
    found += _legacy_dropping(bridge, version)
    return found


def _lets_through(chain: Json, rules: list[Json], bridge: str, seen: set[str]) -> bool:
    """A rule of `chain` (or of a chain it jumps to) accepts all of the bridge's traffic."""
    seen.add(chain["name"])
    for r in rules:
        if (r["family"], r["table"], r["chain"]) != (
            chain["family"],
            chain["table"],
            chain["name"],
        ):
            continue
        matches = [e["match"] for e in r["expr"] if "match" in e]
        verdicts = [e for e in r["expr"] if "accept" in e or "jump" in e or "goto" in e]
        if matches and not all(_names_bridge(m, bridge) for m in matches):
            continue
        for v in verdicts:
            if "accept" in v and matches:
                return True
            target = (v.get("jump") or v.get("goto") or {}).get("target")
            if target and target not in seen and not matches:
                inner = {**chain, "name": target}
                if _lets_through(inner, rules, bridge, seen):
                    return True
    return False


def _names_bridge(match: Json, bridge: str) -> bool:
    left = match.get("left")
    key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
    return (
        match.get("op") in ("==", "in")
        and key in ("iifname", "oifname")
        and match.get("right") == bridge
    )


def _legacy_dropping(bridge: str, version: int) -> list[str]:
    names, save = _LEGACY[version]
    try:
        tables = Path(f"/proc/net/{names}").read_text().split()
    except OSError:
        return []
    tool = shutil.which(save, path="/usr/sbin:/sbin:/usr/bin")
    if "filter" not in tables or tool is None:
        return []
    done = subprocess.run(
        [tool, "-t", "filter"], capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )
    lines = done.stdout.splitlines()
    accepted = f"-A FORWARD -i {bridge} -o {bridge} -j ACCEPT" in lines
    if ":FORWARD DROP" in " ".join(lines) and not accepted:
        return [f"chain FORWARD of legacy {save.split('-')[0]} table filter (policy DROP)"]
    return []
