"""Private Unix sockets, as the fetch daemon and the signing agent use them.

Both ends of every credbroker socket check the other: the folder holding a
socket must be the user's own with mode 0700 (so nobody else can plant or
reach it), the socket is created 0600, and the peer's credentials come from
the kernel (``SO_PEERCRED``), never from anything the peer says.

``send_some`` is the non-blocking send of both event loops (the agent's and
the signing proxy's).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_PEERCRED = struct.Struct("3i")

#: Every credbroker socket speaks the same frames: a 4-byte big-endian length,
#: then that many bytes of compact JSON, at most MAX_MESSAGE.
HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 20


def private_dir(path: Path, *, create: bool) -> bool:
    """True when ``path`` is a folder owned by this user with mode 0700 (created if asked)."""
    try:
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of ``sock`` (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return int(pid), int(uid), int(gid)


def peer_is_me(sock: socket.socket) -> bool:
    """True when the other end runs as this process's user."""
    return peer_credentials(sock)[1] == os.getuid()


def send_some(sock: socket.socket, out: bytearray) -> bool:
    """Send what the non-blocking ``sock`` takes of ``out`` now, and drop that from ``out``; False when
    the peer is gone."""
    try:
        n = sock.send(out)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    del out[:n]
    return True


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ConnectionError when the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, *, deadline: float | None = None) -> bytearray:
    """One whole frame's payload, read straight into a bytearray of its exact size.

    The caller can wipe it: no intermediate ``bytes`` copy is made. With
    ``deadline`` (a ``time.monotonic()`` value) the whole frame must arrive by
    then, however slowly the peer drips it (TimeoutError otherwise).
    ValueError when it is too large, ConnectionError when the peer closes first.
    """
    header = _recv_into(sock, bytearray(HEADER.size), deadline)
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ValueError("message too large")
    return _recv_into(sock, bytearray(length), deadline)


def _recv_into(sock: socket.socket, buf: bytearray, deadline: float | None) -> bytearray:
    import time

    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the peer did not send a whole message in time")
                sock.settimeout(left)
            n = sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("connection closed")
            got += n
    return buf


def frame(obj: Mapping[str, Any]) -> bytes:
    """One message as it goes on the wire."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


def recv_message(sock: socket.socket) -> Any:
    """One decoded message; ValueError when it is too large or not JSON, ConnectionError when cut."""
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if length > MAX_MESSAGE:
        raise ValueError("message too large")
    return json.loads(recv_exact(sock, length))


def listen_private(path: Path, backlog: int) -> socket.socket:
    """A listening socket at ``path`` created 0600 (no window in which it is wider)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    except OSError:
        server.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(backlog)
    return server
