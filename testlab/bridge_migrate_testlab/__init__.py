"""Network-namespace lab and outage meter for testing and demonstrating bridge-migrate."""

from bridge_migrate_testlab.lab import Lab, LabAddresses, MeterHandle
from bridge_migrate_testlab.results import LateProbe, LostProbe, MeterResult, StreamResult

__all__ = [
    "Lab",
    "LabAddresses",
    "LateProbe",
    "LostProbe",
    "MeterHandle",
    "MeterResult",
    "StreamResult",
]
