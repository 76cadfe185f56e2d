"""The bench's use of a lab: the lab shapes, the three probe meters, putting the host back
between runs, and killing and reviving the gateway. Wraps the Lab without changing it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bridge_migrate_testlab.lab import Lab, MeterHandle
from bridge_migrate_testlab.results import MeterResult

SETTLE_FRESH_S = 2.5  # docs/lab.md: a fresh lab's IPv6 is not ready for 2-3 s
RESTORE_TRIES = 3
# Stream names, in the order Probes.stop() returns them.
STREAMS = ("v4 link", "v6 link", "v4 routed", "out v4", "out v6")
STREAM_HELP = {
    "v4 link": "peer -> host primary IPv4, on-link",
    "v4 routed": "far host -> host primary IPv4: the reply needs the host's default route",
    "v6 link": "peer -> host IPv6, on-link",
    "out v4": "host -> peer IPv4",
    "out v6": "host -> peer IPv6",
}


@dataclass(frozen=True)
class Shape:
    """The host NIC's extra load on top of the lab's standard identity."""

    name: str
    addresses: int = 0  # extra /32 addresses (bridge_migrate_testlab.Lab.add_host_addresses)
    routes: int = 0  # extra /32 routes via router2 (bridge_migrate_testlab.Lab.add_host_routes)


BASE = Shape("base")
SCALE_SHAPES = (
    Shape("+1 address", addresses=1),
    Shape("+16 addresses", addresses=16),
    Shape("+64 addresses", addresses=64),
    Shape("+10 routes", routes=10),
    Shape("+100 routes", routes=100),
    Shape("+1000 routes", routes=1000),
)


@dataclass(frozen=True)
class Probes:
    """The three meters of one run, and when each began (wall clock, seconds)."""

    handles: tuple[MeterHandle, ...]
    t0: tuple[float, ...]

    def stop(self) -> list[tuple[MeterResult, float]]:
        # SIGTERM all first: each drains up to its late threshold, concurrently.
        with ThreadPoolExecutor(max_workers=len(self.handles)) as pool:
            results = list(pool.map(lambda h: h.stop(), self.handles))
        return list(zip(results, self.t0, strict=True))


class BenchLab:
    """A lab of one shape, with the host's configuration recorded so it can be put back."""

    def __init__(self, lab: Lab, shape: Shape) -> None:
        self.lab, self.shape = lab, shape
        self.extra_addresses = lab.add_host_addresses(shape.addresses) if shape.addresses else []
        self.extra_routes = lab.add_host_routes(shape.routes) if shape.routes else []
        self.fingerprint = ""

    def settle(self) -> None:
        """Wait for a fresh lab to settle, then record what "restored" means."""
        time.sleep(SETTLE_FRESH_S)
        self.fingerprint = self.host_view()

    def start_probes(self, interval_ms: float) -> Probes:
        lab, a = self.lab, self.lab.addrs
        plan: list[tuple[str, list[str]]] = [
            (lab.peer_ns, [a.host_v4, a.host_v6]),
            (lab.far_ns, [a.host_v4]),
            (lab.host_ns, [a.peer_v4, a.peer_v6]),
        ]

        def start(item: tuple[str, list[str]]) -> tuple[MeterHandle, float]:
            handle = lab.start_meter(item[0], item[1], interval_ms)
            return handle, time.time()  # the meter's clock starts right after "ready"

        # In parallel: each meter's interpreter takes ~0.1 s to start.
        with ThreadPoolExecutor(max_workers=len(plan)) as pool:
            futures = [pool.submit(start, item) for item in plan]
        failed = [f.exception() for f in futures if f.exception() is not None]
        started = [f.result() for f in futures if f.exception() is None]
        if failed:
            for handle, _ in started:  # no meter may run on into the next run
                with contextlib.suppress(RuntimeError, TimeoutError):
                    handle.stop()
            raise RuntimeError(f"a meter did not start: {failed[0]}")
        return Probes(tuple(h for h, _ in started), tuple(t for _, t in started))

    def host_view(self) -> str:
        """What must be equal before every run: the NIC's addresses and the routes."""
        show = [["ip", "-4", "-o", "addr"], ["ip", "-6", "-o", "addr"], ["ip", "-br", "link"]]
        show += [["ip", "-4", "route"], ["ip", "-6", "route"]]
        parts = []
        for argv in show:
            out = self.lab.run(self.lab.host_ns, argv, check=True, timeout=30).stdout
            # Lifetimes tick; the rest must match exactly.
            lines = [[w for w in ln.split() if not w.endswith("_lft")] for ln in out.splitlines()]
            parts.append("\n".join(sorted(" ".join(words) for words in lines)))
        return "\n".join(parts)

    def restore(self) -> None:
        """Put the host back as it was built, whatever the contender left, and check it."""
        view = ""
        for _ in range(RESTORE_TRIES):
            self.lab.run(
                self.lab.host_ns, ["ip", "-force", "-batch", "-"], input=self._restore_lines()
            )
            view = self.host_view()
            if view == self.fingerprint:
                return
            time.sleep(0.2)
        raise RuntimeError(f"host not restored:\n{view}\nexpected:\n{self.fingerprint}")

    def _restore_lines(self) -> str:
        a, nic = self.lab.addrs, self.lab.nic
        gw2 = a.router2_v4
        lines = [
            "link del br0",  # frees the NIC; br0's addresses and routes go with it
            f"addr add {a.host_v4}/{a.v4_prefixlen} dev {nic}",  # primary first
            f"addr add {a.host_v4_secondary}/{a.v4_prefixlen} dev {nic}",
            f"addr add {a.host_v6}/{a.v6_prefixlen} dev {nic} nodad",
            *(f"addr add {h}/32 dev {nic}" for h in self.extra_addresses),
            f"route replace default via {a.gw_v4} dev {nic}",
            f"route replace {a.static_net} via {gw2} dev {nic}",
            *(f"route replace {p} via {gw2} dev {nic}" for p in self.extra_routes),
            f"route replace default via {a.gw_v6} dev {nic} metric 1024",
        ]
        return "\n".join(lines) + "\n"

    def wait_ready(self, settle_s: float) -> None:
        """Every path answers again; then quiet, so that runs start alike."""
        lab, a = self.lab, self.lab.addrs
        checks = [
            (lab.host_ns, [a.gw_v4, a.gw_v6, a.peer_v4, a.peer_v6]),
            (lab.far_ns, [a.host_v4]),
        ]
        with ThreadPoolExecutor(max_workers=len(checks)) as pool:  # each is an interpreter
            list(pool.map(lambda c: lab.wait_reachable(*c), checks))
        time.sleep(settle_s)

    def kill_gateway(self) -> None:
        # The MAC stays: only the gateway's addresses go, so it is the agent's check that fails.
        self.lab.kill_gateway("addr", rotate_mac=False)

    def revive_gateway(self) -> None:
        a, br = self.lab.addrs, self.lab.lan_bridge
        v4 = a.v4_prefixlen
        # router2 was promoted to primary when the gateway went: rebuild the original order.
        self.lab.ip_batch(
            self.lab.lan_ns,
            [
                f"addr del {a.router2_v4}/{v4} dev {br}",
                f"addr add {a.gw_v4}/{v4} dev {br}",
                f"addr add {a.router2_v4}/{v4} dev {br}",
                f"addr add {a.gw_v6}/{a.v6_prefixlen} dev {br} nodad",
            ],
        )


def stream_names(results: Sequence[MeterResult]) -> tuple[str, ...]:
    """Check that the meters returned the streams in STREAMS order."""
    count = sum(len(r.streams) for r in results)
    if count != len(STREAMS):
        raise RuntimeError(f"expected {len(STREAMS)} streams, got {count}")
    return STREAMS
