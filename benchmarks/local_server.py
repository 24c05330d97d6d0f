"""A `quiver serve` process on 127.0.0.1, as the serving and soak benchmarks and
tests/test_serve.py start one: a free port, its /health, and waiting until it serves or until
it is idle. Standard library only, so a test imports it for nothing."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time


class ServerNotUp(RuntimeError):
    """The server exited, or did not answer /health with "ok" in time."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, timeout: float = 5.0) -> dict:
    """The server's /health answer (its JSON, whatever the status code)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def wait_until_healthy(port: int, process: subprocess.Popen, timeout: float = 300.0) -> dict:
    """Poll /health until the server says "ok" and return that answer; ServerNotUp as soon as
    the process has exited, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerNotUp(f"the server exited (code {process.returncode}) before it served")
        try:
            answer = health(port)
            if answer.get("status") == "ok":
                return answer
        except (OSError, http.client.HTTPException, ValueError):
            pass  # not listening yet, or half up
        if time.monotonic() > deadline:
            raise ServerNotUp(f"the server did not answer /health with ok in {timeout:.0f} s")
        time.sleep(0.2)


def wait_until_idle(port: int, timeout: float = 10.0) -> dict:
    """Poll /health until no request is accepted any more (or `timeout` seconds have
    passed); the last answer, for the caller to check."""
    deadline = time.monotonic() + timeout
    while (answer := health(port))["accepted"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer
