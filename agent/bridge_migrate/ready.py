"""Wait until the kernel has the bridge ready to carry the host's traffic, before any route moves.

Two things lag behind the ACKs (found with the kernel's drop-reason tracepoint, see
docs/benchmarks.md): a new bridge sends into noop_qdisc, dropping every packet, until the
link-watch work has seen its carrier and attached its real queue; and a moved IPv6 address is
not usable until the address work has installed its local route, even with NODAD. Both run as
soon as the batch lets go of the RTNL lock.

Both are learnt from the kernel's own notifications (RTNLGRP_LINK and RTNLGRP_IPV6_ROUTE), on a
socket subscribed before the first send, so no event on the way is missed and nothing is polled.
Right after subscribing, the state of a device that exists already (the NIC, on the way back)
is asked for once; so it is again should the socket overflow (ENOBUFS: events were lost).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from types import TracebackType
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWLINK, RTM_NEWROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from .model import AF_INET6, RT_TABLE_LOCAL

LIMIT = 1.5  # seconds; past this the agent goes on and lets verification judge
_BUFFER = 1 << 20  # a bridge's worth of events: hundreds of addresses' local routes


class Readiness:
    """Subscribed on entry; `wait` returns once `bridge` is operationally up and each of
    `ipv6` has its local route on it."""

    def __init__(
        self, ipr: IPRoute, bridge: str, ipv6: tuple[str, ...], *, exists: bool = True
    ) -> None:
        """`exists`: `bridge` is there already (the NIC, on the way back), so its state is
        asked for; one the plan makes is learnt from the events alone."""
        self.ipr, self.bridge, self.ipv6, self.exists = ipr, bridge, frozenset(ipv6), exists
        self.index: int | None = None
        self.up = False
        self.local: set[tuple[str, int]] = set()  # (address, device index) with a local route
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self.marshal = MarshalRtnl()

    def __enter__(self) -> Readiness:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV6_ROUTE))
        if self.exists:
            self._ask()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()

    @property
    def ready(self) -> bool:
        return self.up and all((a, self.index) in self.local for a in self.ipv6)

    def wait(self) -> float | None:
        """Seconds waited; None if the bridge was not ready within LIMIT."""
        started = time.monotonic()
        end = started + LIMIT
        while not self.ready:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                data = self.sock.recv(_BUFFER)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._ask()
                continue
            for msg in self.marshal.parse(data):
                self._learn(msg)
        return time.monotonic() - started

    def _learn(self, msg: Any) -> None:
        kind = msg["header"]["type"]
        if kind == RTM_NEWLINK and msg.get("IFLA_IFNAME") == self.bridge:
            self.index = msg["index"]
            self.up = msg.get("IFLA_OPERSTATE") == "UP"
        elif (
            kind == RTM_NEWROUTE
            and msg["family"] == AF_INET6
            and msg.get("RTA_TABLE") == RT_TABLE_LOCAL
        ):
            self.local.add((msg.get("RTA_DST"), msg.get("RTA_OIF")))

    def _ask(self) -> None:
        """The state events have not told (or told a socket that overflowed)."""
        try:
            links = self.ipr.get_links(ifname=self.bridge)
        except NetlinkError:
            return  # not made yet: its events will tell
        for link in links:
            self._learn(link)
        if self.ipv6:
            for route in self.ipr.get_routes(family=AF_INET6, table=RT_TABLE_LOCAL):
                self._learn(route)
