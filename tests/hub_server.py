"""The tests' handle on the local Hub server (``hf_gauge.testing``) and a guard that keeps tests off the internet."""
from __future__ import annotations

import pytest

from hf_gauge.testing import HubServer, Repo, local_hub  # noqa: F401  (re-exported for the tests)


@pytest.fixture
def local_network_only(monkeypatch: pytest.MonkeyPatch):
    """Fail any name lookup other than the loopback host: tests must never reach the internet."""
    import socket

    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            raise OSError(f"test tried to reach {host!r}: only 127.0.0.1 is allowed")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
