"""The harness's port choice: servers it starts get ports no outgoing connection can take."""

from __future__ import annotations

import socket
from pathlib import Path

from hubml_testing.ports import NODE_PORTS, free_port


def test_free_ports_lie_below_the_ephemeral_and_node_port_ranges_and_bind():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # chosen at random, not one fixed port
    assert all(10000 <= p < min(low, NODE_PORTS[0]) for p in ports), sorted(ports)
    for port in list(ports)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free as promised
