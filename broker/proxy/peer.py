"""Which process is on the other end of a loopback TCP connection (Linux ``/proc``).

``SO_PEERCRED`` works only for Unix sockets, and HTTP clients speak TCP. For a
connection to the proxy the kernel still knows the owner: the client's end is
a line of ``/proc/net/tcp`` (its local address and port, the proxy's as the
remote one, its uid, its inode), and the process holding it has
``socket:[INODE]`` among its ``/proc/PID/fd`` links. Only processes in the
bot's tree are searched (``broker.agent.peer.in_tree``, the agent's own check), so
the cost is a read of ``/proc/net/tcp`` and of the tree's ``stat`` and ``fd``
entries, once per connection (clients keep connections alive).
"""

from __future__ import annotations

import os
import socket
import struct

from ..agent.peer import in_tree


def _hex_addr(host: str, port: int) -> str:
    """``127.0.0.1:8080`` as ``/proc/net/tcp`` prints it: the 32-bit address in host order, then the port."""
    (word,) = struct.unpack("=I", socket.inet_aton(host))
    return f"{word:08X}:{port:04X}"


def socket_inode(client: tuple[str, int], server: tuple[str, int]) -> tuple[int, int] | None:
    """(inode, uid) of the client's end of the IPv4 connection ``client`` -> ``server``; None if not found."""
    local, remote = _hex_addr(*client), _hex_addr(*server)
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f, None)  # the header line
            for line in f:
                fields = line.split()
                if len(fields) >= 10 and fields[1] == local and fields[2] == remote:
                    return int(fields[9]), int(fields[7])
    except OSError:
        return None
    return None


def owner_in_tree(inode: int, root: int, *, allow_root: bool = False) -> int | None:
    """A pid in ``root``'s tree that holds socket ``inode``; None when no such process holds it."""
    target = f"socket:[{inode}]"
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == root and not allow_root:
            continue
        if not in_tree(pid, root):
            continue
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue  # gone, or not ours
        for fd in fds:
            try:
                if os.readlink(f"{folder}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def peer_in_tree(client: tuple[str, int], server: tuple[str, int], root: int, *, allow_root: bool = False
                 ) -> tuple[int | None, str | None]:
    """(pid, None) when the connection's client end belongs to ``root``'s tree, else (None, reason)."""
    found = socket_inode(client, server)
    if found is None:
        return None, "its connection is not in /proc/net/tcp"
    inode, uid = found
    if uid != os.getuid():
        return None, f"uid {uid} is not the broker's"
    pid = owner_in_tree(inode, root, allow_root=allow_root)
    if pid is None:
        return None, f"no process of the bot's tree (pid {root}) holds the connection"
    return pid, None
