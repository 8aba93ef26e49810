"""Ports and addresses: the one place that asks the operating system for a free port or this host's address."""

from __future__ import annotations

import contextlib
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now; "" means every interface (a rendezvous other hosts connect to, such
    as the nccl weight group's TCPStore or MASTER_PORT). Nothing reserves it: bind it soon after."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def routable_ip() -> str:
    """This host's address as the other nodes see it: Ray's node address when Ray runs, else the source address
    of the default route (nothing is sent), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("10.255.255.255", 1))
        return sock.getsockname()[0]
    return "127.0.0.1"
