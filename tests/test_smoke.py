"""tests/smoke.py's own helpers: ports handed to servers, ports that refuse, private copies."""
from __future__ import annotations

import errno
import socket

import pytest

from tests.smoke import _ephemeral_range, closed_port, free_port


def test_free_port_never_hands_out_the_same_port_twice():
    # a bind-close-return helper repeats itself here: the kernel's bind(0) draws from ~28,000
    # ephemeral ports, so 1,000 draws repeat one with near certainty (birthday bound)
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
    lo, _ = _ephemeral_range()
    assert max(ports) < lo  # outside the range the kernel hands to connect() and bind(0)
    with socket.socket() as s:  # and the last one is free to serve on
        s.bind(("127.0.0.1", ports[-1]))


def test_closed_port_refuses_and_cannot_be_taken_while_held():
    with closed_port() as port:
        with socket.socket() as c, pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))
        with socket.socket() as other, pytest.raises(OSError) as e:
            other.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
