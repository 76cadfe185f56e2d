"""The system bus, for asking and telling the daemons that run the network (systemd, networkd,
NetworkManager) through their own interfaces. Every call is bounded in time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection

TIMEOUT = 2.0  # per call: a daemon that does not answer in time is taken as absent
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


class BusError(Exception):
    """The bus or the daemon refused, or did not answer in time."""


def socket_exists() -> bool:
    where = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    return not where.startswith("unix:path=") or os.path.exists(where.removeprefix("unix:path="))


@contextmanager
def system_bus() -> Iterator[DBusConnection]:
    try:
        conn = open_dbus_connection(bus="SYSTEM", auth_timeout=TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise BusError(f"the system bus: {e}") from e
    with conn:
        yield conn


def call(
    conn: DBusConnection,
    where: DBusAddress,
    method: str,
    sig: str = "",
    *args: Any,
    timeout: float = TIMEOUT,
) -> Any:
    try:
        reply = conn.send_and_get_reply(
            new_method_call(where, method, sig or None, args), timeout=timeout
        )
    except (OSError, TimeoutError) as e:
        raise BusError(f"{where.bus_name} {method}: {e or 'no answer'}") from e
    if reply.header.message_type is MessageType.error:
        raise BusError(f"{where.bus_name} {method}: {reply.body}")
    return reply.body


def prop(conn: DBusConnection, name: str, path: str, interface: str, what: str) -> Any:
    where = DBusAddress(path, name, PROPERTIES)
    return call(conn, where, "Get", "ss", interface, what)[0][1]  # (signature, value)


def names(conn: DBusConnection) -> set[str]:
    return set(call(conn, DBUS, "ListNames")[0])
