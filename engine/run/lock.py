"""One writer at a time: a build or an evaluation holds the run directory's lock while it writes.

The lock is an ``flock`` on ``RUN/.lock``: the operating system releases it when its process ends
in any way (a crash, a SIGKILL), so a stale lock is taken over by the next writer without any
clean-up. The file records who holds it (pid, host, command, start time), so a second writer
stops at once with a message naming the first. ``flock`` is per machine: on shared storage (NFS)
two machines do not see each other's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from engine.errors import RunBusyError
from engine.run.layout import RunLayout


def _holder() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"process {info.get('pid')} on {info.get('host')} ({info.get('command')!r}, since "
        f"{info.get('since')})"
    )


@contextlib.contextmanager
def run_lock(run: str | os.PathLike) -> Iterator[None]:
    """Holds the run's lock for the block.

    Raises:
        RunBusyError: another live process holds it; the message names that process.
    """
    layout = RunLayout(run)
    layout.root.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise RunBusyError(
                f"run {layout.root} is being written by {holder}; wait for it to finish or stop "
                "it, then run this command again"
            ) from None
        try:  # the file we locked may have been removed by the holder we waited for: retry
            same = os.fstat(fd).st_ino == os.stat(layout.lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.lock)
        os.close(fd)  # closing releases the flock
