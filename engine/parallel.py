"""Worker processes on this machine, for work that one torch thread does best in many copies.

A tiny CLIP model's per-sample gradients or training steps keep one CPU thread busy but gain
little from a second: on 2 cores, two single-threaded processes do nearly twice the work of one
process with two threads (BENCHMARKS.md). ``Pool`` starts such processes with ``spawn`` (a fork
would copy torch's thread pools) and without the caller's ``__main__``, so a user's script that
calls trakview needs no ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

MAX_AUTO_JOBS = 4  # processes an automatic choice starts at most (memory: a model each)


def queue() -> Any:
    """A queue that ``Pool``'s workers can be given (in ``initargs``) to report to the parent."""
    return multiprocessing.get_context("spawn").Queue()


def cpus() -> int:
    """CPUs this process may use (its affinity, e.g. a container's limit), else the count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_per_job(jobs: int, threads: int = 0) -> int:
    """Torch threads of each of ``jobs`` processes: ``threads``, or the CPUs shared out."""
    return threads or max(1, cpus() // max(1, jobs))


class Pool:
    """A process pool whose workers start with ``torch.set_num_threads(threads)``, the
    caller's log level, then ``initializer(*initargs)``."""

    def __init__(
        self,
        jobs: int,
        threads: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(), threads, logging.getLogger().level, initializer, initargs),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with _main_hidden():  # a submit may start a worker process
            return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Waits for the running work; work not started yet is cancelled."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stops at once (an error or an interrupt): work not started is cancelled and the
        worker processes are terminated. Finished work is kept: it was written atomically."""
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _start_worker(
    parent: int,
    threads: int,
    log_level: int,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    watch = threading.Thread(
        target=_exit_with_parent, args=(parent,), daemon=True, name="trakview-parent"
    )
    watch.start()
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level or logging.WARNING)
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Ends this worker once the process that started it is gone: a parent killed without the
    chance to stop its pool (SIGKILL, SIGTERM, a crash) would otherwise leave its workers
    training on as orphans. Nothing is lost: finished work was written atomically."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


_MAIN_LOCK = threading.RLock()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Starts processes without the caller's ``__main__``: a spawned process runs the main
    script again unless it is guarded by ``if __name__ == "__main__"``. trakview's work needs
    only its own modules."""
    with _MAIN_LOCK:  # two threads starting workers at once must not interleave
        main = sys.modules["__main__"]
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
