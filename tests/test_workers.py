"""Spawned worker pools stop with their driver (quiver.workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quiver.workers import spawn_pool

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads process states from /proc")


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.2)
    return not running(pid)


def test_a_worker_exits_when_its_driver_is_killed():
    driver = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from quiver.workers import spawn_pool\n"
        "with spawn_pool(1) as pool:\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(driver.stdout.readline())
        assert running(worker)
        driver.send_signal(signal.SIGKILL)  # no cleanup runs in the driver
        driver.wait(timeout=10)
        assert gone_within(worker, 15), "the worker outlived its killed driver"
    finally:
        driver.kill()


def test_leaving_the_block_by_an_exception_stops_a_busy_worker():
    with pytest.raises(RuntimeError, match="driver failed"), spawn_pool(1) as pool:
        worker = pool.submit(os.getpid).result()
        pool.submit(time.sleep, 120)
        raise RuntimeError("driver failed")
    assert gone_within(worker, 10), "the busy worker ran on after its pool was left"


def test_a_pool_left_normally_returns_every_result():
    with spawn_pool(2, threads=1) as pool:
        assert list(pool.map(pow, [2, 3, 4], [2, 2, 2])) == [4, 9, 16]
