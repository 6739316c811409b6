import socket

import pytest


@pytest.fixture
def free_port() -> int:
    """A free localhost port for a 2-process gloo group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
