"""Worker processes that stop with the process that started them.

quiver runs trainings and evaluations several at once in spawned processes (CUDA cannot
fork). A `ProcessPoolExecutor` worker does not notice when its driver is killed: it goes on
with the calls already queued to it, using the cores the user meant to free. Here each worker
watches its parent and exits as soon as the parent is gone (however it died, SIGKILL
included), and leaving the `with` block, normally or by an exception, stops the workers that
are still running.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

PARENT_CHECK_SECONDS = 1.0


@contextmanager
def spawn_pool(workers: int, threads: float | None = None) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` spawned processes, each with `threads` torch threads (left as torch
    sets them when None), that do not outlive this process or this block."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(), threads))
    finished = False
    try:
        yield pool
        finished = True
    finally:
        # The executor's own processes (it lets go of them on shutdown): other pools of this
        # process, say in another thread, keep theirs.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=finished, cancel_futures=not finished)
        if not finished:  # a worker busy with a call would otherwise run to its end
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=10)


def _start_worker(parent: int, threads: float | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                     name="quiver-parent-watch").start()


def _exit_with(parent: int) -> None:
    # A process whose parent died is handed to another one (init or a subreaper), so a
    # changed parent id means the driver is gone.
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)
