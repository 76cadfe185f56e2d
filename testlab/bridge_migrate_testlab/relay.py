"""A TCP relay for ssh's ProxyCommand: `python -m bridge_migrate_testlab.relay HOST PORT`
connects to HOST:PORT and copies stdin to the connection and the connection to stdout until
both sides are done.

Run under `nsenter --net=/run/netns/NS`, it lets an ssh client on the machine reach a lab host
through that lab's namespace (each new ssh process: a new TCP connection), without netcat.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys

_CONNECT_TIMEOUT = 10.0
_CHUNK = 65536


def relay(host: str, port: int) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT)
    except OSError as e:
        print(f"bridge_migrate_testlab.relay: {host}:{port}: {e}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    inputs = [stdin, sock.fileno()]
    while inputs:
        readable, _, _ = select.select(inputs, [], [])
        if stdin in readable:
            data = os.read(stdin, _CHUNK)
            if data:
                sock.sendall(data)
            else:  # ssh closed its side: pass the half-close on
                inputs.remove(stdin)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if sock.fileno() in readable:
            try:
                data = sock.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                return 0  # the server is done: ssh has everything it will get
            try:
                _write_all(stdout, data)
            except BrokenPipeError:
                return 0
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m bridge_migrate_testlab.relay HOST PORT", file=sys.stderr)
        return 2
    return relay(args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
