"""What verification asks: the probes as the user writes them (`--probe`, the configuration)
and as the agent derives them from the snapshot (the gateways). Pure; verify.py asks them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .model import AF_INET, AF_INET6, RT_TABLE_MAIN, Address, HostState, Route

ProbeKind = Literal["arp", "icmp", "tcp"]


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    target: str
    port: int | None = None
    source: str | None = None  # the address to ask from (gateway probes)
    dev: str | None = None  # the device to ask on (gateway probes)

    @property
    def spec(self) -> str:
        """As written on the command line."""
        if self.kind == "tcp":
            host = f"[{self.target}]" if ":" in self.target else self.target
            return f"tcp:{host}:{self.port}"
        return f"{self.kind}:{self.target}"

    def __str__(self) -> str:
        return f"{self.spec} from {self.source} on {self.dev}" if self.dev else self.spec


class ProbeSyntaxError(ValueError):
    pass


def parse_probe(text: str, what: str = "--probe") -> Probe:
    """`icmp:ADDR` or `tcp:ADDR:PORT` (IPv6 in brackets for tcp: `tcp:[2001:db8::1]:22`)."""
    kind, _, rest = text.partition(":")
    if kind == "icmp":
        return Probe("icmp", _parse_address(rest, what, text))
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ProbeSyntaxError(f"{what} {text!r}: expected tcp:ADDR:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ProbeSyntaxError(f"{what} {text!r}: put an IPv6 address in brackets")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ProbeSyntaxError(f"{what} {text!r}: port must be 1-65535")
        return Probe("tcp", _parse_address(host, what, text), port=int(port))
    raise ProbeSyntaxError(f"{what} {text!r}: expected icmp:ADDR or tcp:ADDR:PORT")


def _parse_address(value: str, what: str, text: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ProbeSyntaxError(f"{what} {text!r}: {value!r} is not an IP address") from None
    # Python takes any text after '%' as an IPv6 scope id: only an interface name is one.
    scope = getattr(address, "scope_id", None)
    if scope is not None and not (scope.isascii() and scope.isprintable() and " " not in scope):
        raise ProbeSyntaxError(f"{what} {text!r}: the scope id is not an interface name")
    return str(address)


def gateway_probes(state: HostState, source: str, target: str) -> tuple[Probe, ...]:
    """One probe per family that has a default route via a gateway in the main table on
    `source`, asked on `target` from an address `source` has now."""
    probes = []
    for family in (AF_INET, AF_INET6):
        route = _best_default(state.routes_on(source), family)
        if route is None or route.gateway is None:
            continue
        address = _source_for(route.gateway, state.addresses_on(source), family)
        if address is not None:
            kind: ProbeKind = "arp" if family == AF_INET else "icmp"
            probes.append(Probe(kind, route.gateway, source=address, dev=target))
    return tuple(probes)


def _best_default(routes: tuple[Route, ...], family: int) -> Route | None:
    defaults = [
        r for r in routes if r.family == family and r.is_default and r.table == RT_TABLE_MAIN
    ]
    return min(defaults, key=lambda r: r.priority, default=None)


def _source_for(gateway: str, addresses: tuple[Address, ...], family: int) -> str | None:
    candidates = [a for a in addresses if a.family == family and a.is_global]
    gw = ipaddress.ip_address(gateway)
    for a in candidates:
        if gw in ipaddress.ip_interface(f"{a.address}/{a.prefixlen}").network:
            return a.address
    return candidates[0].address if candidates else None
