"""The whole host namespace read back over netlink, for before/after comparisons in tests.

Independent of the agent's own snapshot and compare code, and wider: every link, every address,
every route in every table (kernel-made ones included), every policy rule, every resolved
neighbour entry and proxy entry, every per-device setting (read with iproute2 and /proc through
nsenter, not with the agent's code).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

IFA_F_TENTATIVE = 0x40
IFA_F_OPTIMISTIC = 0x04
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x04 | 0x08 | 0x10
NUD_STATIC = 0x80 | 0x40


@dataclass(frozen=True)
class HostView:
    links: tuple[tuple[object, ...], ...]  # name, kind, mac, mtu, up, master
    addresses: tuple[tuple[object, ...], ...]  # in dump order per device and family
    routes: frozenset[tuple[object, ...]]
    neighbours: frozenset[tuple[object, ...]]  # dev, dst, lladdr (+ state if static)
    rules: frozenset[tuple[object, ...]]
    proxies: frozenset[tuple[object, ...]]  # dev, dst
    sysctls: frozenset[tuple[str, str]]  # "ipv4/conf/eth0/rp_filter", value
    ruleset: str  # `nft -j list ruleset`, without its metainfo

    def sysctl(self, path: str) -> str | None:
        return next((v for k, v in self.sysctls if k == path), None)

    def link(self, name: str) -> tuple[object, ...] | None:
        return next((link for link in self.links if link[0] == name), None)

    def addresses_on(self, dev: str) -> list[str]:
        return [str(a[2]) for a in self.addresses if a[0] == dev]


def read_view(netns: str) -> HostView:
    with IPRoute(netns=netns, flags=0) as ipr:
        links = list(ipr.get_links())
        names = {m["index"]: m.get("IFLA_IFNAME") for m in links}
        return HostView(
            rules=frozenset(_rule(m) for m in ipr.get_rules()),
            proxies=frozenset(
                (n["dev"], n["dst"]) for n in _ip_json(netns, "neigh", "show", "proxy")
            ),
            sysctls=_sysctls(netns),
            ruleset=_ruleset(netns),
            links=tuple(sorted(_link(m, names) for m in links)),
            addresses=tuple(_address(m, names) for m in ipr.get_addr()),
            routes=frozenset(_route(m, names) for m in ipr.get_routes()),
            neighbours=frozenset(
                _neighbour(m, names)
                for m in ipr.get_neighbours()
                if m["state"] & NUD_VALID and m.get("NDA_LLADDR") and m["state"] != 0x40
            ),
        )


def _link(m: Any, names: dict[int, str]) -> tuple[object, ...]:
    return (
        m.get("IFLA_IFNAME"),
        m.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or "",
        m.get("IFLA_ADDRESS"),
        m.get("IFLA_MTU"),
        bool(m["flags"] & 1),
        names.get(m.get("IFLA_MASTER") or 0),
    )


def _address(m: Any, names: dict[int, str]) -> tuple[object, ...]:
    cache = m.get("IFA_CACHEINFO") or {}
    return (
        names[m["index"]],
        m["family"],
        m.get("IFA_LOCAL") or m.get("IFA_ADDRESS"),
        m["prefixlen"],
        m["scope"],
        (m.get("IFA_FLAGS") or m["flags"]) & ~(IFA_F_TENTATIVE | IFA_F_OPTIMISTIC),
        m.get("IFA_LABEL"),
        m.get("IFA_BROADCAST"),
        # Finite lifetimes tick: keep only whether they are finite.
        cache.get("ifa_valid") == 0xFFFFFFFF,
        cache.get("ifa_preferred") == 0xFFFFFFFF,
    )


def _route(m: Any, names: dict[int, str]) -> tuple[object, ...]:
    metrics = m.get("RTA_METRICS")
    via = m.get("RTA_VIA")
    cache = m.get("RTA_CACHEINFO") or {}
    return (
        m["family"],
        m.get("RTA_TABLE"),
        m.get("RTA_DST"),
        m["dst_len"],
        names.get(m.get("RTA_OIF")),
        m.get("RTA_GATEWAY"),
        m.get("RTA_PRIORITY"),
        m["proto"],
        m["scope"],
        m["type"],
        m.get("RTA_PREFSRC"),
        tuple(sorted((k, v) for k, v in metrics["attrs"])) if metrics else (),
        (via or {}).get("addr"),
        (m.get("RTA_SRC"), m["src_len"]),
        bool(cache.get("rta_expires")),  # expiry ticks: whether it expires
        m.get("RTA_PREF"),
        any(a == "UNKNOWN" and v["header"]["type"] == 30 for a, v in m["attrs"]),  # nhid
    )


def _neighbour(m: Any, names: dict[int, str]) -> tuple[object, ...]:
    static = m["state"] & NUD_STATIC
    return (names[m["ifindex"]], m.get("NDA_DST"), m.get("NDA_LLADDR"), m["state"] if static else 0)


def _rule(m: Any) -> tuple[object, ...]:
    return (
        m["family"],
        m["action"],
        m["flags"],
        *sorted((str(k), str(v)) for k, v in m["attrs"]),
    )


def _nsenter(netns: str, *argv: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return done.stdout


def _ip_json(netns: str, *argv: str) -> list[dict[str, Any]]:
    out = _nsenter(netns, "ip", "-j", *argv)
    return list(json.loads(out)) if out.strip() else []


def _ruleset(netns: str) -> str:
    out = _nsenter(netns, "nft", "-j", "list", "ruleset")
    objects = json.loads(out)["nftables"] if out.strip() else []
    return json.dumps([o for o in objects if "metainfo" not in o], sort_keys=True)


def _sysctls(netns: str) -> frozenset[tuple[str, str]]:
    # /proc/sys/net belongs to the namespace of whoever opens it: read from inside.
    out = _nsenter(netns, "sh", "-c", "cd /proc/sys/net && grep -r . ipv4/conf ipv6/conf")
    found = set()
    for line in out.splitlines():
        path, _, value = line.partition(":")
        found.add((path, value))
    return frozenset(found)


def assert_unchanged(before: HostView, after: HostView, *, learned_may_go: bool = False) -> None:
    """`learned_may_go`: learned neighbour entries are the kernel's to drop (their owner gone, or
    unused for a while, or still settling from a change made by hand): only static ones must be
    back. For checks long after a rollback, or beside a dead gateway."""
    assert after.links == before.links
    assert after.addresses == before.addresses  # order included
    assert after.routes == before.routes  # every table, kernel-made routes too
    assert after.rules == before.rules
    assert after.proxies == before.proxies
    assert after.sysctls == before.sysctls
    assert after.ruleset == before.ruleset
    # Every entry is back; the kernel may have learned more from traffic since (dynamic ones).
    kept = {n for n in before.neighbours if n[3] or not learned_may_go}
    assert kept <= after.neighbours
    assert all(n[3] == 0 for n in after.neighbours - before.neighbours)
