"""The record of attached guests: `guests` in the state directory, beside the transaction record,
under the same trust rules (Store.read_side_file / write_side_file: root's directory opened
without following symbolic links, a root-owned 0600 regular file, replaced whole). A damaged file
is refused, never half-read."""

from __future__ import annotations

import json

from . import serde
from .attachment import Attachment
from .preflight import check_name
from .record import RecordError, Store

NAME = "guests"
FORMAT = 1


def load(store: Store) -> tuple[Attachment, ...]:
    data = store.read_side_file(NAME)
    if data is None:
        return ()
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}; this bridge-migrate reads {FORMAT}")
        found = tuple(serde.load(Attachment, entry) for entry in doc["attached"])
        for entry in found:  # the names drive deletions: only ones the agent could have made
            for name in (entry.host_end, entry.spec.ifname, entry.spec.bridge):
                check_name("device", name)
    except Exception as e:  # anything malformed, whatever the parser tripped on
        raise RecordError(
            f"{store.directory / NAME} is not a usable record of attached guests: {e}",
            "it was not used; move it aside (as root) and detach guests by hand",
        ) from None
    return found


def save(store: Store, attached: tuple[Attachment, ...]) -> None:
    doc = {"format": FORMAT, "attached": [serde.to_data(a) for a in attached]}
    store.write_side_file(NAME, json.dumps(doc, indent=1).encode())


def on_bridge(store: Store, bridge: str) -> dict[str, str]:
    """Host end -> the guest it belongs to, for the guests attached to `bridge`."""
    return {
        a.host_end: f"{a.guest} {a.spec.ifname}" for a in load(store) if a.spec.bridge == bridge
    }
