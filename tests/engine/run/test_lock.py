"""One writer per run: a second build or evaluation stops at once naming the first, and the lock
of a killed process is taken over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import files
from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
from engine.errors import RunBusyError
from engine.evaluate.lds import LdsConfig, evaluate_lds
from engine.models.train import TrainConfig
from engine.run.layout import RunLayout
from engine.run.lock import run_lock

HOLD = (
    "import sys, time; from engine.run.lock import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('holding', flush=True)\n"
    "    time.sleep(600)\n"
)


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_stops_naming_the_first_and_a_killed_holder_is_taken_over(
    tmp_path, pairs, checkpoints
):
    run = tmp_path / "run"
    holder = _holder(run)
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=5, projector="gaussian")
    try:
        started = time.perf_counter()
        with pytest.raises(RunBusyError, match=f"being written by process {holder.pid} on "):
            build(*pairs, cfg, run)
        assert time.perf_counter() - started < 5  # at once, before any work
        assert not RunLayout(run).config.exists()  # nothing of the run was written
        with pytest.raises(RunBusyError), run_lock(run):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the lock file stays behind
        holder.wait()
    assert RunLayout(run).lock.exists()
    build(*pairs, cfg, run)  # the stale lock is taken over
    assert RunLayout(run).manifest.is_file() and not RunLayout(run).lock.exists()


def test_an_evaluation_and_a_build_exclude_each_other(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    holder = _holder(run)
    try:
        with pytest.raises(RunBusyError, match=str(holder.pid)):
            evaluate_lds(run, LdsConfig(subsets=3), TrainConfig())
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "eval").exists()


def test_overwrite_keeps_the_lock_it_holds(tmp_path, pairs, checkpoints):
    run = tmp_path / "run"
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=5, projector="gaussian")
    build(*pairs, cfg, run)
    with run_lock(run):
        inode = os.stat(RunLayout(run).lock).st_ino
        files.claim_folder(run, RunLayout(run).config, {}, True, keep=(RunLayout(run).lock,))
        assert os.stat(RunLayout(run).lock).st_ino == inode
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]
