"""Network-namespace lab and outage meter for testing and demonstrating bridge-migrate."""

from netlab.lab import Lab, LabAddresses, MeterHandle
from netlab.results import LateProbe, LostProbe, MeterResult, StreamResult

__all__ = [
    "Lab",
    "LabAddresses",
    "LateProbe",
    "LostProbe",
    "MeterHandle",
    "MeterResult",
    "StreamResult",
]
