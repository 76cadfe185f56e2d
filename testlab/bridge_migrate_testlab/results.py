"""Results of the outage meter, shared by the meter process and its callers.

Kept apart from meter.py so that `python -m bridge_migrate_testlab.meter` does not import the
module it is about to run (runpy warns about that) when the package re-exports these types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LostProbe:
    seq: int
    sent_ms: float  # relative to the meter's start


@dataclass(frozen=True)
class LateProbe:
    seq: int
    sent_ms: float
    rtt_ms: float


@dataclass(frozen=True)
class StreamResult:
    """One target. Invariant: sent == received + late + lost."""

    target: str
    family: int  # 4 or 6
    sent: int
    received: int  # replies within late_ms
    late: int  # replies after late_ms: counted as lost-late, not as received
    lost: int  # no reply at all (send errors included)
    duplicates: int
    send_errors: int
    # Between on-time replies (kernel receive times), start and end of the run included. It
    # also grows when the meter itself was stalled (see max_send_lag_ms); longest_loss_ms
    # counts only probes that were sent and not answered.
    longest_gap_ms: float
    longest_gap_at_ms: float  # when that gap began, relative to the start
    max_missed_run: int  # longest run of consecutive probes without an on-time reply
    longest_loss_ms: float  # that run's span: its first send to the next answered send (or end)
    longest_loss_at_ms: float
    rtt_avg_ms: float | None
    rtt_max_ms: float | None
    lost_probes: tuple[LostProbe, ...]  # capped, see truncated
    late_probes: tuple[LateProbe, ...]
    truncated: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamResult:
        fields = dict(d)
        fields["lost_probes"] = tuple(LostProbe(**p) for p in d["lost_probes"])
        fields["late_probes"] = tuple(LateProbe(**p) for p in d["late_probes"])
        return cls(**fields)


@dataclass(frozen=True)
class MeterResult:
    interval_ms: float
    late_ms: float
    duration_ms: float  # from the first send slot until sending stopped
    skipped_slots: int  # send slots dropped because the meter fell behind (should be 0)
    max_send_lag_ms: float  # worst delay of a send against its schedule: the meter's own stalls
    streams: tuple[StreamResult, ...]

    def stream(self, target: str) -> StreamResult:
        for s in self.streams:
            if s.target == target:
                return s
        raise KeyError(target)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MeterResult:
        d = json.loads(text)
        fields = dict(d)
        fields["streams"] = tuple(StreamResult.from_dict(s) for s in d["streams"])
        return cls(**fields)
